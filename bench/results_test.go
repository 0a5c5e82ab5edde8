package bench

import (
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// fixtureResults is a run of three repetitions on four paths with one
// failed sample, one unavailable workload and the control plane not
// applicable to the limit.
func fixtureResults() *Results {
	start := time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)
	r := &Results{
		SchemaVersion: SchemaVersion,
		Tool:          "ternbench",
		RunID:         "ternbench-1-abcdef",
		Started:       start,
		Finished:      start.Add(5 * time.Minute),
		Config: RunConfig{
			Paths: AllPaths, Workloads: []string{"tcp-stream", "tcp-rr", "cni"}, Reps: 3,
			DurationSec: 4, OmitSec: 1, Pin: "1", Pods: 100, Parallel: 10,
		},
		Env: Env{Kernel: "6.18.44", CPUModel: "AMD EPYC", NProc: 2, Iperf3Version: "iperf 3.12", SockperfVersion: "3.7",
			GoVersion: "go1.26", TernCommit: "unknown", PluginsVersion: "v1.9.1",
			LoadBefore: Load{0.1, 0.2, 0.3, 2}, LoadAfter: Load{1.5, 0.9, 0.4, 3}},
		Paths: []PathResult{
			{Name: PathLimit, Description: limitDescription, Status: StatusOK, Checks: []string{"no bridge | none"}},
			{Name: PathReference, Description: referenceDescription, Status: StatusOK},
			{Name: PathEBPF, Description: ebpfDescription, Status: StatusOK, Checks: []string{"tcx ingress tern_from_pod"}},
			{Name: PathIptables, Description: iptablesDescription, Status: StatusOK},
		},
		NotMeasured: []string{"udp-pps — iperf3 not found in PATH"},
	}
	for _, w := range []Workload{&iperfWorkload{}, &sockperfWorkload{}, &cniWorkload{}} {
		wr := WorkloadResult{Name: w.Name(), Title: w.Title(), Short: w.Short(), Metrics: w.Metrics(), Status: StatusOK}
		if w.Name() == "cni" {
			wr.NotApplicable = map[string]string{PathLimit: "n/a: no CNI plugin on this path"}
		}
		r.Workloads = append(r.Workloads, wr)
	}
	r.Workloads = append(r.Workloads, WorkloadResult{Name: "udp-pps", Title: "UDP", Status: StatusUnavailable, Reason: "iperf3 not found in PATH"})

	gbps := map[string][]float64{
		PathLimit:     {20, 10, 16},
		PathReference: {16, 8, 12},
		PathEBPF:      {19, 9.5, 16},
		PathIptables:  {10, 5, 8},
	}
	p50 := map[string][]float64{
		PathLimit:     {15, 15, 16},
		PathReference: {17, 18, 17},
		PathEBPF:      {15, 16, 16},
		PathIptables:  {30, 29, 31},
	}
	for rep := 1; rep <= 3; rep++ {
		for _, p := range AllPaths {
			at := start.Add(time.Duration(rep) * time.Minute)
			r.Samples = append(r.Samples, Sample{Path: p, Workload: "tcp-stream", Rep: rep, Start: at,
				Metrics: map[string]float64{"gbps": gbps[p][rep-1], "retransmits": 0, "bytes": gbps[p][rep-1] * 1e9 / 8 * 4}})
			s := Sample{Path: p, Workload: "tcp-rr", Rep: rep, Start: at,
				Metrics: map[string]float64{"p50_us": p50[p][rep-1], "p99_us": 2 * p50[p][rep-1], "tps": 1e6 / (2 * p50[p][rep-1])}}
			if p == PathReference && rep == 2 {
				s = Sample{Path: p, Workload: "tcp-rr", Rep: rep, Start: at, Error: "sockperf: no reply from the server"}
			}
			r.Samples = append(r.Samples, s)
			if p != PathLimit {
				m := make(map[string]float64)
				for _, spec := range (&cniWorkload{}).Metrics() {
					m[spec.Name] = 20 + float64(rep)
				}
				r.Samples = append(r.Samples, Sample{Path: p, Workload: "cni", Rep: rep, Start: at, Metrics: m})
			}
		}
	}
	r.Summarize()
	return r
}

