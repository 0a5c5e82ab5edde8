package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/internal/testutil"
)

// testLog sends the harness's progress lines to the test log.
type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed by the benchmark tests and is not installed", tool)
		}
	}
}

// assertNoLeftovers checks the root namespace for anything of the run.
func assertNoLeftovers(t *testing.T, res *Results) {
	t.Helper()
	if len(res.Leaks) > 0 {
		t.Errorf("leak check: %v", res.Leaks)
	}
	id := strings.TrimPrefix(res.RunID, namePrefix)
	ents, _ := os.ReadDir(netnsDir)
	for _, e := range ents {
		if strings.Contains(e.Name(), id) {
			t.Errorf("network namespace %s left behind", e.Name())
		}
	}
	if m := mountsContaining(id); len(m) > 0 {
		t.Errorf("mounts left behind: %v", m)
	}
	if out, err := exec.Command("iptables-save").Output(); err == nil && strings.Contains(string(out), id) {
		t.Errorf("root netns iptables mention the run %s", id)
	}
}

// TestSmokeQuick runs the harness as `ternbench --quick --workloads
// tcp-stream,policy-sweep --policy-rules 100` on every path and checks the
// three files, that every path moved real traffic, and that the policy
// sweep measured Tern's datapaths with 100 rules in force (ebpf may report
// it unavailable while its NetworkPolicy enforcement is not implemented).
// The ebpf and iptables paths need cmd/tern to build: if it does not,
// their subtests fail.
func TestSmokeQuick(t *testing.T) {
	testutil.RequirePrivileged(t)
	requireTools(t, "iperf3", "sockperf", "iptables", "iptables-save", "ipset", "taskset")
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, dir, err := Run(ctx, Config{
		Quick:       true,
		Workloads:   []string{"tcp-stream", policySweepName},
		PolicyRules: []int{100},
		Duration:    time.Second,
		Out:         out,
		Log:         testLog{t},
	})
	if res == nil {
		t.Fatalf("Run: %v", err)
	}
	if filepath.Dir(dir) != out {
		t.Errorf("results in %s, want a directory of %s", dir, out)
	}

	// The three files, well-formed.
	got, rerr := ReadResults(filepath.Join(dir, "results.json"))
	if rerr != nil {
		t.Fatal(rerr)
	}
	md, merr := os.ReadFile(filepath.Join(dir, "report.md"))
	if merr != nil {
		t.Fatal(merr)
	}
	checkMarkdownTables(t, string(md))
	for _, want := range []string{"### TCP stream throughput", "| Throughput (Gbit/s, higher is better) | limit |",
		"### Policy sweep: 100 NetworkPolicy rules on the server pod", "policy-sweep on limit — n/a"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report.md lacks %q", want)
		}
	}
	svg, serr := os.ReadFile(filepath.Join(dir, "chart.svg"))
	if serr != nil {
		t.Fatal(serr)
	}
	if st := parseSVG(t, svg); st.root != "svg" || !strings.Contains(strings.Join(st.texts, " "), "Gbit/s") {
		t.Errorf("chart.svg: root %q, no Gbit/s axis", st.root)
	}
	assertNoLeftovers(t, got)

	for _, path := range AllPaths {
		t.Run(path, func(t *testing.T) {
			pr := got.Path(path)
			if pr == nil {
				t.Fatalf("no result for path %s", path)
			}
			if pr.Status != StatusOK {
				t.Fatalf("path %s %s: %s", path, pr.Status, pr.Reason)
			}
			var bytes float64
			for _, s := range got.Samples {
				if s.Path == path && s.Workload == "tcp-stream" {
					if s.Error != "" {
						t.Fatalf("sample failed: %s", s.Error)
					}
					bytes += s.Metrics["bytes"]
				}
			}
			if bytes <= 0 {
				t.Fatalf("path %s moved no bytes", path)
			}
			if row := got.Row("tcp-stream", "gbps", path); row == nil || row.Median <= 0 {
				t.Fatalf("no throughput summary for %s", path)
			}
			checkSmokeSweep(t, got, path)
			t.Logf("%s: %.3g bytes, checks: %s", path, bytes, strings.Join(pr.Checks, "; "))
		})
	}
	if err != nil {
		t.Errorf("Run: %v", err)
	}
}

// TestInterruptCleansUp cancels a run in the middle of its measurements,
// as SIGINT does, and checks that teardown still removes everything and
// the files say the run was interrupted.
func TestInterruptCleansUp(t *testing.T) {
	testutil.RequirePrivileged(t)
	requireTools(t, "iperf3", "iptables-save")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Setup of the limit path takes well under a second; the first
		// sample then runs for 1 + 5 s.
		time.Sleep(4 * time.Second)
		cancel()
	}()
	start := time.Now()
	res, dir, err := Run(ctx, Config{
		Paths: []string{PathLimit}, Workloads: []string{"tcp-stream"}, Reps: 3, Duration: 5 * time.Second,
		Pin: "none", Out: t.TempDir(), Log: testLog{t},
	})
	if err == nil {
		t.Fatal("an interrupted run returned no error")
	}
	if res == nil || !res.Interrupted {
		t.Fatalf("results not marked interrupted: %+v", res)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("Run took %s after the interruption", d)
	}
	if _, err := os.Stat(filepath.Join(dir, "report.md")); err != nil {
		t.Errorf("no report of the interrupted run: %v", err)
	}
	assertNoLeftovers(t, res)
}

// checkSmokeSweep checks the policy sweep of the smoke run on one path:
// not applicable to the limit and the reference plugins; on Tern's paths
// 100 rules compiled to 101 entries, in force, and the three traffic
// figures taken (both datapaths enforce NetworkPolicy: unavailable on
// either is a failure).
func checkSmokeSweep(t *testing.T, res *Results, path string) {
	t.Helper()
	wl := res.Workload(policySweepName)
	if wl == nil {
		t.Fatal("no policy-sweep workload in the results")
	}
	reason := wl.NotApplicable[path]
	switch path {
	case PathLimit, PathReference, PathLimitXNode:
		if !strings.HasPrefix(reason, "n/a: ") {
			t.Errorf("policy sweep on %s: %q, want n/a", path, reason)
		}
		return
	}
	if reason != "" {
		t.Fatalf("policy sweep on %s: %s", path, reason)
	}
	n := 0
	for _, s := range res.Samples {
		if s.Path != path || s.Workload != policySweepName {
			continue
		}
		n++
		if s.Error != "" {
			t.Fatalf("policy sweep sample failed: %s", s.Error)
		}
		if e := s.Metrics["entries@100"]; e != 101 {
			t.Errorf("compiled policy entries at 100 rules = %v, want 101", e)
		}
		for _, m := range []string{"apply_ms@100", "p50_us@100", "gbps@100", "conns_per_s@100"} {
			if s.Metrics[m] <= 0 {
				t.Errorf("%s = %v", m, s.Metrics[m])
			}
		}
		if strings.HasPrefix(path, PathIptables) && s.Metrics["chain_rules@100"] < 101 {
			t.Errorf("the server's iptables ingress chain has %v rules", s.Metrics["chain_rules@100"])
		}
	}
	if n != 1 {
		t.Fatalf("%d policy sweep samples on %s, want 1", n, path)
	}
}
