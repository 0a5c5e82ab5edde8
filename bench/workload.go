package bench

import (
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"time"
)

// Workload is one measurement between the pods of a topology (or of its
// control plane). A workload runs once per repetition on every path it
// supports, interleaved with the other paths.
//
// New workloads (cross-node traffic, pod churn) plug in here: declare the
// metrics, say which paths they apply to, and measure. A workload that
// leaves state on a path that would change what other workloads measure
// (the policy sweep leaves the node's policy store in use) implements
// lateWorkload: its repetitions run after every other workload's.
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

// lateWorkload is implemented by workloads whose repetitions run after all
// the repetitions of the others (still interleaving the paths).
type lateWorkload interface{ RunsLast() bool }

func runsLast(w Workload) bool {
	l, ok := w.(lateWorkload)
	return ok && l.RunsLast()
}

// steppedWorkload is implemented by workloads measured in steps (the
// Service workload: one step per Service count): each step runs on every
// path before the next starts, so the paths are interleaved step by step,
// and each step is a sample of its own (WorkloadContext.Step says which).
type steppedWorkload interface{ Steps() int }

func stepsOf(w Workload) int {
	if s, ok := w.(steppedWorkload); ok && s.Steps() > 1 {
		return s.Steps()
	}
	return 1
}

// WorkloadContext carries the run's settings to a workload.
type WorkloadContext struct {
	Rep      int           // 1-based repetition
	Duration time.Duration // measured time of a traffic sample
	Omit     time.Duration // warm-up before it, not measured
	Pin      string        // CPU list for taskset, "" for no pinning
	Pods     int           // control plane: pods per phase
	Parallel int           // control plane: concurrent CNI calls
	// PolicyRules are the rule counts of the policy sweep, ascending.
	PolicyRules []int
	// Step is the 0-based step of a steppedWorkload, 0 for the others.
	Step int

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

// allWorkloads returns the catalogue in report order.
func allWorkloads() []Workload {
	return []Workload{
		&iperfWorkload{udp: false},
		&iperfWorkload{udp: true},
		&sockperfWorkload{udp: false},
		&sockperfWorkload{udp: true},
		&connRateWorkload{},
		&cniWorkload{},
		&servicesWorkload{},
		&policySweepWorkload{},
		&nodePortWorkload{},
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
