package agent

import (
	"context"
	"time"
)

// runner coalesces sync requests, like kube-proxy's BoundedFrequencyRunner:
// a request marks the state dirty; a sync starts at once if the last one
// started at least minInterval ago, else when minInterval has passed. Any
// number of requests made before a sync starts are served by that one
// sync; a request made while a sync runs gets one more sync after it. So a
// burst of N events costs at most (burst duration / minInterval) + 2 syncs,
// and the worst-case delay from an event to the start of the sync that
// covers it is minInterval plus the duration of one sync in progress.
// A sync also runs every maxInterval without any request (full reconcile),
// and a failed sync is retried with exponential backoff (retryMin doubling
// up to retryMax) until one succeeds.
type runner struct {
	sync        func(context.Context) error
	minInterval time.Duration
	maxInterval time.Duration // 0: no periodic sync
	retryMin    time.Duration
	retryMax    time.Duration
	dirty       chan struct{} // capacity 1: a pending request
}

func newRunner(sync func(context.Context) error, minInterval, maxInterval time.Duration) *runner {
	return &runner{
		sync:        sync,
		minInterval: minInterval,
		maxInterval: maxInterval,
		retryMin:    500 * time.Millisecond,
		retryMax:    30 * time.Second,
		dirty:       make(chan struct{}, 1),
	}
}

// Request asks for a sync; it never blocks.
func (r *runner) Request() {
	select {
	case r.dirty <- struct{}{}:
	default: // one is pending already: it will cover this one
	}
}

// Run serves requests until ctx ends.
func (r *runner) Run(ctx context.Context) {
	var (
		last    time.Time
		backoff time.Duration
	)
	periodic := make(<-chan time.Time)
	if r.maxInterval > 0 {
		t := time.NewTicker(r.maxInterval)
		defer t.Stop()
		periodic = t.C
	}
	// Stopped until a sync fails (since Go 1.23 a stopped timer's channel
	// holds no stale value).
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.dirty:
		case <-periodic:
		case <-retry.C:
		}
		if wait := r.minInterval - time.Since(last); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		// Requests made until now are covered by this sync, which reads
		// the caches after this point.
		select {
		case <-r.dirty:
		default:
		}
		last = time.Now()
		if err := r.sync(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, r.retryMin), r.retryMax)
			retry.Reset(backoff)
			continue
		}
		backoff = 0
	}
}
