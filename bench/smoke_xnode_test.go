package bench

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestSmokeQuickCrossNode runs `ternbench --quick --workloads
// tcp-stream,policy-sweep --policy-rules 100` on the cross-node paths:
// every path is set up and verified on both of its nodes (ebpf: neither
// node's FORWARD chain sees the pods' traffic; iptables: both nodes'
// TERN-FWD counters grow), moves real traffic, gets its ratios against the
// cross-node limit and iptables in its routing mode; the policy sweep runs
// on Tern's paths (100 rules on the server's node, compiled to 101 entries
// including the client pod's remote address, proven in force) and is n/a on
// the limit; nothing is left behind.
func TestSmokeQuickCrossNode(t *testing.T) {
	testutil.RequirePrivileged(t)
	requireTools(t, "iperf3", "sockperf", "iptables", "iptables-save", "taskset")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, dir, err := Run(ctx, Config{
		Quick:       true,
		Paths:       CrossNodePaths,
		Workloads:   []string{"tcp-stream", policySweepName},
		PolicyRules: []int{100},
		Duration:    time.Second,
		Out:         t.TempDir(),
		Log:         testLog{t},
	})
	if res == nil {
		t.Fatalf("Run: %v", err)
	}
	got, rerr := ReadResults(filepath.Join(dir, "results.json"))
	if rerr != nil {
		t.Fatal(rerr)
	}
	assertNoLeftovers(t, got)
	for _, path := range CrossNodePaths {
		t.Run(path, func(t *testing.T) {
			pr := got.Path(path)
			if pr == nil || pr.Status != StatusOK {
				t.Fatalf("path %s: %+v", path, pr)
			}
			row := got.Row("tcp-stream", "gbps", path)
			if row == nil || row.Median <= 0 {
				t.Fatalf("no throughput for %s", path)
			}
			base := crossNodeBaselines[path]
			if (base[0] != "") != (row.VsLimit != nil) || (base[1] != "") != (row.VsIptables != nil) {
				t.Errorf("%s: ratios vs limit %v, vs iptables %v; want them against %q and %q", path, row.VsLimit, row.VsIptables, base[0], base[1])
			}
			checkSmokeSweep(t, got, path)
			t.Logf("%s: %.3g Gbit/s, checks: %s", path, row.Median, strings.Join(pr.Checks, "; "))
		})
	}
	if err != nil {
		t.Errorf("Run: %v", err)
	}
}
