package bench

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"time"
)

// Workload is one measurement between the pods of a topology (or of its
// control plane). A workload runs once per repetition on every path it
// supports, interleaved with the other paths.
//
// New workloads (the policy sweep, cross-node traffic, pod churn) plug in
// here: declare the metrics, say which paths they apply to, and measure.
type Workload interface {
	Name() string  // flag and JSON name, e.g. "tcp-stream"
	Title() string // report heading
	Short() string // chart panel heading, about 30 characters
	Metrics() []MetricSpec
	// Available returns why the workload cannot run on this machine at
	// all (a tool is missing), or nil.
	Available() error
	// Supports returns why the workload does not apply to the topology
	// (the control plane of the limit path), or nil.
	Supports(t *Topology) error
	// Traffic reports whether the workload moves packets between the
	// pods, so that the path's verifier checks its counters around it.
	Traffic() bool
	// Run measures once and returns the metrics by name.
	Run(ctx context.Context, wc *WorkloadContext, t *Topology) (map[string]float64, error)
}

// WorkloadContext carries the run's settings to a workload.
type WorkloadContext struct {
	Rep      int           // 1-based repetition
	Duration time.Duration // measured time of a traffic sample
	Omit     time.Duration // warm-up before it, not measured
	Pin      string        // CPU list for taskset, "" for no pinning
	Pods     int           // control plane: pods per phase
	Parallel int           // control plane: concurrent CNI calls

	r *runner
}

// Port returns a TCP/UDP port not used before in this run, so a sample
// never meets the TIME_WAIT sockets of the previous one.
func (wc *WorkloadContext) Port() int { return wc.r.nextPort() }

// Pinned prefixes argv with taskset when load generators are pinned.
func (wc *WorkloadContext) Pinned(argv ...string) []string {
	if wc.Pin == "" {
		return argv
	}
	return append([]string{"taskset", "-c", wc.Pin}, argv...)
}

// secondsArg renders a whole number of seconds for iperf3 and sockperf.
func secondsArg(d time.Duration) string {
	return strconv.Itoa(int(d.Round(time.Second) / time.Second))
}

// errPending marks a workload that is designed but waits for a feature.
var errPending = errors.New("pending")

// allWorkloads returns the catalogue in report order.
func allWorkloads() []Workload {
	return []Workload{
		&iperfWorkload{udp: false},
		&iperfWorkload{udp: true},
		&sockperfWorkload{udp: false},
		&sockperfWorkload{udp: true},
		&connRateWorkload{},
		&cniWorkload{},
		&policySweepWorkload{},
	}
}

func needTools(tools ...string) error {
	for _, t := range tools {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("%s not found in PATH", t)
		}
	}
	return nil
}

// policySweepWorkload will measure TCP stream, TCP ping-pong and
// connection rate with 0, 100, 1,000 and 10,000 NetworkPolicy rules
// selecting the server pod, through Topology.PolicyApplier, with metrics
// named "<metric>@<rules>" (e.g. "gbps@1000"). It is in the catalogue so
// that it can be selected and reported, but is not implemented: Tern has
// no NetworkPolicy support yet.
type policySweepWorkload struct{}

// PolicyRuleCounts are the rule counts the sweep will measure.
var PolicyRuleCounts = []int{0, 100, 1000, 10000}

func (*policySweepWorkload) Name() string { return "policy-sweep" }
func (*policySweepWorkload) Title() string {
	return "Policy sweep (0, 100, 1,000, 10,000 rules)"
}
func (*policySweepWorkload) Short() string         { return "Policy sweep" }
func (*policySweepWorkload) Metrics() []MetricSpec { return nil }
func (*policySweepWorkload) Available() error {
	return fmt.Errorf("%w NetworkPolicy support", errPending)
}
func (*policySweepWorkload) Supports(t *Topology) error {
	if t.PolicyApplier() == nil {
		return fmt.Errorf("%w NetworkPolicy support", errPending)
	}
	return nil
}
func (*policySweepWorkload) Traffic() bool { return true }
func (*policySweepWorkload) Run(context.Context, *WorkloadContext, *Topology) (map[string]float64, error) {
	return nil, fmt.Errorf("policy sweep: %w NetworkPolicy support", errPending)
}
