package bench

import (
	"bytes"
	"flag"
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

// sweepFixture is fixtureResults with a policy sweep of 0 and 1,000 rules
// over its three repetitions on ebpf and iptables; with ebpfUnavailable
// the ebpf datapath could not enforce policy and has no sweep samples.
func sweepFixture(ebpfUnavailable bool) *Results {
	r := fixtureResults()
	w := &policySweepWorkload{counts: []int{0, 1000}}
	wr := WorkloadResult{Name: w.Name(), Title: w.Title(), Short: w.Short(), Metrics: w.Metrics(), Status: StatusOK,
		NotApplicable: map[string]string{
			PathLimit:     "n/a: no CNI plugin: nothing enforces NetworkPolicy on this path",
			PathReference: "n/a: the reference bridge plugin does not implement NetworkPolicy",
		}}
	if ebpfUnavailable {
		wr.NotApplicable[PathEBPF] = unavailablePrefix + "the ebpf datapath does not enforce NetworkPolicy yet: ternctl apply: not implemented"
	}
	r.Workloads = append(r.Workloads, wr)
	conns := map[string]map[int][]float64{
		PathEBPF:     {0: {8000, 8200, 8100}, 1000: {7900, 8200, 8000}},
		PathIptables: {0: {7000, 7100, 6900}, 1000: {3500, 3550, 3450}},
	}
	for rep := 1; rep <= 3; rep++ {
		for _, p := range []string{PathEBPF, PathIptables} {
			if p == PathEBPF && ebpfUnavailable {
				continue
			}
			m := map[string]float64{}
			for _, n := range []int{0, 1000} {
				m[sweepMetricName("conns_per_s", n)] = conns[p][n][rep-1]
				m[sweepMetricName("p50_us", n)] = 8
				m[sweepMetricName("p99_us", n)] = 12
				m[sweepMetricName("gbps", n)] = 15
				m[sweepMetricName("apply_ms", n)] = 20 + float64(n)/10
				m[sweepMetricName("remove_ms", n)] = 30
				m[sweepMetricName("entries", n)] = float64(n + 1)
				m[sweepMetricName("crr_errors", n)] = 0
				if p == PathIptables {
					m[sweepMetricName("chain_rules", n)] = float64(n + 3)
				}
			}
			r.Samples = append(r.Samples, Sample{Path: p, Workload: policySweepName, Rep: rep, Metrics: m})
		}
	}
	r.Config.Workloads = append(r.Config.Workloads, policySweepName)
	r.Config.PolicyRules = []int{0, 1000}
	r.Summarize()
	return r
}

func TestSplitSweepMetric(t *testing.T) {
	if b, n, ok := splitSweepMetric("p50_us@1000"); !ok || b != "p50_us" || n != 1000 {
		t.Errorf("split = %q %d %v", b, n, ok)
	}
	for _, s := range []string{"p50_us", "p50_us@", "p50_us@x"} {
		if _, _, ok := splitSweepMetric(s); ok {
			t.Errorf("%q split", s)
		}
	}
	if got := sweepMetricName("gbps", 10000); got != "gbps@10000" {
		t.Errorf("name = %q", got)
	}
}

func TestSweepSummaryRatios(t *testing.T) {
	r := sweepFixture(false)
	row := r.Row(policySweepName, "conns_per_s@1000", PathEBPF)
	if row == nil || row.Median != 8000 || row.VsLimit != nil {
		t.Fatalf("ebpf conns@1000 row = %+v", row)
	}
	// Paired: 7900/3500, 8200/3550, 8000/3450 → median 2.31.
	if row.VsIptables == nil || !near(row.VsIptables.Median, 8200.0/3550) || row.VsIptables.N != 3 {
		t.Errorf("ebpf vs iptables = %+v", row.VsIptables)
	}
	wl := *r.Workload(policySweepName)
	// iptables at 1,000 rules vs 0 rules: 0.5 in every repetition.
	if v := r.sweepVsFirst(wl, "conns_per_s", 0, 1000, PathIptables); v == nil || !near(v.Median, 0.5) || !near(v.Min, 3450.0/6900) {
		t.Errorf("iptables × 0 rules = %+v", v)
	}
}

func TestRenderReportSweep(t *testing.T) {
	var b bytes.Buffer
	if err := RenderReport(&b, sweepFixture(false)); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"### Policy sweep: 0, 1,000 NetworkPolicy rules on the server pod",
		"#### TCP connection rate (connections/s, higher is better)",
		"| Rules | ebpf | iptables | ebpf × iptables | ebpf × 0 rules | iptables × 0 rules |",
		"| 0 | 8,100 (8,000–8,200) | 7,000 (6,900–7,100) | 1.15× (1.14×–1.17×) | 1 | 1 |",
		"| 1,000 | 8,000 (7,900–8,200) | 3,500 (3,450–3,550) | 2.31× (2.26×–2.32×) | 0.99× (0.99×–1.00×) | 0.50× (0.50×–0.50×) |",
		"#### Apply time (ternctl apply) (ms, lower is better)",
		"#### TCP ping-pong p50 latency (µs, lower is better)",
		"#### TCP stream throughput (Gbit/s, higher is better)",
		"Compiled policy entries, ebpf",
		"| 1,000 | 30.0 | 30.0 | 1,001 | 1,001 | 1,003 | 0 | 0 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// The sweep is not rendered by the generic per-path table.
	if strings.Contains(md, "| TCP connection rate (connections/s, higher is better) | ebpf |") {
		t.Error("the sweep has generic rows")
	}
	checkMarkdownTables(t, md)
}

func TestRenderReportSweepUnavailable(t *testing.T) {
	var b bytes.Buffer
	if err := RenderReport(&b, sweepFixture(true)); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"> Workload `policy-sweep` unavailable on path `ebpf`: the ebpf datapath does not enforce NetworkPolicy yet",
		"**ebpf: unavailable** — the ebpf datapath does not enforce NetworkPolicy yet",
		"| 1,000 | unavailable | 3,500 (3,450–3,550) | — | — | 0.50× (0.50×–0.50×) |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	checkMarkdownTables(t, md)
}

func TestRenderChartSweep(t *testing.T) {
	var b bytes.Buffer
	if err := RenderChart(&b, sweepFixture(false)); err != nil {
		t.Fatal(err)
	}
	st := parseSVG(t, b.Bytes())
	bars := 0
	for _, s := range st.texts {
		if strings.Contains(s, " rules: median ") {
			bars++
		}
	}
	// p50, stream, connection rate, apply time × 2 counts × 2 paths.
	if bars != 4*2*2 {
		t.Errorf("%d sweep bars, want 16", bars)
	}
	all := strings.Join(st.texts, "\n")
	for _, want := range []string{"Policy sweep: TCP connection rate", "Policy sweep: apply time", "NetworkPolicy rules", "1,000", "iptables, 1,000 rules: median 3,500 connections/s"} {
		if !strings.Contains(all, want) {
			t.Errorf("chart lacks %q", want)
		}
	}
	for _, v := range st.attrValues {
		if strings.Contains(v, "NaN") || strings.Contains(v, "Inf") {
			t.Errorf("attribute value %q", v)
		}
	}
}

func TestConfigPolicyRules(t *testing.T) {
	cfg := Config{Pin: "none"}
	if err := cfg.resolve(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.PolicyRules, PolicyRuleCounts) {
		t.Errorf("default rule counts %v", cfg.PolicyRules)
	}
	cfg = Config{Pin: "none", Quick: true}
	if err := cfg.resolve(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.PolicyRules, QuickPolicyRuleCounts) {
		t.Errorf("quick rule counts %v", cfg.PolicyRules)
	}
	var fcfg Config
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fcfg.RegisterFlags(fs)
	if err := fs.Parse([]string{"--quick", "--policy-rules", "5000, 0,10_000"}); err != nil {
		t.Fatal(err)
	}
	fcfg.Pin = "none"
	if err := fcfg.resolve(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(fcfg.PolicyRules, []int{0, 5000, 10000}) {
		t.Errorf("--policy-rules: %v", fcfg.PolicyRules)
	}
	for _, bad := range [][]int{{-1}, {0, 0}, {maxPolicyRules + 1}} {
		c := Config{Pin: "none", PolicyRules: bad}
		if err := c.resolve(); err == nil || !strings.Contains(err.Error(), "--policy-rules") {
			t.Errorf("%v: err = %v", bad, err)
		}
	}
	if err := fs.Parse([]string{"--policy-rules", "many"}); err == nil {
		t.Error("--policy-rules many accepted")
	}
}

func TestCountIngressChainRules(t *testing.T) {
	save := `*filter
:FORWARD ACCEPT [0:0]
:TERN-POL-1a2b3c4d - [0:0]
:TERN-1a2b3c4d-bI1 - [0:0]
-A TERN-POL-1a2b3c4d -d 10.244.1.3/32 -j TERN-1a2b3c4d-bI1
-A TERN-1a2b3c4d-bI1 -m set --match-set TERN-C-1a2b3c4d-b1 src -j RETURN
-A TERN-1a2b3c4d-bI1 -p tcp -m set --match-set TERN-C-1a2b3c4d-b2 src -m tcp --dport 1024 -j RETURN
-A TERN-1a2b3c4d-bI1 -p tcp -m tcp --dport 16384:32767 -j RETURN
-A TERN-1a2b3c4d-bI1 -j DROP
COMMIT
`
	_, rules := parseIptablesSave(save)
	if n, err := countIngressChainRules(rules, "10.244.1.3"); err != nil || n != 4 {
		t.Errorf("server: %d, %v", n, err)
	}
	if _, err := countIngressChainRules(rules, "10.244.1.2"); err == nil || !strings.Contains(err.Error(), "not isolated") {
		t.Errorf("client: %v", err)
	}
}

func TestPolicySweepRunsLast(t *testing.T) {
	for _, w := range allWorkloads() {
		if got := runsLast(w); got != (w.Name() == policySweepName || w.Name() == servicesName) {
			t.Errorf("%s: runsLast = %v", w.Name(), got)
		}
	}
	if !strings.Contains(deniedProbeTimeout.String(), "1s") || deniedProbeTimeout > time.Second {
		t.Errorf("the denied probe waits %s", deniedProbeTimeout)
	}
}