func TestSummarize(t *testing.T) {
	r := fixtureResults()
	row := r.Row("tcp-stream", "gbps", PathEBPF)
	if row == nil {
		t.Fatal("no tcp-stream/gbps/ebpf row")
	}
	if row.N != 3 || row.Median != 16 || row.Min != 9.5 || row.Max != 19 {
		t.Errorf("ebpf gbps row = %+v", row)
	}
	// Paired ratios to the limit: 0.95, 0.95, 1 → median 0.95.
	if row.VsLimit == nil || !near(row.VsLimit.Median, 0.95) || !near(row.VsLimit.Max, 1) || row.VsLimit.N != 3 {
		t.Errorf("ebpf vs limit = %+v", row.VsLimit)
	}
	// To iptables: 1.9, 1.9, 2 → median 1.9.
	if row.VsIptables == nil || !near(row.VsIptables.Median, 1.9) {
		t.Errorf("ebpf vs iptables = %+v", row.VsIptables)
	}
	if lim := r.Row("tcp-stream", "gbps", PathLimit); lim.VsLimit != nil || lim.VsIptables == nil {
		t.Errorf("limit row ratios = %+v / %+v; want none to itself, one to iptables", lim.VsLimit, lim.VsIptables)
	}
	// The failed sample is left out: two repetitions, and only two pairs.
	ref := r.Row("tcp-rr", "p50_us", PathReference)
	if ref.N != 2 || ref.Median != 17 || ref.VsLimit.N != 2 {
		t.Errorf("reference p50 row = %+v, vs limit %+v", ref, ref.VsLimit)
	}
	// Informational metrics get no ratio.
	if b := r.Row("tcp-stream", "bytes", PathEBPF); b == nil || b.VsLimit != nil || b.VsIptables != nil {
		t.Errorf("bytes row = %+v", b)
	}
	// No control plane on the limit, hence no ratio to it.
	if c := r.Row("cni", "seq_add_p50_ms", PathEBPF); c == nil || c.VsLimit != nil || c.VsIptables == nil || !near(c.VsIptables.Median, 1) {
		t.Errorf("cni row = %+v", c)
	}
	if r.Row("cni", "seq_add_p50_ms", PathLimit) != nil {
		t.Error("cni row for the limit")
	}
}

func TestSummarizeSkipsFailedPaths(t *testing.T) {
	r := fixtureResults()
	r.Paths[2].Status, r.Paths[2].Reason = StatusFailed, "no tc ingress BPF program"
	r.Summarize()
	if r.Row("tcp-stream", "gbps", PathEBPF) != nil {
		t.Error("a failed path has summary rows")
	}
	r.Paths[0].Status = StatusUnavailable
	r.Summarize()
	if row := r.Row("tcp-stream", "gbps", PathIptables); row == nil || row.VsLimit != nil {
		t.Errorf("ratio to an unavailable limit: %+v", row)
	}
}

func TestResultsRoundTrip(t *testing.T) {
	r := fixtureResults()
	path := filepath.Join(t.TempDir(), "results.json")
	if err := r.WriteJSON(path); err != nil {
		t.Fatal(err)
	}
	got, err := ReadResults(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, r) {
		t.Fatalf("round trip changed the results:\n got %+v\nwant %+v", got, r)
	}
	b, _ := os.ReadFile(path)
	for _, bad := range []string{"NaN", "Inf"} {
		if strings.Contains(string(b), bad) {
			t.Errorf("results.json contains %s", bad)
		}
	}
}

func TestReadResultsRejectsOtherSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "results.json")
	if err := os.WriteFile(path, []byte(`{"schemaVersion": 99}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadResults(path); err == nil || !strings.Contains(err.Error(), "schema version 99") {
		t.Fatalf("err = %v", err)
	}
}

func TestSummarizeNeverEmitsNaN(t *testing.T) {
	r := fixtureResults()
	r.Samples = append(r.Samples, Sample{Path: PathEBPF, Workload: "tcp-stream", Rep: 9, Metrics: map[string]float64{"gbps": 1}})
	r.Summarize()
	for _, row := range r.Summary {
		for _, v := range []float64{row.Median, row.Min, row.Max} {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				t.Fatalf("row %+v has a non-finite value", row)
			}
		}
	}
}
