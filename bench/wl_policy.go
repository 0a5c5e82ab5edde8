package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

const policySweepName = "policy-sweep"

// PolicyRuleCounts are the rule counts of the policy sweep;
// QuickPolicyRuleCounts those of a --quick run.
var (
	PolicyRuleCounts      = []int{0, 100, 1000, 10000}
	QuickPolicyRuleCounts = []int{0, 1000}
)

// maxPolicyRules bounds --policy-rules (the generator's port pool and the
// time an iptables update takes).
const maxPolicyRules = 30000

// deniedProbeTimeout bounds the probe that must fail while a rule set is
// in force.
const deniedProbeTimeout = time.Second

// sweepMetric is one figure the sweep takes at every rule count; the
// metric names are "<name>@<rules>", e.g. "p50_us@1000".
type sweepMetric struct {
	name, title, unit, better string
	chart                     string // chart panel heading; "" when not charted
}

var sweepMetrics = []sweepMetric{
	{"p50_us", "TCP ping-pong p50 latency", "µs", LowerIsBetter, "TCP ping-pong"},
	{"p99_us", "TCP ping-pong p99 latency", "µs", LowerIsBetter, ""},
	{"gbps", "TCP stream throughput", "Gbit/s", HigherIsBetter, "TCP stream"},
	{"conns_per_s", "TCP connection rate", "connections/s", HigherIsBetter, "TCP connection rate"},
	{"apply_ms", "Apply time (ternctl apply)", "ms", LowerIsBetter, "apply time"},
	{"remove_ms", "Removal time (ternctl delete)", "ms", Informational, ""},
	{"entries", "Compiled policy entries", "", Informational, ""},
	{"chain_rules", "Rules in the server's iptables ingress chain", "", Informational, ""},
	{"crr_errors", "Failed connections", "", Informational, ""},
}

// sweepChartHeading is the chart panel heading of a sweep metric.
func sweepChartHeading(base string) string {
	for _, m := range sweepMetrics {
		if m.name == base && m.chart != "" {
			return "Policy sweep: " + m.chart
		}
	}
	return "Policy sweep"
}

func sweepMetricName(base string, rules int) string { return base + "@" + strconv.Itoa(rules) }

// splitSweepMetric splits "p50_us@1000" into "p50_us" and 1000.
func splitSweepMetric(name string) (base string, rules int, ok bool) {
	base, n, found := strings.Cut(name, "@")
	if !found {
		return name, 0, false
	}
	rules, err := strconv.Atoi(n)
	if err != nil {
		return name, 0, false
	}
	return base, rules, true
}

// policySweepWorkload measures what NetworkPolicy costs a datapath as the
// rule count grows. For each rule count n, in ascending order, on each
// path with NetworkPolicy support (Tern's ebpf and iptables):
//
//  1. with no policy in force, a connection from the client pod to
//     sweepDeniedPort on the server pod works (the control);
//  2. the rule set SweepPolicies(n) is applied through the path's
//     PolicyApplier (`ternctl apply`, the node's policy store, the
//     datapath's ApplyPolicy), timed;
//  3. the policy is proven in force: the compiled rule set has an entry
//     per rule, TCP to an allowed port works and TCP to sweepDeniedPort
//     does not complete within 1 s — else the sample fails;
//  4. TCP ping-pong (sockperf), TCP stream (iperf3) and the TCP
//     connection rate (Go) run exactly as the tcp-rr, tcp-stream and
//     tcp-crr workloads do, between the path's checks;
//  5. the rule set is removed (`ternctl delete`), timed.
//
// Its repetitions run after every other workload's: once used, the node's
// policy store makes every later CNI ADD and DEL compile and apply policy,
// which would change the control-plane figures of the other repetitions.
type policySweepWorkload struct{ counts []int }

func (w *policySweepWorkload) ruleCounts() []int {
	if len(w.counts) > 0 {
		return w.counts
	}
	return PolicyRuleCounts
}

