package bench

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Chart geometry, in SVG user units (pixels).
const (
	chartWidth  = 960
	chartCols   = 3
	panelWidth  = chartWidth / chartCols
	panelHeight = 250
	chartHeader = 80 // title and legend
	plotLeft    = 58 // room for the y tick labels and the axis title
	plotRight   = 14
	plotTop     = 42 // room for the panel title
	plotBottom  = 34 // room for the path names
	chartFont   = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""
)

// pathColors gives every known path a fixed colour, so charts of different
// runs read the same.
var pathColors = map[string]string{
	PathLimit:     "#7f7f7f",
	PathReference: "#1f77b4",
	PathEBPF:      "#2ca02c",
	PathIptables:  "#d62728",
}

var fallbackColors = []string{"#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"}

type panel struct {
	workload, metric, unit, better string
	bars                           []bar
	// groups, when set, replace bars: a group of bars (one per path) per
	// point of a sweep, labelled under the axis.
	groups []barGroup
}

type barGroup struct {
	label string
	bars  []bar
}

type bar struct {
	path          string
	med, min, max float64
}

// RenderChart draws the metrics marked Chart as bar charts grouped by
// workload: one panel per metric with its own y axis and unit, one bar per
// path (a fixed colour per path, the median as the bar, the min–max range
// as a whisker).
func RenderChart(w io.Writer, r *Results) error {
	var panels []panel
	for _, wl := range r.Workloads {
		switch wl.Name {
		case policySweepName:
			panels = append(panels, r.sweepPanels(wl, sweepChartHeading)...)
			continue
		case servicesName:
			panels = append(panels, r.sweepPanels(wl, svcChartHeading)...)
			continue
		}
		for _, m := range wl.Metrics {
			if !m.Chart {
				continue
			}
			short := wl.Short
			if short == "" {
				short = wl.Title
			}
			pn := panel{workload: short, metric: m.Title, unit: m.Unit, better: m.Better}
			for _, p := range r.Paths {
				if row := r.Row(wl.Name, m.Name, p.Name); row != nil {
					pn.bars = append(pn.bars, bar{path: p.Name, med: row.Median, min: row.Min, max: row.Max})
				}
			}
			if len(pn.bars) > 0 {
				panels = append(panels, pn)
			}
		}
	}
	colors := make(map[string]string)
	next := 0
	var legend []string
	for _, p := range r.Paths {
		if c, ok := pathColors[p.Name]; ok {
			colors[p.Name] = c
		} else {
			colors[p.Name] = fallbackColors[next%len(fallbackColors)]
			next++
		}
		if p.Status == StatusOK {
			legend = append(legend, p.Name)
		}
	}

	rows := (len(panels) + chartCols - 1) / chartCols
	height := chartHeader + max(rows, 1)*panelHeight + 10
	var b strings.Builder
	fmt.Fprintf(&b, `<?xml version="1.0" encoding="UTF-8"?>`+"\n")
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" %s font-size="12">`+"\n",
		chartWidth, height, chartWidth, height, chartFont)
	fmt.Fprintf(&b, `<title>%s</title>`+"\n", esc("Tern benchmark "+r.RunID))
	fmt.Fprintf(&b, `<rect x="0" y="0" width="%d" height="%d" fill="#ffffff"/>`+"\n", chartWidth, height)
	fmt.Fprintf(&b, `<text x="16" y="28" font-size="18" font-weight="bold">%s</text>`+"\n",
		esc(fmt.Sprintf("Tern benchmark — %s — median of %d rep(s), whiskers min–max", r.Started.UTC().Format("2006-01-02 15:04 UTC"), r.Config.Reps)))
	x := 16
	for _, name := range legend {
		fmt.Fprintf(&b, `<rect x="%d" y="46" width="14" height="14" fill="%s"/>`, x, colors[name])
		fmt.Fprintf(&b, `<text x="%d" y="58">%s</text>`+"\n", x+20, esc(name))
		x += 30 + 8*len(name) + 16
	}
	if len(panels) == 0 {
		fmt.Fprintf(&b, `<text x="16" y="%d">%s</text>`+"\n", chartHeader+30, esc("Nothing was measured."))
	}
	for i, pn := range panels {
		ox := (i % chartCols) * panelWidth
		oy := chartHeader + (i/chartCols)*panelHeight
		drawPanel(&b, pn, ox, oy, colors)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// sweepPanels draws each charted metric of the policy sweep as one panel:
// a group per rule count, a bar per path.
func (r *Results) sweepPanels(wl WorkloadResult, heading func(base string) string) []panel {
	l := r.sweepLayout(wl)
	var out []panel
	for _, spec := range l.bases {
		if !spec.Chart {
			continue
		}
		pn := panel{workload: heading(spec.Name), metric: spec.Title, unit: spec.Unit, better: spec.Better}
		any := false
		for _, n := range l.counts {
			g := barGroup{label: groupThousands(int64(n))}
			for _, path := range l.paths {
				if row := r.Row(wl.Name, sweepMetricName(spec.Name, n), path); row != nil {
					g.bars = append(g.bars, bar{path: path, med: row.Median, min: row.Min, max: row.Max})
					any = true
				}
			}
			pn.groups = append(pn.groups, g)
		}
		if any {
			out = append(out, pn)
		}
	}
	return out
}

func drawPanel(b *strings.Builder, pn panel, ox, oy int, colors map[string]string) {
	x0 := float64(ox + plotLeft)
	x1 := float64(ox + panelWidth - plotRight)
	y0 := float64(oy + panelHeight - plotBottom) // the zero line
	y1 := float64(oy + plotTop)

	fmt.Fprintf(b, `<g>`+"\n")
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="13" font-weight="bold">%s</text>`+"\n", ox+10, oy+16, esc(truncate(pn.workload, 40)))
	sub := pn.metric
	switch pn.better {
	case HigherIsBetter:
		sub += " — higher is better"
	case LowerIsBetter:
		sub += " — lower is better"
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" font-size="11" fill="#444444">%s</text>`+"\n", ox+10, oy+31, esc(truncate(sub, 50)))

	top := 0.0
	all := slices.Clone(pn.bars)
	for _, g := range pn.groups {
		all = append(all, g.bars...)
	}
	for _, br := range all {
		top = math.Max(top, math.Max(br.med, br.max))
	}
	// 10% headroom keeps the value labels above the whiskers inside the plot.
	step, top := niceScale(top * 1.1)
	scale := func(v float64) float64 {
		if top <= 0 {
			return y0
		}
		return y0 - (v/top)*(y0-y1)
	}
	// Grid lines and tick labels.
	for v := 0.0; v <= top+step/2; v += step {
		y := scale(v)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#dddddd"/>`, x0, y, x1, y)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="10" text-anchor="end">%s</text>`+"\n", x0-4, y+3, esc(tickLabel(v, step)))
	}
	// Axes and the unit.
	fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#333333"/>`, x0, y0, x1, y0)
	fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#333333"/>`+"\n", x0, y0, x0, y1)
	cy := (y0 + y1) / 2
	fmt.Fprintf(b, `<text x="%d" y="%.1f" font-size="11" text-anchor="middle" transform="rotate(-90 %d %.1f)">%s</text>`+"\n",
		ox+14, cy, ox+14, cy, esc(pn.unit))

	drawBar := func(br bar, cx, bw float64, what string, labelSize int) {
		ym := scale(br.med)
		fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s</title></rect>`+"\n",
			cx-bw/2, ym, bw, math.Max(0, y0-ym), colors[br.path],
			esc(fmt.Sprintf("%s: median %s %s (min %s, max %s)", what, FormatValue(br.med), pn.unit, FormatValue(br.min), FormatValue(br.max))))
		if br.max > br.min {
			w := math.Min(5, bw/2)
			ylo, yhi := scale(br.min), scale(br.max)
			fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#000000"/>`, cx, ylo, cx, yhi)
			fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#000000"/>`, cx-w, ylo, cx+w, ylo)
			fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#000000"/>`+"\n", cx-w, yhi, cx+w, yhi)
		}
		labelY := math.Min(ym, scale(br.max)) - 4
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="%d" text-anchor="middle">%s</text>`, cx, labelY, labelSize, esc(CompactValue(br.med)))
	}
	if len(pn.groups) > 0 {
		gslot := (x1 - x0) / float64(len(pn.groups))
		for gi, g := range pn.groups {
			gx := x0 + gslot*float64(gi)
			if len(g.bars) > 0 {
				slot := gslot * 0.9 / float64(len(g.bars))
				bw := math.Min(30, slot*0.8)
				for i, br := range g.bars {
					cx := gx + gslot*0.05 + slot*(float64(i)+0.5)
					drawBar(br, cx, bw, br.path+", "+g.label+" rules", 9)
				}
			}
			fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle">%s</text>`+"\n", gx+gslot/2, y0+16, esc(g.label))
		}
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="10" text-anchor="middle" fill="#444444">%s</text>`+"\n", (x0+x1)/2, y0+29, esc("NetworkPolicy rules"))
		fmt.Fprintf(b, "</g>\n")
		return
	}
	slot := (x1 - x0) / float64(len(pn.bars))
	bw := math.Min(44, slot*0.6)
	for i, br := range pn.bars {
		cx := x0 + slot*(float64(i)+0.5)
		drawBar(br, cx, bw, br.path, 10)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle">%s</text>`+"\n", cx, y0+16, esc(br.path))
	}
	fmt.Fprintf(b, "</g>\n")
}

