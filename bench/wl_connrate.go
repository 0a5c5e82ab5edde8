package bench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strconv"
	"time"
)

// connRateWorkload is tern-crr (bench/crr/tern-crr.c, built at bench time
// with cc): a client in the client pod keeps crrInFlight connections open
// with non-blocking connects and epoll; each connects, sends one byte,
// reads the server's one-byte answer and aborts (SO_LINGER {1, 0}: RST, so
// no TIME_WAIT on either side and no port runs out); the server in the
// server pod (one epoll thread) answers and closes. Client and server are
// pinned like sockperf and iperf3 (--pin), so the datapath's per-connection
// work (the veths, softirq, conntrack, rules) lands on the same CPU as the
// generator and shows in the rate. Connections that complete during the
// measured window count; the warm-up before it does not. The server counts
// the connections it answered: a sample where it answered fewer than the
// client completed fails. The CPU time both processes used (getrusage,
// which counts the datapath's softirq work done in their context) over
// the connections they completed gives a cost per connection that other
// processes' load on the CPU does not change the way it changes the rate.
// This is the test that shows the cost of
// conntrack and of stateful rule sets.
type connRateWorkload struct{}

func (*connRateWorkload) Name() string { return "tcp-crr" }
func (*connRateWorkload) Title() string {
	return "TCP connection rate (connect, 1 byte each way, close; tern-crr, C and epoll, " + strconv.Itoa(crrInFlight) + " in flight)"
}
func (*connRateWorkload) Short() string { return "TCP connection rate" }
func (*connRateWorkload) Metrics() []MetricSpec {
	return []MetricSpec{
		{Name: "conns_per_s", Title: "Connections", Unit: "connections/s", Better: HigherIsBetter, Chart: true},
		{Name: "p50_us", Title: "p50 connection time", Unit: "µs", Better: LowerIsBetter},
		{Name: "p99_us", Title: "p99 connection time", Unit: "µs", Better: LowerIsBetter},
		{Name: "errors", Title: "Failed connections", Unit: "", Better: Informational},
		{Name: "slow", Title: "Connections over 100 ms", Unit: "", Better: Informational},
		{Name: "cpu_us", Title: "CPU per connection (client + server processes, with the softirq work that ran in their context)", Unit: "µs", Better: LowerIsBetter},
	}
}
func (*connRateWorkload) Available() error           { return needTools("cc") }
func (*connRateWorkload) Supports(t *Topology) error { return nil }
func (*connRateWorkload) Traffic() bool              { return true }

func (*connRateWorkload) Run(ctx context.Context, wc *WorkloadContext, t *Topology) (map[string]float64, error) {
	return measureConnRate(ctx, wc, t, t.Server.IP, wc.Port())
}

// measureConnRate runs the connection-rate test against dst:port, the
// server listening on its pod IP and that port (dst is the pod IP, or a
// Service address translated to it).
func measureConnRate(ctx context.Context, wc *WorkloadContext, t *Topology, dst net.IP, port int) (map[string]float64, error) {
	bin, err := wc.r.crr.build(ctx, wc.r.tmp)
	if err != nil {
		return nil, err
	}
	return runCRR(ctx, bin, wc, t.Client.NS, t.Server.NS, t.Server.IP, dst, port)
}

// runCRR runs one tern-crr sample: the server in srvNS bound to
// listen:port, the client in cliNS dialling dst:port.
func runCRR(ctx context.Context, bin string, wc *WorkloadContext, cliNS, srvNS *Netns, listen, dst net.IP, port int) (map[string]float64, error) {
	p := strconv.Itoa(port)
	var srvOut bytes.Buffer
	srv, err := srvNS.Start(ctx, wc.Pinned(bin, "server", listen.String(), p), &srvOut)
	if err != nil {
		return nil, err
	}
	defer srv.Stop()
	if err := srvNS.waitListening(ctx, "tcp", port, srv, 5*time.Second); err != nil {
		return nil, fmt.Errorf("tern-crr server: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, wc.Duration+wc.Omit+30*time.Second)
	defer cancel()
	out, err := cliNS.Run(cctx, wc.Pinned(bin, "client", dst.String(), p, strconv.Itoa(crrInFlight),
		strconv.FormatInt(wc.Omit.Milliseconds(), 10), strconv.FormatInt(wc.Duration.Milliseconds(), 10),
		strconv.Itoa(crrMaxConns))...)
	if err != nil {
		return nil, fmt.Errorf("tern-crr client: %w", err)
	}
	var res crrResult
	if err := parseCRR(out, &res); err != nil {
		return nil, err
	}
	// The server prints what it answered when it is stopped.
	srv.Stop()
	if err := parseCRR(srvOut.Bytes(), &res); err != nil {
		return nil, fmt.Errorf("tern-crr server: %w", err)
	}
	return crrMetrics(res)
}
