package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// cniWorkload times the control plane: CNI ADD of Pods pods one after the
// other, then their DEL, then the same with Parallel calls in flight. The
// pods' namespaces are created before and deleted after the timed calls.
// Only the libcni call is timed (plugin exec, IPAM, wiring, result).
type cniWorkload struct{}

func (*cniWorkload) Name() string { return "cni" }
func (*cniWorkload) Title() string {
	return "Control plane: CNI ADD/DEL latency"
}

func (*cniWorkload) Short() string { return "CNI control plane" }

func (*cniWorkload) Metrics() []MetricSpec {
	var out []MetricSpec
	for _, ph := range []struct{ key, title string }{{"seq", "sequential"}, {"par", "parallel"}} {
		for _, op := range []string{"add", "del"} {
			for _, q := range []string{"p50", "p99"} {
				out = append(out, MetricSpec{
					Name:   fmt.Sprintf("%s_%s_%s_ms", ph.key, op, q),
					Title:  fmt.Sprintf("%s %s, %s", upper(op), q, ph.title),
					Unit:   "ms",
					Better: LowerIsBetter,
					Chart:  (ph.key == "seq" && q == "p50") || (ph.key == "par" && op == "add" && q == "p99"),
				})
			}
		}
	}
	return out
}

func upper(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'a' <= c && c <= 'z' {
			b[i] = c - 'a' + 'A'
		}
	}
	return string(b)
}

func (*cniWorkload) Available() error { return nil }
func (*cniWorkload) Supports(t *Topology) error {
	if t.PodProvisioner() == nil {
		return errors.New("no CNI plugin on this path")
	}
	return nil
}
func (*cniWorkload) Traffic() bool { return false }

func (w *cniWorkload) Run(ctx context.Context, wc *WorkloadContext, t *Topology) (map[string]float64, error) {
	m := make(map[string]float64)
	for _, ph := range []struct {
		key     string
		workers int
	}{{"seq", 1}, {"par", wc.Parallel}} {
		add, del, err := cniPhase(ctx, wc, t, ph.key, ph.workers)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ph.key, err)
		}
		m[ph.key+"_add_p50_ms"] = Percentile(add, 50)
		m[ph.key+"_add_p99_ms"] = Percentile(add, 99)
		m[ph.key+"_del_p50_ms"] = Percentile(del, 50)
		m[ph.key+"_del_p99_ms"] = Percentile(del, 99)
	}
	return m, nil
}

// cniPhase adds wc.Pods pods with the given concurrency, then deletes
// them, and returns the ADD and DEL latencies in milliseconds. Whatever
// it created is gone when it returns, on error too.
func cniPhase(ctx context.Context, wc *WorkloadContext, t *Topology, phase string, workers int) (add, del []float64, err error) {
	prov := t.PodProvisioner()
	n := wc.Pods
	pods := make([]*Pod, 0, n)
	added := make([]bool, n)
	deleted := make([]bool, n)
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		var errs []error
		for i, p := range pods {
			if added[i] && !deleted[i] {
				if derr := prov.DelPod(cctx, p); derr != nil {
					errs = append(errs, derr)
				}
			}
			if cerr := p.NS.Close(); cerr != nil {
				errs = append(errs, cerr)
			}
		}
		if len(errs) > 0 {
			err = errors.Join(append([]error{err}, errs...)...)
		}
	}()
	for i := 0; i < n; i++ {
		role := fmt.Sprintf("cp%d%s%d", wc.Rep, phase, i)
		ns, err := wc.r.newNetns(t.Path, role, nil)
		if err != nil {
			return nil, nil, err
		}
		pods = append(pods, &Pod{Name: fmt.Sprintf("cp-%d-%s-%d", wc.Rep, phase, i), NS: ns, containerID: ns.Name})
	}
	add = make([]float64, n)
	err = runPool(ctx, workers, n, func(i int) error {
		added[i] = true // a failed ADD may leave state: DEL it too
		t0 := time.Now()
		err := prov.AddPod(ctx, pods[i])
		add[i] = float64(time.Since(t0)) / float64(time.Millisecond)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	del = make([]float64, n)
	err = runPool(ctx, workers, n, func(i int) error {
		t0 := time.Now()
		err := prov.DelPod(ctx, pods[i])
		del[i] = float64(time.Since(t0)) / float64(time.Millisecond)
		if err == nil {
			deleted[i] = true
		}
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return add, del, nil
}

// runPool calls f(0..n-1) with at most workers calls in flight and stops
// handing out work at the first error or when ctx ends.
func runPool(ctx context.Context, workers, n int, f func(i int) error) error {
	var (
		mu    sync.Mutex
		next  int
		first error
		wg    sync.WaitGroup
	)
	take := func() (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if first != nil || next >= n {
			return 0, false
		}
		if err := ctx.Err(); err != nil {
			first = err
			return 0, false
		}
		i := next
		next++
		return i, true
	}
	for w := 0; w < max(1, workers); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i, ok := take()
				if !ok {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}
