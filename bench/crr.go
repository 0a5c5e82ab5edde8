package bench

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// crrSource is the connection-rate load generator (client and server in
// one C program). It is built at bench time with the machine's cc: a Go
// client tops out near 12k connections/s on this kind of machine even on
// the direct path (its per-connection goroutine, timer and runtime work
// dominate), which hides the datapath's cost; one epoll thread per side
// does not.
//
//go:embed crr/tern-crr.c
var crrSource []byte

const (
	// crrInFlight is the number of client connections kept open at once.
	crrInFlight = 8
	// crrMaxConns bounds the connections one sample starts (warm-up
	// included): each leaves a conntrack entry for 10 s (state CLOSE,
	// after the client's RST) in the node on the paths whose traffic goes
	// through its stack, and nf_conntrack_max is 262,144 per namespace.
	crrMaxConns = 150_000
)

// crrTool builds tern-crr once per run, in the run's directory.
type crrTool struct {
	once sync.Once
	path string
	err  error
}

func (c *crrTool) build(ctx context.Context, dir string) (string, error) {
	c.once.Do(func() {
		cc, err := exec.LookPath("cc")
		if err != nil {
			c.err = fmt.Errorf("the connection-rate generator is built with cc: %w", err)
			return
		}
		src := filepath.Join(dir, "tern-crr.c")
		if err := os.WriteFile(src, crrSource, 0o600); err != nil {
			c.err = err
			return
		}
		bin := filepath.Join(dir, "tern-crr")
		bctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		out, err := exec.CommandContext(bctx, cc, "-O2", "-Wall", "-o", bin, src).CombinedOutput()
		if err != nil {
			c.err = fmt.Errorf("cc tern-crr.c: %w: %s", err, lastLines(string(out), 5))
			return
		}
		c.path = bin
	})
	return c.path, c.err
}

// crrResult is what the client and server of one sample reported.
type crrResult struct {
	conns    int64   // completed inside the measured window
	errors   int64   // failed or timed out (2 s)
	window   float64 // seconds the window lasted
	p50, p99 float64 // connection time, µs
	slow     int64   // connections that took over 100 ms (a SYN retransmitted)
	answered int64   // connections the server answered (whole sample)
	// total is the connections the client completed over the whole
	// sample (warm-up included); cliCPU and srvCPU the CPU time (µs) the
	// client and server used over it.
	total          int64
	cliCPU, srvCPU float64
}

// parseCRR reads tern-crr's "key value" lines into r.
func parseCRR(out []byte, r *crrResult) error {
	sc := bufio.NewScanner(bytes.NewReader(out))
	seen := map[string]bool{}
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			return fmt.Errorf("tern-crr: %q: %w", sc.Text(), err)
		}
		seen[f[0]] = true
		switch f[0] {
		case "conns":
			r.conns = int64(v)
		case "errors":
			r.errors = int64(v)
		case "window_s":
			r.window = v
		case "p50_us":
			r.p50 = v
		case "p99_us":
			r.p99 = v
		case "over_100ms":
			r.slow = int64(v)
		case "answered":
			r.answered = int64(v)
		case "total":
			r.total = int64(v)
		case "cpu_us":
			r.cliCPU = v
		case "server_cpu_us":
			r.srvCPU = v
		}
	}
	if !seen["conns"] && !seen["answered"] {
		return fmt.Errorf("tern-crr printed nothing it should: %q", lastLines(string(out), 4))
	}
	return nil
}

// crrMetrics checks one sample and turns it into the tcp-crr metrics. A
// sample with no completed connection, or in which the server answered
// fewer connections than the client completed (the client's connections
// went somewhere else than the server under test), is an error.
func crrMetrics(r crrResult) (map[string]float64, error) {
	if r.conns <= 0 {
		return nil, fmt.Errorf("no connection completed (%d failed)", r.errors)
	}
	if r.answered < r.conns {
		return nil, fmt.Errorf("the client completed %d connections but the server under test answered %d: they did not all go to it", r.conns, r.answered)
	}
	if r.window <= 0 {
		return nil, errors.New("tern-crr: no measured window")
	}
	if r.total < r.conns || r.cliCPU <= 0 || r.srvCPU <= 0 {
		return nil, fmt.Errorf("tern-crr: %d connections in all, %d in the window, CPU %v/%v µs: inconsistent", r.total, r.conns, r.cliCPU, r.srvCPU)
	}
	return map[string]float64{
		"cpu_us":      (r.cliCPU + r.srvCPU) / float64(r.total),
		"conns_per_s": float64(r.conns) / r.window,
		"p50_us":      r.p50,
		"p99_us":      r.p99,
		"errors":      float64(r.errors),
		"slow":        float64(r.slow),
	}, nil
}
