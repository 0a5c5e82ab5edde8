package bench

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ternbpf "github.com/ternlabs/tern/bpf"
)

func TestMissingPluginsMakePathsUnavailable(t *testing.T) {
	dir := t.TempDir()
	// Only the reference plugins are there.
	for _, b := range []string{"bridge", "host-local"} {
		if err := os.WriteFile(filepath.Join(dir, b), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	r := &runner{cfg: Config{Paths: AllPaths, PluginDir: dir, Log: io.Discard}}
	un := r.buildPlugins(context.Background(), "v1.9.1")
	if _, ok := un[PathReference]; ok {
		t.Errorf("reference unavailable: %s", un[PathReference])
	}
	for _, p := range []string{PathEBPF, PathIptables} {
		if !strings.Contains(un[p], "plugin tern not in --plugin-dir") {
			t.Errorf("%s: reason %q", p, un[p])
		}
	}
	if _, ok := un[PathLimit]; ok {
		t.Error("the limit needs no plugin")
	}
}

// TestPluginOfOtherObjectsUnavailable: a tern plugin that carries other BPF
// objects than ternbench (another build) makes the Tern paths unavailable,
// with the reason: the nodes would run ternbench's programs. The plugin is
// a script that describes itself as cmd/tern does (run without
// CNI_COMMAND).
func TestPluginOfOtherObjectsUnavailable(t *testing.T) {
	for _, c := range []struct {
		name, about, want string
	}{
		{"same objects", "tern: eBPF CNI plugin, " + ternbpf.AboutObjects(), ""},
		{"other objects", "tern: eBPF CNI plugin, BPF objects 0123abcd", "carries BPF objects 0123abcd, this ternbench " + ternbpf.ObjectVersion()},
		{"objects not named", "tern: eBPF CNI plugin", "does not name its BPF objects"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			script := "#!/bin/sh\n[ -z \"$CNI_COMMAND\" ] && echo '" + c.about + "' >&2\nexit 0\n"
			if err := os.WriteFile(filepath.Join(dir, "tern"), []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			r := &runner{cfg: Config{Paths: []string{PathLimit, PathEBPF, PathIptables}, PluginDir: dir, Log: io.Discard}}
			un := r.buildPlugins(context.Background(), "v1.9.1")
			for _, p := range []string{PathEBPF, PathIptables} {
				if got, ok := un[p]; c.want == "" && ok {
					t.Errorf("%s unavailable: %s", p, got)
				} else if c.want != "" && !strings.Contains(got, c.want) {
					t.Errorf("%s: reason %q, want it to say %q", p, got, c.want)
				}
			}
		})
	}
}

func TestVerdict(t *testing.T) {
	r := &runner{res: fixtureResults()}
	r.res.Paths = append(r.res.Paths, PathResult{Name: "x", Status: StatusUnavailable, Reason: "cmd/tern does not build"})
	// The fixture's one failed sample is an error; an unavailable path is not.
	err := r.verdict()
	if err == nil || !strings.Contains(err.Error(), "rep 2 tcp-rr on reference") || strings.Contains(err.Error(), "cmd/tern") {
		t.Fatalf("verdict = %v", err)
	}
	r.res.Samples = nil
	if err := r.verdict(); err != nil {
		t.Fatalf("verdict without failures = %v", err)
	}
	r.res.Paths[2].Status, r.res.Paths[2].Reason = StatusFailed, "no tc ingress BPF program"
	r.res.Leaks = []string{"mount /tmp/x"}
	err = r.verdict()
	if err == nil || !strings.Contains(err.Error(), "path ebpf failed: no tc ingress BPF program") || !strings.Contains(err.Error(), "leak: mount /tmp/x") {
		t.Fatalf("verdict = %v", err)
	}
}

func TestMakeOutDirNeverReuses(t *testing.T) {
	out := t.TempDir()
	r := fixtureResults()
	a, err := makeOutDir(out, r.Started)
	if err != nil {
		t.Fatal(err)
	}
	b, err := makeOutDir(out, r.Started)
	if err != nil {
		t.Fatal(err)
	}
	if a == b || filepath.Base(a) != "20261123-090000" || filepath.Base(b) != "20261123-090000-2" {
		t.Fatalf("dirs %s, %s", a, b)
	}
}
