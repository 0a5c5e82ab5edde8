package bench

import (
	"math"
	"slices"
)

// Median returns the median of xs: the middle value, or the mean of the two
// middle values for an even count. NaN values are ignored; the median of no
// values is NaN.
func Median(xs []float64) float64 {
	return Percentile(xs, 50)
}

// Percentile returns the p-th percentile (0 <= p <= 100) of xs with linear
// interpolation between the two closest ranks (the "type 7" estimator of R
// and NumPy's default): Percentile(xs, 0) is the minimum, 100 the maximum.
// NaN values are ignored; the percentile of no values is NaN.
func Percentile(xs []float64, p float64) float64 {
	s := finite(xs)
	if len(s) == 0 || math.IsNaN(p) {
		return math.NaN()
	}
	slices.Sort(s)
	p = math.Max(0, math.Min(100, p))
	pos := p / 100 * float64(len(s)-1)
	lo := int(math.Floor(pos))
	hi := int(math.Ceil(pos))
	if lo == hi {
		return s[lo]
	}
	frac := pos - float64(lo)
	return s[lo] + (s[hi]-s[lo])*frac
}

// MinMax returns the smallest and largest non-NaN values of xs, or two NaNs
// when there are none.
func MinMax(xs []float64) (lo, hi float64) {
	s := finite(xs)
	if len(s) == 0 {
		return math.NaN(), math.NaN()
	}
	return slices.Min(s), slices.Max(s)
}

// PairedRatios divides a[i] by b[i] for every index i where both values are
// present (not NaN) and b[i] is not zero. a and b are indexed by repetition,
// so each ratio compares two measurements taken back to back; the median of
// those ratios cancels drift of the machine that a ratio of medians would
// keep.
func PairedRatios(a, b []float64) []float64 {
	n := min(len(a), len(b))
	var out []float64
	for i := 0; i < n; i++ {
		if math.IsNaN(a[i]) || math.IsNaN(b[i]) || b[i] == 0 {
			continue
		}
		out = append(out, a[i]/b[i])
	}
	return out
}

// Ratio summarises paired ratios.
type Ratio struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"` // number of pairs
}

// SummarizeRatios returns the median, minimum and maximum of rs, or nil
// when rs is empty.
func SummarizeRatios(rs []float64) *Ratio {
	s := finite(rs)
	if len(s) == 0 {
		return nil
	}
	lo, hi := MinMax(s)
	return &Ratio{Median: Median(s), Min: lo, Max: hi, N: len(s)}
}

// finite returns a copy of xs without NaN and infinite values.
func finite(xs []float64) []float64 {
	out := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			out = append(out, x)
		}
	}
	return out
}
