package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ternlabs/tern/policy/manifest"
)

// recorder is a Target that remembers what it got.
type recorder struct {
	mu       sync.Mutex
	replaces int
	last     *manifest.State
}

func (r *recorder) Replace(st *manifest.State) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.replaces++
	r.last = st
	return 0, nil
}

func (r *recorder) Collect(func(string, string) bool) (int, error) { return 0, nil }

func (r *recorder) snapshot() (int, int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.last == nil {
		return r.replaces, -1
	}
	return r.replaces, len(r.last.Pods)
}

func testPod(ns, name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}},
		Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "c", Image: "busybox"}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.0.1"},
	}
}

// TestCoalescing: a burst of 1,000 pod events ends in a state with all
// 1,000 pods, reached with few syncs (each a full compile in ternd), not
// one per event.
func TestCoalescing(t *testing.T) {
	client := fake.NewClientset()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	m := newMetrics("", log)
	const minSync = time.Second
	c := newController(client, "n1", false, 0, minSync, 0, m, log)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	if err := c.start(ctx); err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	c.setTarget(rec)
	done := make(chan struct{})
	go func() { c.runner.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	waitFor(t, func() bool { n, _ := rec.snapshot(); return n >= 1 })
	const pods = 1000
	burst := time.Now()
	for i := range pods {
		if _, err := client.CoreV1().Pods("default").Create(ctx, testPod("default", fmt.Sprintf("p%d", i)), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	burstTime := time.Since(burst)
	start := time.Now()
	waitFor(t, func() bool { _, n := rec.snapshot(); return n == pods })
	syncs, _ := rec.snapshot()
	t.Logf("%d pod events in %v: %d syncs (the first before the burst); all pods in the state %v after the last create",
		pods, burstTime.Round(time.Millisecond), syncs, time.Since(start).Round(time.Millisecond))
	// The runner's bound: one sync per minSync during the burst, one
	// that was running when it started, one after it, and the first.
	if bound := int(burstTime/minSync) + 3; syncs > bound || syncs > pods/10 {
		t.Fatalf("%d syncs for %d pod events in %v: events are not coalesced (bound %d)", syncs, pods, burstTime, bound)
	}
	// A status-only update (conditions) changes nothing policy reads:
	// no sync.
	before, _ := rec.snapshot()
	p, err := client.CoreV1().Pods("default").Get(ctx, "p0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if _, err := client.CoreV1().Pods("default").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	p.Labels = map[string]string{"app": "changed"}
	if _, err := client.CoreV1().Pods("default").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return rec.last.Pods[keyOf("default", "p0")].Labels["app"] == "changed"
	})
	after, _ := rec.snapshot()
	if after-before > 2 {
		t.Fatalf("a condition update and a label update caused %d syncs, want at most 2", after-before)
	}
}

func keyOf(ns, name string) types.NamespacedName {
	return types.NamespacedName{Namespace: ns, Name: name}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 30 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
