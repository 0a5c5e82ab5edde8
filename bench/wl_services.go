package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

const servicesName = "services"

// ServiceCounts are the Service counts of the Service workload;
// QuickServiceCounts those of a --quick run.
var (
	ServiceCounts      = []int{10, 1000, 10000}
	QuickServiceCounts = []int{10}
)

// svcMetrics are the figures the Service workload takes at every Service
// count; the metric names are "<name>@<count>", e.g. "conns_per_s@10000".
var svcMetrics = []sweepMetric{
	{"conns_per_s", "TCP connection rate through the Service", "connections/s", HigherIsBetter, "connection rate"},
	{"crr_p50_us", "p50 connection time", "µs", LowerIsBetter, ""},
	{"crr_p99_us", "p99 connection time", "µs", LowerIsBetter, ""},
	{"tcp_p50_us", "TCP ping-pong p50 latency", "µs", LowerIsBetter, "TCP ping-pong"},
	{"tcp_p99_us", "TCP ping-pong p99 latency", "µs", LowerIsBetter, ""},
	{"udp_p50_us", "UDP ping-pong p50 latency", "µs", LowerIsBetter, "UDP ping-pong"},
	{"udp_p99_us", "UDP ping-pong p99 latency", "µs", LowerIsBetter, ""},
	{"install_ms", "Install time from the previous count (ternctl apply/delete, or iptables-restore)", "ms", Informational, ""},
	{"nat_rules", "Rules in the node's nat table", "", Informational, ""},
	{"crr_cpu_us", "CPU per connection (tern-crr client + server, with the softirq work in their context)", "µs", LowerIsBetter, ""},
	{"crr_errors", "Failed connections", "", Informational, ""},
	{"crr_slow", "Connections over 100 ms", "", Informational, ""},
}

func svcChartHeading(base string) string {
	for _, m := range svcMetrics {
		if m.name == base && m.chart != "" {
			return "Services: " + m.chart
		}
	}
	return "Services"
}

// servicesWorkload measures a ClusterIP Service as the number of Services
// on the node grows. On each path that holds Services (ebpf with Tern's
// load balancer, direct, kube-proxy, iptables-kube-proxy), for each count
// n in ascending order:
//
//  1. the path is made to hold n Services (serviceSet.install): the target
//     Service (ClusterIP svcTargetIP, three ports, backend the server pod)
//     and n-1 others, each pointing at a dummy backend no packet reaches;
//     timed;
//  2. the tcp-crr, tcp-rr and udp-rr measurements run exactly as those
//     workloads do, but the client dials the target Service's ClusterIP
//     (direct: the server pod's IP) on ports new for this count;
//  3. the path proves that its own Service machinery translated the
//     traffic (kube-proxy: the target's KUBE-SEP DNAT rules counted
//     packets; ebpf: no DNAT rule exists in the node).
//
// Each count is a step (steppedWorkload): every path measures it before
// the next count, so the paths are interleaved count by count. Every
// Service is removed after the last count of a repetition, so the next one
// (and the policy sweep after it) starts from none. Its repetitions run
// after every other workload's: with Services in its store every CNI ADD
// of Tern compiles them, which would change the control-plane figures.
type servicesWorkload struct{ counts []int }

func (w *servicesWorkload) serviceCounts() []int {
	if len(w.counts) > 0 {
		return w.counts
	}
	return ServiceCounts
}

func (*servicesWorkload) Name() string { return servicesName }
func (w *servicesWorkload) Title() string {
	var s []string
	for _, n := range w.serviceCounts() {
		s = append(s, groupThousands(int64(n)))
	}
	return "Services: a ClusterIP with " + strings.Join(s, ", ") + " Services on the node"
}
func (*servicesWorkload) Short() string { return "Services" }

func (w *servicesWorkload) Metrics() []MetricSpec {
	var out []MetricSpec
	for _, n := range w.serviceCounts() {
		for _, m := range svcMetrics {
			out = append(out, MetricSpec{Name: sweepMetricName(m.name, n), Title: m.title, Unit: m.unit, Better: m.better, Chart: m.chart != ""})
		}
	}
	return out
}

func (*servicesWorkload) Available() error { return needTools("sockperf") }

func (*servicesWorkload) Supports(t *Topology) error {
	if t.services == nil {
		return errNoServices
	}
	return nil
}

func (*servicesWorkload) Traffic() bool  { return true }
func (*servicesWorkload) RunsLast() bool { return true }
func (w *servicesWorkload) Steps() int   { return len(w.serviceCounts()) }

// Run measures the count of step wc.Step; after the last count it
// removes every Service.
func (w *servicesWorkload) Run(ctx context.Context, wc *WorkloadContext, t *Topology) (m map[string]float64, err error) {
	set := t.services
	if set == nil {
		return nil, errNoServices
	}
	counts := w.serviceCounts()
	if wc.Step < 0 || wc.Step >= len(counts) {
		return nil, fmt.Errorf("step %d of %d Service counts", wc.Step, len(counts))
	}
	if wc.Step == len(counts)-1 {
		defer func() {
			if rerr := set.remove(context.WithoutCancel(ctx)); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}()
	}
	n := counts[wc.Step]
	m = make(map[string]float64)
	if err := w.measure(ctx, wc, t, set, n, m); err != nil {
		return nil, fmt.Errorf("%s Services: %w", groupThousands(int64(n)), err)
	}
	return m, nil
}

func (w *servicesWorkload) measure(ctx context.Context, wc *WorkloadContext, t *Topology, set serviceSet, n int, m map[string]float64) error {
	name := func(base string) string { return sweepMetricName(base, n) }
	ports := svcPorts{crr: wc.Port(), tcp: wc.Port(), udp: wc.Port()}
	inst, err := set.install(ctx, n, ports)
	if err != nil {
		return err
	}
	m[name("install_ms")] = float64(inst.took) / float64(time.Millisecond)
	if inst.natRules >= 0 {
		m[name("nat_rules")] = float64(inst.natRules)
	}
	dst := set.dst()
	crr, err := measureConnRate(ctx, wc, t, dst, ports.crr)
	if err != nil {
		return fmt.Errorf("connection rate to %s:%d: %w", dst, ports.crr, err)
	}
	m[name("conns_per_s")], m[name("crr_p50_us")], m[name("crr_p99_us")], m[name("crr_errors")], m[name("crr_slow")], m[name("crr_cpu_us")] =
		crr["conns_per_s"], crr["p50_us"], crr["p99_us"], crr["errors"], crr["slow"], crr["cpu_us"]
	for _, udp := range []bool{false, true} {
		sw := &sockperfWorkload{udp: udp}
		port := ports.tcp
		if udp {
			port = ports.udp
		}
		rr, err := sw.measure(ctx, wc, t, dst, port)
		if err != nil {
			return fmt.Errorf("%s ping-pong to %s:%d: %w", sw.proto(), dst, port, err)
		}
		m[name(sw.proto()+"_p50_us")], m[name(sw.proto()+"_p99_us")] = rr["p50_us"], rr["p99_us"]
	}
	if err := set.prove(ctx); err != nil {
		return err
	}
	wc.r.logf("rep %d/%d %s %-9s %6s Services: install %s ms, %s conn/s, TCP p50 %s µs, UDP p50 %s µs",
		wc.Rep, wc.r.cfg.Reps, servicesName, t.Path, groupThousands(int64(n)), FormatValue(m[name("install_ms")]),
		FormatValue(m[name("conns_per_s")]), FormatValue(m[name("tcp_p50_us")]), FormatValue(m[name("udp_p50_us")]))
	return nil
}
