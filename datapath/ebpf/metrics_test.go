package ebpf

import (
	"fmt"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// TestMetricNames keeps metricTable in step with the C enum metric, read
// from the object's BTF: one name per enumerator below METRIC_MAX, in enum
// order, lower-cased and without the METRIC_ prefix, each with a
// description.
func TestMetricNames(t *testing.T) {
	spec, err := ternbpf.LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("metric", &enum); err != nil {
		t.Fatalf("enum metric in BTF: %v", err)
	}

	var maxValue uint64
	seen := map[uint64]bool{}
	for _, v := range enum.Values {
		if v.Name == "METRIC_MAX" {
			maxValue = v.Value
			continue
		}
		seen[v.Value] = true
		want := strings.ToLower(strings.TrimPrefix(v.Name, "METRIC_"))
		if v.Value >= uint64(len(metricTable)) {
			t.Errorf("C %s = %d has no entry in metricTable (len %d)", v.Name, v.Value, len(metricTable))
			continue
		}
		if got := metricTable[v.Value].name; got != want {
			t.Errorf("metricTable[%d].name = %q, C enumerator %s wants %q", v.Value, got, v.Name, want)
		}
		if d, ok := MetricDescription(want); !ok || d == "" {
			t.Errorf("metric %s (%d) has no description in metricTable", want, v.Value)
		}
		if got := MetricName(ternbpf.TernMetric(v.Value)); got != want {
			t.Errorf("MetricName(%d) = %q, want %q", v.Value, got, want)
		}
	}
	if maxValue == 0 {
		t.Fatal("enum metric has no METRIC_MAX")
	}
	if uint64(len(metricTable)) != maxValue {
		t.Errorf("metricTable has %d metrics, C METRIC_MAX is %d", len(metricTable), maxValue)
	}
	for i := range maxValue {
		if !seen[i] {
			t.Errorf("C enum metric has no value %d below METRIC_MAX", i)
		}
	}
	if got, want := MetricName(ternbpf.TernMetric(maxValue)), fmt.Sprintf("metric_%d", maxValue); got != want {
		t.Errorf("MetricName(METRIC_MAX) = %q, want %q", got, want)
	}
}
