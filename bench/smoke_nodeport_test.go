package bench

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestSmokeQuickNodePort runs `ternbench --quick --paths
// nodeport-tc,nodeport-xdp --workloads nodeport-udp-pps`: both paths are
// set up and verified (XDP on the uplink only on nodeport-xdp, every
// sample's translations counted by the program the path names), the
// outside host's packets reach the server pod through the NodePort, and
// nothing is left behind. The pod-to-pod workloads are n/a there.
func TestSmokeQuickNodePort(t *testing.T) {
	testutil.RequirePrivileged(t)
	requireTools(t, "iperf3", "iptables", "iptables-save", "taskset")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, dir, err := Run(ctx, Config{
		Quick:     true,
		Paths:     NodePortPaths,
		Workloads: []string{nodePortWorkloadName, "udp-pps"},
		Duration:  time.Second,
		Out:       t.TempDir(),
		Log:       testLog{t},
	})
	if res == nil {
		t.Fatalf("Run: %v", err)
	}
	got, rerr := ReadResults(filepath.Join(dir, "results.json"))
	if rerr != nil {
		t.Fatal(rerr)
	}
	assertNoLeftovers(t, got)
	for _, path := range NodePortPaths {
		t.Run(path, func(t *testing.T) {
			pr := got.Path(path)
			if pr == nil || pr.Status != StatusOK {
				t.Fatalf("path %s: %+v", path, pr)
			}
			row := got.Row(nodePortWorkloadName, "rx_pps", path)
			if row == nil || row.Median <= 0 {
				t.Fatalf("no packet rate for %s", path)
			}
			if got.Row("udp-pps", "rx_pps", path) != nil {
				t.Errorf("udp-pps (pod to pod) measured on %s", path)
			}
			t.Logf("%s: %.0f packets/s, checks: %s", path, row.Median, strings.Join(pr.Checks, "; "))
		})
	}
	if err != nil {
		t.Errorf("Run: %v", err)
	}
}