func (*policySweepWorkload) Name() string { return policySweepName }
func (w *policySweepWorkload) Title() string {
	var s []string
	for _, n := range w.ruleCounts() {
		s = append(s, groupThousands(int64(n)))
	}
	return "Policy sweep: " + strings.Join(s, ", ") + " NetworkPolicy rules on the server pod"
}
func (*policySweepWorkload) Short() string { return "Policy sweep" }

func (w *policySweepWorkload) Metrics() []MetricSpec {
	var out []MetricSpec
	for _, n := range w.ruleCounts() {
		for _, m := range sweepMetrics {
			out = append(out, MetricSpec{Name: sweepMetricName(m.name, n), Title: m.title, Unit: m.unit, Better: m.better, Chart: m.chart != ""})
		}
	}
	return out
}

func (*policySweepWorkload) Available() error { return needTools("iperf3", "sockperf") }

func (*policySweepWorkload) Supports(t *Topology) error {
	if t.PolicyApplier() == nil {
		if t.noPolicy != "" {
			return errors.New(t.noPolicy)
		}
		return errors.New("no NetworkPolicy support on this path")
	}
	return nil
}

func (*policySweepWorkload) Traffic() bool  { return true }
func (*policySweepWorkload) RunsLast() bool { return true }

func (w *policySweepWorkload) Run(ctx context.Context, wc *WorkloadContext, t *Topology) (m map[string]float64, err error) {
	pa := t.PolicyApplier()
	if pa == nil {
		return nil, errors.New("no NetworkPolicy support on this path")
	}
	counts := wc.PolicyRules
	if len(counts) == 0 {
		counts = w.ruleCounts()
	}
	defer func() {
		// Whatever happened, leave no policy in force.
		if _, rerr := pa.RemovePolicyRules(context.WithoutCancel(ctx)); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()
	m = make(map[string]float64)
	for _, n := range counts {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		// Each sample takes one port; a count takes a handful.
		if next := firstPort + int(wc.r.port.Load()) + 16; next > sweepAllowHi {
			return nil, fmt.Errorf("the run has used ports up to %d: the benchmark's ports must stay inside the range the sweep's policy allows (%d–%d)", next, sweepAllowLo, sweepAllowHi)
		}
		if err := w.measure(ctx, wc, t, pa, n, m); err != nil {
			var un *unavailableError
			if errors.As(err, &un) {
				return nil, err
			}
			return nil, fmt.Errorf("%s rules: %w", groupThousands(int64(n)), err)
		}
	}
	return m, nil
}

// measure runs the sweep's steps for n rules and records the metrics in m.
func (w *policySweepWorkload) measure(ctx context.Context, wc *WorkloadContext, t *Topology, pa PolicyApplier, n int, m map[string]float64) error {
	name := func(base string) string { return sweepMetricName(base, n) }

	// 1. The control: without policy the probe port answers, so its
	// failure below is the policy's doing.
	if err := probeWithRetry(ctx, t, sweepDeniedPort, 3); err != nil {
		return fmt.Errorf("without policy, TCP to the probe port %d of the server pod fails, so a failing probe would prove nothing: %w", sweepDeniedPort, err)
	}

	// 2. Apply.
	ap, err := pa.ApplyPolicyRules(ctx, n)
	if err != nil {
		return err
	}
	m[name("apply_ms")] = float64(ap.Took) / float64(time.Millisecond)

	// 3. In force, with every rule.
	if ap.Entries >= 0 {
		m[name("entries")] = float64(ap.Entries)
		if ap.Entries < n+1 {
			return fmt.Errorf("the compiled rule set has %d policy entries for %d rules and the allowing one: rules were merged, the sweep would not measure what it claims", ap.Entries, n)
		}
	}
	if ap.ChainRules >= 0 {
		m[name("chain_rules")] = float64(ap.ChainRules)
		if ap.ChainRules < n+1 {
			return fmt.Errorf("the server pod's iptables ingress chain has %d rules for %d rules and the allowing one", ap.ChainRules, n)
		}
	}
	denied := make(chan error, 1)
	go func() { denied <- probePort(ctx, t, sweepDeniedPort, deniedProbeTimeout) }()
	allowedErr := probeTCP(ctx, t, wc.Port())
	deniedErr := <-denied
	if allowedErr != nil {
		return fmt.Errorf("with the rule set in force, TCP to an allowed port fails: %w", allowedErr)
	}
	if deniedErr == nil {
		return fmt.Errorf("POLICY NOT IN FORCE: with %d rules applied, the client pod connected to port %d of the server pod, which no rule allows", n, sweepDeniedPort)
	}

	// 4. Measure, between the path's checks.
	if err := t.verifier.before(ctx); err != nil {
		wc.r.failPath(t, err)
		return err
	}
	rr, err := (&sockperfWorkload{}).Run(ctx, wc, t)
	if err != nil {
		return fmt.Errorf("TCP ping-pong: %w", err)
	}
	m[name("p50_us")], m[name("p99_us")] = rr["p50_us"], rr["p99_us"]
	st, err := (&iperfWorkload{}).Run(ctx, wc, t)
	if err != nil {
		return fmt.Errorf("TCP stream: %w", err)
	}
	m[name("gbps")] = st["gbps"]
	cr, err := (&connRateWorkload{}).Run(ctx, wc, t)
	if err != nil {
		return fmt.Errorf("TCP connection rate: %w", err)
	}
	m[name("conns_per_s")], m[name("crr_errors")] = cr["conns_per_s"], cr["errors"]
	if err := t.verifier.after(ctx); err != nil {
		wc.r.failPath(t, err)
		return err
	}

	// 5. Remove.
	took, err := pa.RemovePolicyRules(ctx)
	if err != nil {
		return err
	}
	m[name("remove_ms")] = float64(took) / float64(time.Millisecond)

	entries := "?"
	if ap.Entries >= 0 {
		entries = groupThousands(int64(ap.Entries))
	}
	wc.r.logf("rep %d/%d %s %-9s %6s rules: applied in %s ms (%s entries), p50 %s µs, %s Gbit/s, %s conn/s; removed in %s ms",
		wc.Rep, wc.r.cfg.Reps, policySweepName, t.Path, groupThousands(int64(n)), FormatValue(m[name("apply_ms")]), entries,
		FormatValue(m[name("p50_us")]), FormatValue(m[name("gbps")]), FormatValue(m[name("conns_per_s")]), FormatValue(m[name("remove_ms")]))
	return nil
}

// probePort connects from the client pod to a listener on port in the
// server pod and exchanges one byte, all within timeout. It returns nil
// when the exchange completed.
func probePort(ctx context.Context, t *Topology, port int, timeout time.Duration) error {
	addr := net.JoinHostPort(t.Server.IP.String(), strconv.Itoa(port))
	ln, err := t.Server.NS.Listen("tcp4", addr)
	if err != nil {
		return fmt.Errorf("probe listener in server pod: %w", err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(timeout))
			b := make([]byte, 1)
			if _, err := io.ReadFull(c, b); err == nil {
				_, _ = c.Write(b)
			}
			c.Close()
		}
	}()
	if err := ctx.Err(); err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	c, err := t.Client.NS.Dial("tcp4", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(deadline)
	b := []byte{'x'}
	if _, err := c.Write(b); err != nil {
		return err
	}
	_, err = io.ReadFull(c, b)
	return err
}

func probeWithRetry(ctx context.Context, t *Topology, port, tries int) error {
	var err error
	for i := 0; i < tries; i++ {
		if err = probePort(ctx, t, port, time.Second); err == nil || ctx.Err() != nil {
			return err
		}
	}
	return err
}
