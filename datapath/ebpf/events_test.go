package ebpf

import (
	"strings"
	"testing"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// TestEventDropMask holds the C list of drop reasons (EVENT_DROP_MASK in
// bpf/lib/events.h) to the metric names: a metric is a drop exactly when
// its name starts with "drop_". A drop reason added to the enum but not to
// the mask would send its events as traces, off by default.
func TestEventDropMask(t *testing.T) {
	mask, err := EventDropMask()
	if err != nil {
		t.Fatal(err)
	}
	for m := ternbpf.TernMetric(0); m < ternbpf.TernMetricMETRIC_MAX; m++ {
		isDrop := strings.HasPrefix(MetricName(m), "drop_")
		if inMask := mask&(1<<m) != 0; inMask != isDrop {
			t.Errorf("metric %s: in EVENT_DROP_MASK %v, drop by name %v", MetricName(m), inMask, isDrop)
		}
	}
	if mask>>ternbpf.TernMetricMETRIC_MAX != 0 {
		t.Errorf("EVENT_DROP_MASK %#x has bits beyond METRIC_MAX", mask)
	}
}
