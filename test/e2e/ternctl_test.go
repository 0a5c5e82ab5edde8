package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ternlabs/tern/internal/testutil"
)

// ternctlBinary returns the ternctl built by make (TERN_CNI_PATH) or
// builds one.
func ternctlBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("TERN_CNI_PATH"); dir != "" {
		if p, err := filepath.Abs(filepath.Join(dir, "ternctl")); err == nil {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	out := filepath.Join(t.TempDir(), "ternctl")
	cmd := exec.Command("go", "build", "-o", out, "github.com/ternlabs/tern/cmd/ternctl")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build ternctl: %v\n%s", err, b)
	}
	return out
}

// TestTernctl shows endpoints with their map entry and attached program,
// and counters that move with traffic.
func TestTernctl(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	bin := ternctlBinary(t)
	n := testutil.NewNode(t)
	conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: "10.77.8.0/24"})
	confFile := filepath.Join(t.TempDir(), "10-tern.conflist")
	if err := os.WriteFile(confFile, conf, 0o600); err != nil {
		t.Fatal(err)
	}
	a := addPod(t, n, conf, "a")
	b := addPod(t, n, conf, "b")
	if err := testutil.Ping(a.NS, b.IP, 3); err != nil {
		t.Fatal(err)
	}

	out, err := n.Exec(t, bin, "--cni-conf", confFile, "-o", "json", "get", "endpoints")
	if err != nil {
		t.Fatalf("ternctl get endpoints: %v", err)
	}
	var eps []struct {
		IP      string `json:"ip"`
		Pod     string `json:"pod"`
		InMap   bool   `json:"inMap"`
		Program string `json:"program"`
	}
	if err := json.Unmarshal([]byte(out), &eps); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	if len(eps) != 2 {
		t.Fatalf("want 2 endpoints, got %s", out)
	}
	for _, ep := range eps {
		if (ep.IP != a.IP && ep.IP != b.IP) || !ep.InMap || !strings.Contains(ep.Program, "tcx/ingress tern_from_pod") || !strings.HasPrefix(ep.Pod, "default/") {
			t.Errorf("unexpected endpoint row %+v", ep)
		}
	}

	out, err = n.Exec(t, bin, "--cni-conf", confFile, "-o", "json", "get", "metrics")
	if err != nil {
		t.Fatalf("ternctl get metrics: %v", err)
	}
	var metrics map[string]map[string]uint64
	if err := json.Unmarshal([]byte(out), &metrics); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	if metrics["redirect_peer"]["packets"] < 6 {
		t.Errorf("redirect_peer after 3 pings each way: %v", metrics["redirect_peer"])
	}
	if _, err := n.Exec(t, bin, "--cni-conf", confFile, "get", "nothing"); err == nil {
		t.Error("ternctl accepted an unknown resource")
	}
}
