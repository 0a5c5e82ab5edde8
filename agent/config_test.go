package agent

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
	for _, want := range []string{`"subnet": "10.244.7.0/24"`, `"type": "tern-ipam"`, `"clusterCIDR": "10.244.0.0/16"`, `"10.96.0.0/12"`} {
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