// niceScale returns a tick step of 1, 2 or 5 times a power of ten and the
// smallest multiple of it at or above maxV, aiming at about four ticks.
func niceScale(maxV float64) (step, top float64) {
	if maxV <= 0 || math.IsNaN(maxV) || math.IsInf(maxV, 0) {
		return 1, 1
	}
	raw := maxV / 4
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	switch f := raw / mag; {
	case f <= 1:
		step = mag
	case f <= 2:
		step = 2 * mag
	case f <= 5:
		step = 5 * mag
	default:
		step = 10 * mag
	}
	top = math.Ceil(maxV/step) * step
	return step, top
}

// tickLabel prints an axis value with as many decimals as the step needs
// ("0", "2.5", "0.25") and a k, M or G suffix for large values.
func tickLabel(v, step float64) string {
	for _, u := range []struct {
		div    float64
		suffix string
	}{{1e9, "G"}, {1e6, "M"}, {1e3, "k"}} {
		if step >= u.div && v != 0 {
			return tickLabel(v/u.div, step/u.div) + u.suffix
		}
	}
	d := 0
	if step < 1 {
		d = int(math.Ceil(-math.Log10(step) - 1e-9))
		if math.Abs(step*math.Pow(10, float64(d))-math.Round(step*math.Pow(10, float64(d)))) > 1e-9 {
			d++
		}
	}
	return strconv.FormatFloat(v, 'f', d, 64)
}

func esc(s string) string {
	var buf bytes.Buffer
	_ = xml.EscapeText(&buf, []byte(s))
	return buf.String()
}

func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	return string(r[:n-1]) + "…"
}
