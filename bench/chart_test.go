package bench

import (
	"bytes"
	"encoding/xml"
	"io"
	"strings"
	"testing"
)

type svgStats struct {
	root       string
	elements   map[string]int
	texts      []string
	fills      map[string]bool
	attrValues []string
}

// parseSVG decodes the whole document with encoding/xml and collects what
// the tests look at; any syntax error fails the test.
func parseSVG(t *testing.T, doc []byte) svgStats {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(doc))
	st := svgStats{elements: map[string]int{}, fills: map[string]bool{}}
	depth := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("chart.svg is not well-formed XML: %v", err)
		}
		switch tk := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				st.root = tk.Name.Local
				if tk.Name.Space != "http://www.w3.org/2000/svg" {
					t.Errorf("root namespace = %q", tk.Name.Space)
				}
			}
			depth++
			st.elements[tk.Name.Local]++
			for _, a := range tk.Attr {
				st.attrValues = append(st.attrValues, a.Value)
				if a.Name.Local == "fill" {
					st.fills[a.Value] = true
				}
			}
		case xml.EndElement:
			depth--
		case xml.CharData:
			if s := strings.TrimSpace(string(tk)); s != "" {
				st.texts = append(st.texts, s)
			}
		}
	}
	if depth != 0 {
		t.Fatalf("unbalanced elements (depth %d at the end)", depth)
	}
	return st
}

func TestRenderChart(t *testing.T) {
	r := fixtureResults()
	var b bytes.Buffer
	if err := RenderChart(&b, r); err != nil {
		t.Fatal(err)
	}
	st := parseSVG(t, b.Bytes())
	if st.root != "svg" {
		t.Fatalf("root element %q", st.root)
	}
	// Charted metrics: tcp-stream gbps (4 paths), tcp-rr p50 (4 paths),
	// cni seq ADD p50, seq DEL p50, par ADD p99 (3 paths each).
	wantBars := 4 + 4 + 3*3
	bars := 0
	for _, s := range st.texts {
		if strings.Contains(s, ": median ") {
			bars++
		}
	}
	if bars != wantBars {
		t.Errorf("%d bars, want %d", bars, wantBars)
	}
	all := strings.Join(st.texts, "\n")
	for _, want := range []string{"Gbit/s", "µs", "ms", "TCP stream (iperf3)", "Throughput — higher is better", "p50 latency — lower is better", "limit", "reference", "ebpf", "iptables"} {
		if !strings.Contains(all, want) {
			t.Errorf("chart lacks the text %q", want)
		}
	}
	for _, p := range AllPaths {
		if !st.fills[pathColors[p]] {
			t.Errorf("no element in %s's colour %s", p, pathColors[p])
		}
	}
	for _, v := range st.attrValues {
		if strings.Contains(v, "NaN") || strings.Contains(v, "Inf") {
			t.Errorf("attribute value %q", v)
		}
	}
}

func TestRenderChartEmpty(t *testing.T) {
	r := &Results{SchemaVersion: SchemaVersion, RunID: "x & <y>"}
	var b bytes.Buffer
	if err := RenderChart(&b, r); err != nil {
		t.Fatal(err)
	}
	st := parseSVG(t, b.Bytes())
	if !strings.Contains(strings.Join(st.texts, " "), "Nothing was measured.") {
		t.Error("empty chart does not say so")
	}
}

func TestNiceScale(t *testing.T) {
	for _, tc := range []struct{ max, step, top float64 }{
		{16.1, 5, 20},
		{82536, 50000, 100000},
		{9.59, 5, 10},
		{433, 200, 600},
		{0, 1, 1},
		{1, 0.5, 1},
	} {
		step, top := niceScale(tc.max)
		if !near(step, tc.step) || !near(top, tc.top) {
			t.Errorf("niceScale(%v) = %v, %v; want %v, %v", tc.max, step, top, tc.step, tc.top)
		}
	}
	for _, tc := range []struct {
		v, step float64
		want    string
	}{{0, 5, "0"}, {15, 5, "15"}, {2.5, 0.5, "2.5"}, {0.25, 0.25, "0.25"}, {50000, 50000, "50k"}, {600, 200, "600"}, {2e9, 1e9, "2G"}} {
		if got := tickLabel(tc.v, tc.step); got != tc.want {
			t.Errorf("tickLabel(%v, %v) = %q, want %q", tc.v, tc.step, got, tc.want)
		}
	}
}
