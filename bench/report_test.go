package bench

import (
	"bytes"
	"strings"
	"testing"
)

func TestRenderReport(t *testing.T) {
	r := fixtureResults()
	r.Paths = append(r.Paths, PathResult{Name: "extra", Status: StatusUnavailable, Reason: "cmd/tern does not build"})
	r.Env.ForeignLoad = "CPU 40% busy before the run"
	var b bytes.Buffer
	if err := RenderReport(&b, r); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"# Tern benchmark — 2026-11-23 09:00:00 UTC",
		"### TCP stream throughput (iperf3, one stream)",
		"| Metric | Path | Median | Min | Max | × limit | × iptables |",
		"| Throughput (Gbit/s, higher is better) | ebpf | 16.0 | 9.50 | 19.0 | 0.95× (0.95×–1.00×) | 1.90× (1.90×–2.00×) |",
		"| Throughput (Gbit/s, higher is better) | limit | 16.0 | 10.0 | 20.0 | 1 | 2.00× (2.00×–2.00×) |",
		"| p50 latency (µs, lower is better) | iptables |",
		"Also recorded (medians): Retransmits (segments): limit 0",
		"Not applicable: limit (n/a: no CNI plugin on this path).",
		"- not measured: udp-pps — iperf3 not found in PATH",
		"Path `extra` unavailable: cmd/tern does not build",
		"**Foreign load**: CPU 40% busy before the run",
		"rep 2, tcp-rr on reference: sockperf: no reply from the server",
		`no bridge \| none`, // a | inside a cell is escaped
		"| Tern commit | unknown |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	checkMarkdownTables(t, md)
}

func TestRenderReportFailedPath(t *testing.T) {
	r := fixtureResults()
	r.Paths[2].Status, r.Paths[2].Reason = StatusFailed, "ebpf path check: 12 packets went through FORWARD"
	r.Summarize()
	r.Leaks = []string{"network namespace ternbench-1-abcdef-ebpf-node"}
	var b bytes.Buffer
	if err := RenderReport(&b, r); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"> **Path `ebpf` FAILED**: ebpf path check: 12 packets went through FORWARD",
		"reported 0 error(s) and 1 leak(s)",
		"- leak: network namespace ternbench-1-abcdef-ebpf-node",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if strings.Contains(md, "| Throughput (Gbit/s, higher is better) | ebpf |") {
		t.Error("the failed path has result rows")
	}
	checkMarkdownTables(t, md)
}

// checkMarkdownTables checks that every row of every table has as many
// cells as its header.
func checkMarkdownTables(t *testing.T, md string) {
	t.Helper()
	cells := func(line string) int {
		return strings.Count(strings.ReplaceAll(line, `\|`, ""), "|") - 1
	}
	want := -1
	for i, line := range strings.Split(md, "\n") {
		if !strings.HasPrefix(line, "|") {
			want = -1
			continue
		}
		if want < 0 {
			want = cells(line)
			continue
		}
		if got := cells(line); got != want {
			t.Errorf("line %d has %d cells, its table %d: %s", i+1, got, want, line)
		}
	}
}

func TestFormatValue(t *testing.T) {
	for _, tc := range []struct {
		in   float64
		want string
	}{
		{0, "0"},
		{0.931, "0.931"},
		{8.53, "8.53"},
		{5, "5.00"},
		{15.64, "15.6"},
		{9.996, "10.0"},
		{122.4, "122"},
		{999.6, "1,000"},
		{8934, "8,934"},
		{81038.4, "81,038"},
		{1.957e9, "1.96G"},
		{5.19e6, "5.19M"},
		{-1234, "-1,234"},
	} {
		if got := FormatValue(tc.in); got != tc.want {
			t.Errorf("FormatValue(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
	for _, tc := range []struct {
		in   float64
		want string
	}{{81038, "81.0k"}, {15.6, "15.6"}, {1.957e9, "1.96G"}, {999, "999"}} {
		if got := CompactValue(tc.in); got != tc.want {
			t.Errorf("CompactValue(%v) = %q, want %q", tc.in, got, tc.want)
		}
	}
	if got := FormatRatio(0.8749); got != "0.87×" {
		t.Errorf("FormatRatio = %q", got)
	}
}
