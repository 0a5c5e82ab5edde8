package agent

import (
	"sync/atomic"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// noteRV keeps the highest resourceVersion seen: an older event (a
// relist delivering objects out of order across keys) never lowers it,
// and what is not an etcd revision is left out.
func TestNoteRV(t *testing.T) {
	var seen atomic.Int64
	obj := func(rv string) any { return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{ResourceVersion: rv}} }
	for _, step := range []struct {
		obj  any
		want int64
	}{
		{obj("17"), 17},
		{obj("9"), 17},
		{obj("not-a-revision"), 17},
		{obj(""), 17},
		{"not an object", 17},
		{obj("42"), 42},
	} {
		noteRV(&seen, step.obj)
		if got := seen.Load(); got != step.want {
			t.Fatalf("after %v: %d, want %d", step.obj, got, step.want)
		}
	}
	// A tombstone is unwrapped by the delete handler before noteRV.
	noteRV(&seen, cache.DeletedFinalStateUnknown{Key: "ns/p", Obj: obj("50")})
	if seen.Load() != 42 {
		t.Fatalf("a tombstone itself counted: %d", seen.Load())
	}
}
