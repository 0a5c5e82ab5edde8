package agent

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/cni"
)

// TestFlagsEnvFallback: a flag given wins over its environment variable,
// which wins over the default.
func TestFlagsEnvFallback(t *testing.T) {
	env := map[string]string{"NODE_NAME": "from-env", "TERN_DATAPATH": "iptables", "TERN_SYNC_MIN_INTERVAL": "250ms", "TERN_OFFLINE": "true", "TERN_POD_CIDR": "10.1.2.0/24"}
	cfg, err := ParseFlags([]string{"--datapath", "ebpf"}, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NodeName != "from-env" || cfg.Datapath != "ebpf" || cfg.MinSync != 250*time.Millisecond || !cfg.Offline || cfg.CNIConfDir != "/etc/cni/net.d" || cfg.MetricsAddr != ":9962" || cfg.HealthAddr != ":9963" {
		t.Fatalf("got %+v", cfg)
	}
	if _, err := ParseFlags([]string{"--cluster-cidr", "nope"}, func(string) string { return "" }, io.Discard); err == nil || !strings.Contains(err.Error(), "cluster-cidr") {
		t.Fatalf("invalid CIDR: got %v", err)
	}
}

// TestConfListInstall: the conflist carries the node's pod CIDR as the
// tern-ipam subnet, replaces the old one atomically and is removed on
// uninstall.
func TestConfListInstall(t *testing.T) {
	dir := t.TempDir()
	cfg, err := ParseFlags([]string{"--cluster-cidr", "10.244.0.0/16", "--service-cidr", "10.96.0.0/12"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	for _, cidr := range []string{"10.244.1.0/24", "10.244.7.0/24"} {
		b, err := ConfList(cfg, cidr)
		if err != nil {
			t.Fatal(err)
		}
		if err := WriteConfList(dir, b); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(filepath.Join(dir, ConfFileName))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"subnet": "10.244.7.0/24"`, `"type": "tern-ipam"`, `"clusterCIDR": "10.244.0.0/16"`, `"serviceCIDR": [
        "10.96.0.0/12"
      ]`} {
		if !strings.Contains(string(got), want) {
			t.Errorf("conflist lacks %s:\n%s", want, got)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
	if err := RemoveConfList(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ConfFileName)); !os.IsNotExist(err) {
		t.Fatalf("conflist not removed: %v", err)
	}
	if err := RemoveConfList(dir); err != nil {
		t.Fatalf("second uninstall: %v", err)
	}
}

// TestFlagsDocumented: the README's flag table lists every flag with its
// environment variable.
func TestFlagsDocumented(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range Flags {
		row := "| `--" + f.name + "` | "
		if f.env != "" {
			row += "`" + f.env + "`"
		}
		if !strings.Contains(string(readme), row) {
			t.Errorf("README.md has no flag table row for --%s (%s)", f.name, row)
		}
	}
}

// TestConfListRuntimeCompat: the default conflist is CNI 1.0.0, the last
// version containerd 1.6 (and 1.7) load -- with 1.1.0 their libcni fails
// every pod sandbox ("incompatible CNI versions") and the node stays
// NotReady; --portmap chains portmap for hostPort, --bridge names the
// bridge; an unknown --cni-version is refused.
func TestConfListRuntimeCompat(t *testing.T) {
	noenv := func(string) string { return "" }
	cfg, err := ParseFlags(nil, noenv, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	b, err := ConfList(cfg, "10.244.1.0/24")
	if err != nil {
		t.Fatal(err)
	}
	var l struct {
		CNIVersion string           `json:"cniVersion"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(b, &l); err != nil {
		t.Fatal(err)
	}
	if l.CNIVersion != "1.0.0" || len(l.Plugins) != 1 || l.Plugins[0]["bridge"] != nil {
		t.Errorf("default conflist: version %q, %d plugins, bridge %v; want 1.0.0, tern alone, no bridge", l.CNIVersion, len(l.Plugins), l.Plugins[0]["bridge"])
	}
	env := map[string]string{"TERN_CNI_VERSION": "1.1.0", "TERN_PORTMAP": "true", "TERN_BRIDGE": "ternk8s0"}
	cfg, err = ParseFlags(nil, func(k string) string { return env[k] }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if b, err = ConfList(cfg, "10.244.1.0/24"); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &l); err != nil {
		t.Fatal(err)
	}
	if l.CNIVersion != "1.1.0" || len(l.Plugins) != 2 || l.Plugins[0]["bridge"] != "ternk8s0" ||
		l.Plugins[1]["type"] != "portmap" || l.Plugins[1]["capabilities"].(map[string]any)["portMappings"] != true {
		t.Errorf("conflist from the environment:\n%s", b)
	}
	if conf, err := cni.ParseConfig(pluginConf(b)); err != nil || conf.Bridge != "ternk8s0" {
		t.Errorf("the plugin's view of it: %v", err)
	}
	if _, err := ParseFlags([]string{"--cni-version", "2.0.0"}, noenv, io.Discard); err == nil {
		t.Error("--cni-version 2.0.0 accepted")
	}
}

// TestInstallPlugin: the plugin binary lands in the bin dir (made if
// missing) as an executable "tern" with the source's bytes, replaces an
// older one, and leaves no temporary file; a missing source changes
// nothing.
func TestInstallPlugin(t *testing.T) {
	src := filepath.Join(t.TempDir(), "tern-new")
	binDir := filepath.Join(t.TempDir(), "opt", "cni", "bin")
	for _, content := range []string{"old plugin", "new plugin"} {
		if err := os.WriteFile(src, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := InstallPlugin(src, binDir); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(binDir, "tern"))
		if err != nil || string(got) != content {
			t.Fatalf("installed plugin holds %q (%v), want %q", got, err, content)
		}
	}
	fi, err := os.Stat(filepath.Join(binDir, "tern"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o755 {
		t.Errorf("installed plugin mode %v, want 0755", fi.Mode().Perm())
	}
	if entries, _ := os.ReadDir(binDir); len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
	if err := InstallPlugin(filepath.Join(t.TempDir(), "missing"), binDir); err == nil {
		t.Error("InstallPlugin of a missing source succeeded")
	}
	if got, _ := os.ReadFile(filepath.Join(binDir, "tern")); string(got) != "new plugin" {
		t.Errorf("after a failed install the plugin holds %q, want the previous one", got)
	}
}
