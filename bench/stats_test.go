package bench

import (
	"math"
	"testing"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestMedian(t *testing.T) {
	nan := math.NaN()
	for _, tc := range []struct {
		name string
		in   []float64
		want float64
	}{
		{"odd count", []float64{3, 1, 2}, 2},
		{"even count averages the middle two", []float64{4, 1, 3, 2}, 2.5},
		{"one value", []float64{7}, 7},
		{"NaN ignored", []float64{nan, 5, 1, nan, 3}, 3},
		{"duplicates", []float64{2, 2, 2, 9}, 2},
	} {
		if got := Median(tc.in); !near(got, tc.want) {
			t.Errorf("%s: Median(%v) = %v, want %v", tc.name, tc.in, got, tc.want)
		}
	}
	if got := Median(nil); !math.IsNaN(got) {
		t.Errorf("Median(nil) = %v, want NaN", got)
	}
	if got := Median([]float64{nan}); !math.IsNaN(got) {
		t.Errorf("Median(NaN) = %v, want NaN", got)
	}
}

func TestMedianDoesNotReorderInput(t *testing.T) {
	in := []float64{3, 1, 2}
	Median(in)
	if in[0] != 3 || in[1] != 1 || in[2] != 2 {
		t.Fatalf("Median sorted its argument: %v", in)
	}
}

func TestPercentile(t *testing.T) {
	xs := []float64{10, 9, 8, 7, 6, 5, 4, 3, 2, 1}
	for _, tc := range []struct{ p, want float64 }{
		{0, 1},
		{100, 10},
		{50, 5.5},
		{90, 9.1},  // rank 8.1 between 9 and 10
		{99, 9.91}, // rank 8.91
		{25, 3.25},
		{-5, 1},   // clamped
		{120, 10}, // clamped
	} {
		if got := Percentile(xs, tc.p); !near(got, tc.want) {
			t.Errorf("Percentile(1..10, %v) = %v, want %v", tc.p, got, tc.want)
		}
	}
	if got := Percentile([]float64{42}, 99); got != 42 {
		t.Errorf("Percentile of one value = %v, want 42", got)
	}
	if got := Percentile(nil, 50); !math.IsNaN(got) {
		t.Errorf("Percentile(nil) = %v, want NaN", got)
	}
}

func TestMinMax(t *testing.T) {
	lo, hi := MinMax([]float64{math.NaN(), 3, -1, 8})
	if lo != -1 || hi != 8 {
		t.Errorf("MinMax = %v, %v; want -1, 8", lo, hi)
	}
	lo, hi = MinMax(nil)
	if !math.IsNaN(lo) || !math.IsNaN(hi) {
		t.Errorf("MinMax(nil) = %v, %v; want NaN, NaN", lo, hi)
	}
}

func TestPairedRatios(t *testing.T) {
	nan := math.NaN()
	// Repetition 2 of b failed, repetition 4 of a failed, b is 0 in 5,
	// and a has one more repetition than b.
	a := []float64{10, 20, 30, nan, 5, 99}
	b := []float64{5, nan, 10, 7, 0}
	got := PairedRatios(a, b)
	want := []float64{2, 3}
	if len(got) != len(want) {
		t.Fatalf("PairedRatios = %v, want %v", got, want)
	}
	for i := range want {
		if !near(got[i], want[i]) {
			t.Fatalf("PairedRatios = %v, want %v", got, want)
		}
	}
}

func TestPairedRatiosMedianDiffersFromRatioOfMedians(t *testing.T) {
	// The machine slows down over the run: both paths drop together, so
	// every paired ratio is 0.5, while the ratio of medians is not.
	a := []float64{10, 5, 2.5}
	b := []float64{20, 10, 5}
	r := SummarizeRatios(PairedRatios(a, b))
	if r == nil || !near(r.Median, 0.5) || !near(r.Min, 0.5) || !near(r.Max, 0.5) || r.N != 3 {
		t.Fatalf("SummarizeRatios = %+v, want median/min/max 0.5 over 3 pairs", r)
	}
	if SummarizeRatios(nil) != nil {
		t.Fatal("SummarizeRatios(nil) != nil")
	}
}
