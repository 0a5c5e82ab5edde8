package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"
)

const (
	// crrWorkers is the number of client connections in flight.
	crrWorkers = 4
	// crrMaxLatencies bounds the latencies kept per worker.
	crrMaxLatencies = 500_000
)

// connRateWorkload is a small Go client and server: the client (4
// goroutines whose sockets are created in the client pod) connects, sends
// one byte, reads one byte and the server's close, then closes; the
// server (a listener created in the server pod) reads one byte, answers
// one and closes first, so TIME_WAIT stays on the server side and the
// client does not run out of ports. Connections that complete during the
// measured window count; the warm-up before it does not. This is the test
// that shows the cost of conntrack and of stateful rule sets.
type connRateWorkload struct{}

func (*connRateWorkload) Name() string { return "tcp-crr" }
func (*connRateWorkload) Title() string {
	return "TCP connection rate (connect, 1 byte each way, close; Go, 4 in flight)"
}
func (*connRateWorkload) Short() string { return "TCP connection rate" }
func (*connRateWorkload) Metrics() []MetricSpec {
	return []MetricSpec{
		{Name: "conns_per_s", Title: "Connections", Unit: "connections/s", Better: HigherIsBetter, Chart: true},
		{Name: "p50_us", Title: "p50 connection time", Unit: "µs", Better: LowerIsBetter},
		{Name: "p99_us", Title: "p99 connection time", Unit: "µs", Better: LowerIsBetter},
		{Name: "errors", Title: "Failed connections", Unit: "", Better: Informational},
	}
}
func (*connRateWorkload) Available() error           { return nil }
func (*connRateWorkload) Supports(t *Topology) error { return nil }
func (*connRateWorkload) Traffic() bool              { return true }

func (*connRateWorkload) Run(ctx context.Context, wc *WorkloadContext, t *Topology) (map[string]float64, error) {
	return measureConnRate(ctx, wc, t, t.Server.IP, wc.Port())
}

// measureConnRate runs the connection-rate test against dst:port, the
// server listening on its pod IP and that port (dst is the pod IP, or a
// Service address translated to it).
func measureConnRate(ctx context.Context, wc *WorkloadContext, t *Topology, dst net.IP, port int) (map[string]float64, error) {
	ln, err := t.Server.NS.Listen("tcp4", net.JoinHostPort(t.Server.IP.String(), strconv.Itoa(port)))
	if err != nil {
		return nil, fmt.Errorf("listen in server pod: %w", err)
	}
	var handlers sync.WaitGroup
	defer handlers.Wait()
	defer ln.Close()
	handlers.Add(1)
	go func() {
		defer handlers.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			handlers.Add(1)
			go func() {
				defer handlers.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				b := make([]byte, 1)
				if _, err := io.ReadFull(c, b); err == nil {
					_, _ = c.Write(b)
				}
			}()
		}
	}()

	addr := net.JoinHostPort(dst.String(), strconv.Itoa(port))
	start := time.Now().Add(wc.Omit)
	end := start.Add(wc.Duration)
	type result struct {
		done, errs int
		lat        []float64
		fatal      error
	}
	results := make([]result, crrWorkers)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := &results[i]
			res.fatal = t.Client.NS.Do(func() error {
				b := make([]byte, 1)
				for ctx.Err() == nil {
					t0 := time.Now()
					if t0.After(end) {
						return nil
					}
					err := oneConnection(addr, b)
					t1 := time.Now()
					if err != nil {
						res.errs++
						time.Sleep(time.Millisecond)
						continue
					}
					if t1.After(start) && !t1.After(end) {
						res.done++
						if len(res.lat) < crrMaxLatencies {
							res.lat = append(res.lat, float64(t1.Sub(t0))/float64(time.Microsecond))
						}
					}
				}
				return ctx.Err()
			})
		}()
	}
	wg.Wait()
	var done, errs int
	var lat []float64
	for _, r := range results {
		if r.fatal != nil {
			return nil, r.fatal
		}
		done += r.done
		errs += r.errs
		lat = append(lat, r.lat...)
	}
	if done == 0 {
		return nil, fmt.Errorf("no connection completed (%d failed)", errs)
	}
	return map[string]float64{
		"conns_per_s": float64(done) / wc.Duration.Seconds(),
		"p50_us":      Percentile(lat, 50),
		"p99_us":      Percentile(lat, 99),
		"errors":      float64(errs),
	}, nil
}

// oneConnection connects, sends one byte, reads the answer and the
// server's close, and closes.
func oneConnection(addr string, b []byte) error {
	c, err := net.DialTimeout("tcp4", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(b); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if n, err := c.Read(b); n != 0 || !errors.Is(err, io.EOF) {
		return fmt.Errorf("expected the server's close, got %d bytes, %v", n, err)
	}
	return nil
}
