package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strconv"
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
	for _, wl := range r.Workloads {
		for _, path := range sortedKeys(wl.NotApplicable) {
			if reason, ok := strings.CutPrefix(wl.NotApplicable[path], unavailablePrefix); ok {
				p("> Workload `%s` unavailable on path `%s`: %s\n\n", wl.Name, path, oneLine(reason))
			}
		}
	}
	if r.Env.ForeignLoad != "" {
		p("> **Foreign load**: %s\n\n", r.Env.ForeignLoad)
	}

	p("## Results\n\n")
	p("Median over the repetitions, with the minimum and maximum. **× limit** and **× iptables** are the median of the per-repetition ratios *this path / that path* (paired: both measured back to back in the same repetition), with their range in parentheses. For metrics where lower is better (latency), a ratio below 1 means faster than the other path; for the others, above 1 means more.\n\n")
	measured := false
	for _, wl := range r.Workloads {
		if wl.Name == policySweepName {
			if r.renderSweep(&b, wl) {
				measured = true
			}
			continue
		}
		if wl.Name == servicesName {
			if r.renderServices(&b, wl) {
				measured = true
			}
			continue
		}
		rows := r.rowsOf(wl.Name)
		if len(rows) == 0 {
			continue
		}
		measured = true
		p("### %s\n\n", wl.Title)
		p("| Metric | Path | Median | Min | Max | × limit | × iptables |\n")
		p("|---|---|--:|--:|--:|--:|--:|\n")
		var context []string
		for _, m := range wl.Metrics {
			var info []string
			for _, row := range rows {
				if row.Metric != m.Name {
					continue
				}
				if m.Better == Informational {
					info = append(info, fmt.Sprintf("%s %s", row.Path, FormatValue(row.Median)))
					continue
				}
				p("| %s | %s | %s | %s | %s | %s | %s |\n", metricLabel(m), row.Path,
					FormatValue(row.Median), FormatValue(row.Min), FormatValue(row.Max),
					ratioCell(row, row.VsLimit, PathLimit), ratioCell(row, row.VsIptables, PathIptables))
			}
			if len(info) > 0 {
				label := m.Title
				if m.Unit != "" {
					label += " (" + m.Unit + ")"
				}
				context = append(context, label+": "+strings.Join(info, ", "))
			}
		}
		p("\n")
		if len(context) > 0 {
			p("Also recorded (medians): %s.\n\n", strings.Join(context, "; "))
		}
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

// ratioCell renders a paired ratio; empty for informational metrics, 1
// on the reference path's own row.
func ratioCell(row SummaryRow, r *Ratio, base string) string {
	if row.Better == Informational {
		return ""
	}
	if row.Path == base {
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

// FormatValue prints v for a table: three significant figures below
// 1,000 ("15.6", "8.53", "0.931"), whole numbers with thousands
// separators up to a million ("81,038"), then M and G ("1.96G").
func FormatValue(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return "—"
	case a >= 1e9:
		return sig3(v/1e9) + "G"
	case a >= 1e6:
		return sig3(v/1e6) + "M"
	case a >= 999.5: // rounds to four digits
		return groupThousands(int64(math.Round(v)))
	default:
		return sig3(v)
	}
}

// CompactValue prints v in at most four characters and a suffix, for
// chart labels ("81.0k", "15.6", "1.96G").
func CompactValue(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return "—"
	case a >= 1e9:
		return sig3(v/1e9) + "G"
	case a >= 1e6:
		return sig3(v/1e6) + "M"
	case a >= 1e3:
		return sig3(v/1e3) + "k"
	default:
		return sig3(v)
	}
}

// sig3 prints v with three significant figures, keeping trailing zeros
// ("81.0", "5.00") and no exponent.
func sig3(v float64) string {
	if v == 0 {
		return "0"
	}
	d := 2 - int(math.Floor(math.Log10(math.Abs(v))))
	if d < 0 {
		d = 0
	}
	s := strconv.FormatFloat(v, 'f', d, 64)
	// Rounding may add a digit (9.995 → "10.00"): print again.
	if r, err := strconv.ParseFloat(s, 64); err == nil && d > 0 && math.Floor(math.Log10(math.Abs(r))) > math.Floor(math.Log10(math.Abs(v))) {
		s = strconv.FormatFloat(v, 'f', d-1, 64)
	}
	return s
}

func groupThousands(n int64) string {
	neg := n < 0
	if neg {
		n = -n
	}
	s := strconv.FormatInt(n, 10)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
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

// sweepLayout is what the policy sweep's tables are made of: its rule
// counts and base metrics (in the workload's order) and the paths it
// applies to.
type sweepLayout struct {
	counts []int
	bases  []MetricSpec // Name is the base name ("p50_us")
	paths  []string     // ok paths the sweep applies to (measured or found unavailable)
}

func (r *Results) sweepLayout(wl WorkloadResult) sweepLayout {
	var l sweepLayout
	seenN, seenB := map[int]bool{}, map[string]bool{}
	for _, m := range wl.Metrics {
		base, n, ok := splitSweepMetric(m.Name)
		if !ok {
			continue
		}
		if !seenN[n] {
			seenN[n] = true
			l.counts = append(l.counts, n)
		}
		if !seenB[base] {
			seenB[base] = true
			spec := m
			spec.Name = base
			l.bases = append(l.bases, spec)
		}
	}
	sort.Ints(l.counts)
	for _, pr := range r.Paths {
		if pr.Status != StatusOK {
			continue
		}
		if reason, ok := wl.NotApplicable[pr.Name]; ok && !strings.HasPrefix(reason, unavailablePrefix) {
			continue
		}
		l.paths = append(l.paths, pr.Name)
	}
	return l
}

// sweepVsFirst is the paired ratio of a path's metric at n rules to the
// same path's at the lowest rule count, repetition by repetition.
func (r *Results) sweepVsFirst(wl WorkloadResult, base string, first, n int, path string) *Ratio {
	return SummarizeRatios(PairedRatios(r.values(wl.Name, sweepMetricName(base, n), path), r.values(wl.Name, sweepMetricName(base, first), path)))
}

func ratioText(rt *Ratio) string {
	if rt == nil {
		return "—"
	}
	s := FormatRatio(rt.Median)
	if rt.N > 1 {
		s += fmt.Sprintf(" (%s–%s)", FormatRatio(rt.Min), FormatRatio(rt.Max))
	}
	return s
}

// renderSweep writes the policy sweep's section: per metric a table with
// a row per rule count and a column per path, the paired ratios against
// iptables and against the path's own figure at the lowest rule count. It
// reports whether anything was measured.
func (r *Results) renderSweep(b *strings.Builder, wl WorkloadResult) bool {
	p := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	l := r.sweepLayout(wl)
	rows := r.rowsOf(wl.Name)
	var unavailable []string
	for _, path := range l.paths {
		if reason, ok := strings.CutPrefix(wl.NotApplicable[path], unavailablePrefix); ok {
			unavailable = append(unavailable, fmt.Sprintf("**%s: unavailable** — %s", path, oneLine(reason)))
		}
	}
	if len(rows) == 0 && len(unavailable) == 0 {
		return false
	}
	p("### %s\n\n", wl.Title)
	p("For each rule count *n* the server pod is selected by NetworkPolicies with *n* ingress rules that do not match the benchmark traffic "+
		"(a third each: other TCP ports from the client pod, pods of another node, unrelated ipBlocks; one peer and one port each, so one compiled policy entry each) "+
		"and one rule that allows it (TCP %d–%d from any peer), which sorts after all of them: in the iptables rendering a new flow is tested against every one of the *n* rules first. "+
		"The rule set is applied with `ternctl apply` (the node's policy store: decode, compile, the datapath's ApplyPolicy), timed; "+
		"it is proven in force (TCP to port %d, which no rule allows, must not connect within %s, TCP to an allowed port must); "+
		"then the tcp-rr, tcp-stream and tcp-crr workloads run as above; then the rule set is removed with `ternctl delete`. "+
		"Both datapaths are stateful, so only the first packet of a connection meets the rules: one long connection (stream, ping-pong) hardly sees them, the connection rate does. "+
		"**× iptables** is the paired ratio this path / iptables at the same rule count; **× %s rules** the paired ratio to the same path at %s rules, each within one repetition. "+
		"The sweep's repetitions run after every other workload's.\n\n",
		sweepAllowLo, sweepAllowHi, sweepDeniedPort, deniedProbeTimeout, groupThousands(int64(l.counts[0])), groupThousands(int64(l.counts[0])))
	for _, u := range unavailable {
		p("%s\n\n", u)
	}
	if len(rows) == 0 {
		return false
	}
	first := l.counts[0]
	hasIpt := slices.Contains(l.paths, PathIptables)
	for _, spec := range l.bases {
		if spec.Better == Informational {
			continue
		}
		p("#### %s\n\n", metricLabel(spec))
		head := []string{"Rules"}
		align := []string{"--:"}
		head = append(head, l.paths...)
		for _, path := range l.paths {
			if hasIpt && path != PathIptables {
				head = append(head, path+" × iptables")
			}
		}
		for _, path := range l.paths {
			head = append(head, fmt.Sprintf("%s × %s rules", path, groupThousands(int64(first))))
		}
		for len(align) < len(head) {
			align = append(align, "--:")
		}
		p("| %s |\n|%s|\n", strings.Join(head, " | "), strings.Join(align, "|"))
		for _, n := range l.counts {
			cells := []string{groupThousands(int64(n))}
			for _, path := range l.paths {
				cells = append(cells, r.sweepCell(wl, spec.Name, n, path))
			}
			for _, path := range l.paths {
				if hasIpt && path != PathIptables {
					c := "—"
					if row := r.Row(wl.Name, sweepMetricName(spec.Name, n), path); row != nil {
						c = ratioText(row.VsIptables)
					}
					cells = append(cells, c)
				}
			}
			cells = append(cells, r.sweepVsFirstCells(wl, spec.Name, first, n, l.paths)...)
			p("| %s |\n", strings.Join(cells, " | "))
		}
		p("\n")
	}
	r.renderSweepInformational(b, wl, l, "Rules")
	return true
}

// sweepCell is "median (min–max)" of a sweep metric, "unavailable" on a
// path the sweep could not run on.
func (r *Results) sweepCell(wl WorkloadResult, base string, n int, path string) string {
	row := r.Row(wl.Name, sweepMetricName(base, n), path)
	if row == nil {
		if strings.HasPrefix(wl.NotApplicable[path], unavailablePrefix) {
			return "unavailable"
		}
		return "—"
	}
	s := FormatValue(row.Median)
	if row.N > 1 {
		s += fmt.Sprintf(" (%s–%s)", FormatValue(row.Min), FormatValue(row.Max))
	}
	return s
}

// sweepVsFirstCells are a sweep row's "× first count" cells, a column per
// path: 1 at the first count itself (— where the path has no figure
// there), else the paired ratio to the path's own figure at first.
func (r *Results) sweepVsFirstCells(wl WorkloadResult, base string, first, n int, paths []string) []string {
	cells := make([]string, 0, len(paths))
	for _, path := range paths {
		c := "1"
		if n != first {
			c = ratioText(r.sweepVsFirst(wl, base, first, n, path))
		} else if r.Row(wl.Name, sweepMetricName(base, n), path) == nil {
			c = "—"
		}
		cells = append(cells, c)
	}
	return cells
}

// renderSweepInformational writes a sweep's informational figures (those
// with no better direction): one table of medians, a row per count (the
// first column headed countHead) and a column per metric and path that has
// any. It writes nothing when there are none.
func (r *Results) renderSweepInformational(b *strings.Builder, wl WorkloadResult, l sweepLayout, countHead string) {
	p := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	head := []string{countHead}
	type col struct{ base, unit, path string }
	var cols []col
	for _, spec := range l.bases {
		if spec.Better != Informational {
			continue
		}
		for _, path := range l.paths {
			for _, n := range l.counts {
				if r.Row(wl.Name, sweepMetricName(spec.Name, n), path) != nil {
					label := spec.Title
					if spec.Unit != "" {
						label += " (" + spec.Unit + ")"
					}
					head = append(head, cell(label+", "+path))
					cols = append(cols, col{spec.Name, spec.Unit, path})
					break
				}
			}
		}
	}
	if len(cols) == 0 {
		return
	}
	p("Also recorded (medians):\n\n| %s |\n|%s|\n", strings.Join(head, " | "), strings.TrimSuffix(strings.Repeat("--:|", len(head)), "|"))
	for _, n := range l.counts {
		cells := []string{groupThousands(int64(n))}
		for _, c := range cols {
			v := "—"
			if row := r.Row(wl.Name, sweepMetricName(c.base, n), c.path); row != nil {
				v = FormatValue(row.Median)
				if c.unit == "" && row.Median == math.Trunc(row.Median) && math.Abs(row.Median) < 1e9 {
					v = groupThousands(int64(row.Median)) // a count
				}
			}
			cells = append(cells, v)
		}
		p("| %s |\n", strings.Join(cells, " | "))
	}
	p("\n")
}
