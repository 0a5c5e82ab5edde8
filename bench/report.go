package bench

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"time"
)

// RenderReport writes r as Markdown: one table per workload with the
// median, minimum and maximum of every metric per path and the paired
// ratios against the limit and iptables paths, then the paths and their
// checks, what was not measured, the environment and any error.
func RenderReport(w io.Writer, r *Results) error {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }

	p("# Tern benchmark — %s\n\n", r.Started.UTC().Format("2006-01-02 15:04:05 UTC"))
	c := r.Config
	pin := "not pinned"
	if c.Pin != "" {
		pin = "load generators pinned to CPU " + c.Pin + " (`taskset -c " + c.Pin + "`)"
	}
	p("Run `%s`: %d repetition(s) of %s (the first %s of each traffic sample discarded), paths interleaved in the order %s; %s; control plane with %d pods, %d in parallel.\n\n",
		r.RunID, c.Reps, secs(c.DurationSec), secs(c.OmitSec), strings.Join(c.Paths, " → "), pin, c.Pods, c.Parallel)

	if r.Interrupted {
		p("> **Interrupted**: the run was stopped before it finished; the figures below cover what was measured.\n\n")
	}
	if len(r.Errors) > 0 || len(r.Leaks) > 0 {
		p("> **This run reported %d error(s) and %d leak(s)**: see [Errors](#errors).\n\n", len(r.Errors), len(r.Leaks))
	}
	for _, pr := range r.Paths {
		switch pr.Status {
		case StatusFailed:
			p("> **Path `%s` FAILED**: %s\n\n", pr.Name, pr.Reason)
		case StatusUnavailable:
			p("> Path `%s` unavailable: %s\n\n", pr.Name, pr.Reason)
		}
	}
	if r.Env.ForeignLoad != "" {
		p("> **Foreign load**: %s\n\n", r.Env.ForeignLoad)
	}

	p("## Results\n\n")
	p("Median over the repetitions, with the minimum and maximum. **× limit** and **× iptables** are the median of the per-repetition ratios *this path / that path* (paired: both measured back to back in the same repetition), with their range in parentheses. For metrics where lower is better (latency), a ratio below 1 means faster than the other path; for the others, above 1 means more.\n\n")
	measured := false
	for _, wl := range r.Workloads {
		rows := r.rowsOf(wl.Name)
		if len(rows) == 0 {
			continue
		}
		measured = true
		p("### %s\n\n", wl.Title)
		p("| Metric | Path | Median | Min | Max | × limit | × iptables |\n")
		p("|---|---|--:|--:|--:|--:|--:|\n")
		for _, m := range wl.Metrics {
			for _, row := range rows {
				if row.Metric != m.Name {
					continue
				}
				p("| %s | %s | %s | %s | %s | %s | %s |\n", metricLabel(m), row.Path,
					FormatValue(row.Median), FormatValue(row.Min), FormatValue(row.Max),
					ratioCell(row.VsLimit, row.Path == PathLimit), ratioCell(row.VsIptables, row.Path == PathIptables))
			}
		}
		p("\n")
		if len(wl.NotApplicable) > 0 {
			var na []string
			for _, path := range sortedKeys(wl.NotApplicable) {
				na = append(na, fmt.Sprintf("%s (%s)", path, wl.NotApplicable[path]))
			}
			p("Not applicable: %s.\n\n", strings.Join(na, "; "))
		}
	}
	if !measured {
		p("Nothing was measured.\n\n")
	}
	p("![chart](chart.svg)\n\n")

	p("## Paths\n\n")
	p("| Path | Status | What it is | Checks |\n|---|---|---|---|\n")
	for _, pr := range r.Paths {
		status := pr.Status
		if pr.Reason != "" {
			status += ": " + pr.Reason
		}
		p("| %s | %s | %s | %s |\n", pr.Name, cell(status), cell(pr.Description), cell(strings.Join(pr.Checks, "; ")))
	}
	p("\n")

	p("## Not measured\n\n")
	if len(r.NotMeasured) == 0 {
		p("Everything requested was measured.\n\n")
	}
	for _, s := range r.NotMeasured {
		p("- not measured: %s\n", s)
	}
	if len(r.NotMeasured) > 0 {
		p("\n")
	}

	e := r.Env
	p("## Environment\n\n| | |\n|---|---|\n")
	p("| Kernel | %s |\n| CPU | %s × %d |\n| iperf3 | %s |\n| sockperf | %s |\n| Go | %s |\n| Tern commit | %s |\n| containernetworking/plugins | %s |\n| br_netfilter loaded | %t |\n",
		cell(e.Kernel), cell(e.CPUModel), e.NProc, cell(e.Iperf3Version), cell(e.SockperfVersion), cell(e.GoVersion), cell(e.TernCommit), cell(e.PluginsVersion), e.BrNetfilter)
	p("| Load before (1/5/15 min, CPU busy over 1 s) | %.2f / %.2f / %.2f, %.0f%% |\n", e.LoadBefore.Load1, e.LoadBefore.Load5, e.LoadBefore.Load15, e.LoadBefore.BusyPercent)
	p("| Load after | %.2f / %.2f / %.2f, %.0f%% |\n", e.LoadAfter.Load1, e.LoadAfter.Load5, e.LoadAfter.Load15, e.LoadAfter.BusyPercent)
	fl := "none seen (machine idle before and after)"
	if e.ForeignLoad != "" {
		fl = e.ForeignLoad
	}
	p("| Foreign load | %s |\n", cell(fl))
	p("| Started / finished | %s / %s (%s) |\n\n", r.Started.UTC().Format(time.RFC3339), r.Finished.UTC().Format(time.RFC3339), r.Finished.Sub(r.Started).Round(time.Second))

	p("## Errors\n\n")
	var sampleErrs []string
	for _, s := range r.Samples {
		if s.Error != "" {
			sampleErrs = append(sampleErrs, fmt.Sprintf("rep %d, %s on %s: %s", s.Rep, s.Workload, s.Path, s.Error))
		}
	}
	if len(r.Errors) == 0 && len(r.Leaks) == 0 && len(sampleErrs) == 0 {
		p("None; the leak check found nothing left behind.\n")
	}
	for _, s := range r.Errors {
		p("- %s\n", oneLine(s))
	}
	for _, s := range sampleErrs {
		p("- sample %s\n", oneLine(s))
	}
	for _, s := range r.Leaks {
		p("- leak: %s\n", oneLine(s))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func (r *Results) rowsOf(workload string) []SummaryRow {
	var out []SummaryRow
	for _, s := range r.Summary {
		if s.Workload == workload {
			out = append(out, s)
		}
	}
	return out
}

func metricLabel(m MetricSpec) string {
	s := m.Title
	if m.Unit != "" {
		s += " (" + m.Unit
		switch m.Better {
		case HigherIsBetter:
			s += ", higher is better"
		case LowerIsBetter:
			s += ", lower is better"
		}
		s += ")"
	}
	return cell(s)
}

func ratioCell(r *Ratio, self bool) string {
	if self {
		return "1"
	}
	if r == nil {
		return "—"
	}
	s := FormatRatio(r.Median)
	if r.N > 1 {
		s += fmt.Sprintf(" (%s–%s)", FormatRatio(r.Min), FormatRatio(r.Max))
	}
	return s
}

// FormatRatio prints a ratio with two decimals below 10 ("0.87×").
func FormatRatio(v float64) string {
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return "—"
	case v >= 10:
		return fmt.Sprintf("%.1f×", v)
	default:
		return fmt.Sprintf("%.2f×", v)
	}
}

// FormatValue prints v with three significant figures, switching to a k or
// M suffix from 100,000 on.
func FormatValue(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return "—"
	case a >= 1e8:
		return fmt.Sprintf("%.0fM", v/1e6)
	case a >= 1e7:
		return fmt.Sprintf("%.1fM", v/1e6)
	case a >= 1e6:
		return fmt.Sprintf("%.2fM", v/1e6)
	case a >= 1e5:
		return fmt.Sprintf("%.0fk", v/1e3)
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a == 0:
		return "0"
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func secs(s float64) string {
	return (time.Duration(s * float64(time.Second))).String()
}

// cell makes s safe inside a Markdown table cell.
func cell(s string) string {
	return strings.ReplaceAll(oneLine(s), "|", `\|`)
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
