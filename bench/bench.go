// Package bench is Tern's benchmark harness. For each path under test it
// builds the same topology on this machine (a node network namespace and
// two pod namespaces, client and server), verifies that the path is the
// path it claims to be, runs real load generators between the pods
// (iperf3, sockperf, a Go connection-rate client) and times the CNI
// control plane, interleaving the paths repetition by repetition. It
// tears everything down, checks that nothing leaked, and writes
// results.json, report.md and chart.svg into <out>/<timestamp>/.
//
// Paths: "limit" (bare veth pairs and host routes, nothing in the way),
// "reference" (the bridge and host-local CNI plugins), "ebpf" and
// "iptables" (Tern's plugin in either datapath mode).
//
// Run needs root. cmd/ternbench is its command line.
package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Defaults of a full run and of a --quick run.
const (
	DefaultReps      = 5
	DefaultDuration  = 4 * time.Second
	DefaultPods      = 100
	DefaultParallel  = 10
	QuickReps        = 1
	QuickDuration    = time.Second
	QuickPods        = 10
	DefaultOut       = "bench/results"
	omit             = time.Second // discarded warm-up of every traffic sample
	maxPods          = 200         // the pod subnets are /24s
	teardownTimeout  = 3 * time.Minute
	firstPort        = 20000
	loadSampleWindow = time.Second
)

// ErrInterrupted is returned (joined with any other error) by a run that
// SIGINT, SIGTERM or its context stopped before the end.
var ErrInterrupted = errors.New("interrupted before the end; teardown done, partial results written")

// AllPaths lists the paths in their default interleaving order.
var AllPaths = []string{PathLimit, PathReference, PathEBPF, PathIptables}

// Config is what a run measures and where it writes. The zero value of a
// field means its default.
type Config struct {
	Paths     []string      // paths, interleaved in this order; default AllPaths
	Workloads []string      // workloads; default all
	Reps      int           // repetitions; default 5 (--quick: 1)
	Duration  time.Duration // measured time of a traffic sample, whole seconds; default 4s (--quick: 1s)
	Quick     bool          // 1 repetition of 1 s, 10 control-plane pods: well under two minutes
	Out       string        // results go to Out/<timestamp>/; default bench/results
	// Pin is the CPU list given to "taskset -c" for every iperf3 and
	// sockperf process, client and server on the same CPUs; "auto" (the
	// default) pins to CPU 1 on machines with two or more CPUs, "none"
	// disables pinning.
	Pin       string
	Pods      int    // control-plane pods per phase; default 100 (--quick: 10)
	Parallel  int    // control-plane calls in flight in the parallel phase; default 10
	SourceDir string // Tern module root to build cmd/tern from; default: found from the working directory
	PluginDir string // use the CNI plugins (bridge, host-local, tern, ternctl) in this directory instead of building them
	// PolicyRules are the rule counts of the policy sweep; default
	// PolicyRuleCounts (--quick: QuickPolicyRuleCounts).
	PolicyRules []int
	// ServiceCounts are the Service counts of the Service workload;
	// default ServiceCounts (--quick: QuickServiceCounts).
	ServiceCounts []int
	Log           io.Writer
}

// RegisterFlags defines the command-line flags of cfg on fs.
func (cfg *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.Func("paths", "comma-separated paths, interleaved in this order (default "+strings.Join(AllPaths, ",")+")", func(s string) error {
		cfg.Paths = splitList(s)
		return nil
	})
	fs.Func("workloads", "comma-separated workloads (default all but services: "+strings.Join(workloadNames(), ",")+")", func(s string) error {
		cfg.Workloads = splitList(s)
		return nil
	})
	fs.IntVar(&cfg.Reps, "reps", 0, fmt.Sprintf("repetitions, paths interleaved in each (default %d, --quick %d)", DefaultReps, QuickReps))
	fs.DurationVar(&cfg.Duration, "duration", 0, fmt.Sprintf("measured time of each traffic sample, whole seconds, after a discarded %s warm-up (default %s, --quick %s)", omit, DefaultDuration, QuickDuration))
	fs.BoolVar(&cfg.Quick, "quick", false, fmt.Sprintf("%d repetition of %s and %d control-plane pods (explicit flags win)", QuickReps, QuickDuration, QuickPods))
	fs.StringVar(&cfg.Out, "out", DefaultOut, "directory under which <timestamp>/ with results.json, report.md and chart.svg is written")
	fs.StringVar(&cfg.Pin, "pin", "auto", `CPU list for "taskset -c" on every iperf3 and sockperf client and server ("auto": CPU 1 when there are 2+ CPUs; "none": no pinning)`)
	fs.IntVar(&cfg.Pods, "pods", 0, fmt.Sprintf("control plane: pods added then deleted per phase (default %d, --quick %d, at most %d)", DefaultPods, QuickPods, maxPods))
	fs.IntVar(&cfg.Parallel, "parallel", 0, fmt.Sprintf("control plane: CNI calls in flight in the parallel phase (default %d)", DefaultParallel))
	fs.StringVar(&cfg.SourceDir, "src", "", "Tern source tree to build cmd/tern from (default: the module at or above the working directory)")
	fs.StringVar(&cfg.PluginDir, "plugin-dir", "", "directory with prebuilt bridge, host-local and tern plugins and ternctl (default: build them)")
	fs.Func("policy-rules", fmt.Sprintf("comma-separated rule counts of the policy sweep (default %s, --quick %s)", intList(PolicyRuleCounts), intList(QuickPolicyRuleCounts)), func(s string) error {
		cfg.PolicyRules = nil
		for _, f := range splitList(s) {
			n, err := strconv.Atoi(strings.ReplaceAll(f, "_", ""))
			if err != nil {
				return fmt.Errorf("rule count %q: %w", f, err)
			}
			cfg.PolicyRules = append(cfg.PolicyRules, n)
		}
		if len(cfg.PolicyRules) == 0 {
			return errors.New("no rule count")
		}
		return nil
	})
	fs.Func("services", fmt.Sprintf("comma-separated Service counts of the services workload (default %s, --quick %s)", intList(ServiceCounts), intList(QuickServiceCounts)), func(s string) error {
		cfg.ServiceCounts = nil
		for _, f := range splitList(s) {
			n, err := strconv.Atoi(strings.ReplaceAll(f, "_", ""))
			if err != nil {
				return fmt.Errorf("Service count %q: %w", f, err)
			}
			cfg.ServiceCounts = append(cfg.ServiceCounts, n)
		}
		if len(cfg.ServiceCounts) == 0 {
			return errors.New("no Service count")
		}
		return nil
	})
}

func intList(ns []int) string {
	var s []string
	for _, n := range ns {
		s = append(s, strconv.Itoa(n))
	}
	return strings.Join(s, ",")
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func workloadNames() []string {
	var names []string
	for _, w := range allWorkloads() {
		names = append(names, w.Name())
	}
	return names
}

var cpuListRE = regexp.MustCompile(`^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$`)

// resolve fills in the defaults and validates.
func (cfg *Config) resolve() error {
	if len(cfg.Paths) == 0 {
		cfg.Paths = slices.Clone(AllPaths)
	}
	seen := map[string]bool{}
	for _, p := range cfg.Paths {
		if !slices.Contains(KnownPaths, p) {
			return fmt.Errorf("unknown path %q (known: %s)", p, strings.Join(KnownPaths, ", "))
		}
		if seen[p] {
			return fmt.Errorf("path %q given twice", p)
		}
		seen[p] = true
	}
	known := workloadNames()
	if len(cfg.Workloads) == 0 {
		// The Service workload runs only when named: it changes the ebpf
		// path's network (Tern's load balancer) and takes minutes.
		for _, w := range known {
			if w != servicesName {
				cfg.Workloads = append(cfg.Workloads, w)
			}
		}
	}
	for _, w := range cfg.Workloads {
		if !slices.Contains(known, w) {
			return fmt.Errorf("unknown workload %q (known: %s)", w, strings.Join(known, ", "))
		}
	}
	pick := func(v *int, full, quick int) {
		if *v == 0 {
			*v = full
			if cfg.Quick {
				*v = quick
			}
		}
	}
	pick(&cfg.Reps, DefaultReps, QuickReps)
	pick(&cfg.Pods, DefaultPods, QuickPods)
	pick(&cfg.Parallel, DefaultParallel, DefaultParallel)
	if cfg.Duration == 0 {
		cfg.Duration = DefaultDuration
		if cfg.Quick {
			cfg.Duration = QuickDuration
		}
	}
	if cfg.Reps < 1 {
		return fmt.Errorf("--reps %d: need at least 1", cfg.Reps)
	}
	if cfg.Duration < time.Second || cfg.Duration%time.Second != 0 {
		return fmt.Errorf("--duration %s: need a whole number of seconds (iperf3 and sockperf count in seconds)", cfg.Duration)
	}
	if cfg.Pods < 1 || cfg.Pods > maxPods {
		return fmt.Errorf("--pods %d: need 1 to %d (the pod subnets are /24s)", cfg.Pods, maxPods)
	}
	if cfg.Parallel < 1 {
		return fmt.Errorf("--parallel %d: need at least 1", cfg.Parallel)
	}
	if len(cfg.PolicyRules) == 0 {
		cfg.PolicyRules = slices.Clone(PolicyRuleCounts)
		if cfg.Quick {
			cfg.PolicyRules = slices.Clone(QuickPolicyRuleCounts)
		}
	}
	cfg.PolicyRules = slices.Clone(cfg.PolicyRules)
	slices.Sort(cfg.PolicyRules)
	for i, n := range cfg.PolicyRules {
		if n < 0 || n > maxPolicyRules {
			return fmt.Errorf("--policy-rules %d: need 0 to %d", n, maxPolicyRules)
		}
		if i > 0 && cfg.PolicyRules[i-1] == n {
			return fmt.Errorf("--policy-rules: %d given twice", n)
		}
	}
	if len(cfg.ServiceCounts) == 0 {
		cfg.ServiceCounts = slices.Clone(ServiceCounts)
		if cfg.Quick {
			cfg.ServiceCounts = slices.Clone(QuickServiceCounts)
		}
	}
	cfg.ServiceCounts = slices.Clone(cfg.ServiceCounts)
	slices.Sort(cfg.ServiceCounts)
	for i, n := range cfg.ServiceCounts {
		if n < 1 || n > maxServices {
			return fmt.Errorf("--services %d: need 1 to %d (the target Service is one of them)", n, maxServices)
		}
		if i > 0 && cfg.ServiceCounts[i-1] == n {
			return fmt.Errorf("--services: %d given twice", n)
		}
	}
	if cfg.Out == "" {
		cfg.Out = DefaultOut
	}
	switch cfg.Pin {
	case "", "auto":
		cfg.Pin = ""
		if runtime.NumCPU() >= 2 {
			cfg.Pin = "1"
		}
	case "none", "off":
		cfg.Pin = ""
	default:
		if !cpuListRE.MatchString(cfg.Pin) {
			return fmt.Errorf("--pin %q: want a CPU list such as 1 or 0,2-3, or auto, or none", cfg.Pin)
		}
	}
	if cfg.Pin != "" {
		if _, err := exec.LookPath("taskset"); err != nil {
			return fmt.Errorf("--pin %s: taskset not found (install util-linux or use --pin none)", cfg.Pin)
		}
	}
	if cfg.SourceDir == "" {
		cfg.SourceDir = findSourceDir()
	}
	if cfg.Log == nil {
		cfg.Log = os.Stderr
	}
	return nil
}

// runner is the state of one run.
type runner struct {
	cfg    Config
	id     string // "<pid>-<tag>", in every name the run creates
	tag    string // 6 hex digits, in link names (15 bytes at most)
	tmp    string // per-run directory: plugins, CNI cache, IPAM, state, bpffs
	binDir string
	procs  *procTracker
	port   atomic.Int32
	res    *Results
	topos  []*Topology // set up and verified, in path order
	// ternctl is the ternctl binary the policy sweep applies policy with,
	// "" if there is none (noTernctl says why).
	ternctl, noTernctl string
	// unavailable marks (workload, path) pairs found unavailable while
	// running: they are not tried again.
	unavailable map[[2]string]bool
	// crr is the connection-rate generator, built on first use.
	crr crrTool
}

func (r *runner) logf(format string, args ...any) {
	fmt.Fprintf(r.cfg.Log, "ternbench: %s %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func (r *runner) nsName(path, role string) string {
	return namePrefix + r.id + "-" + path + "-" + role
}

func (r *runner) netName(path string) string { return namePrefix + r.id + "-" + path }

func (r *runner) nextPort() int { return firstPort + int(r.port.Add(1)) }

func (r *runner) selected(path string) bool { return slices.Contains(r.cfg.Paths, path) }

// Run measures what cfg asks for and writes results.json, report.md and
// chart.svg into a new directory under cfg.Out, whose path it returns with
// the results. Everything it creates is removed before it returns, on
// error, panic and SIGINT/SIGTERM too (the signals stop the measurements,
// then teardown runs). Paths whose plugin is missing are reported
// unavailable and do not make the run fail; a path that fails setup or
// verification, a failed sample, a leak or an interruption does: the
// error lists them, and the files are still written.
func Run(ctx context.Context, cfg Config) (res *Results, dir string, err error) {
	if err := cfg.resolve(); err != nil {
		return nil, "", err
	}
	if os.Geteuid() != 0 {
		return nil, "", errors.New("ternbench needs root: it creates network namespaces, links, bpffs mounts and runs CNI plugins")
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()

	tagBytes := make([]byte, 3)
	if _, err := rand.Read(tagBytes); err != nil {
		return nil, "", err
	}
	r := &runner{cfg: cfg, tag: hex.EncodeToString(tagBytes), procs: &procTracker{}}
	r.id = fmt.Sprintf("%d-%s", os.Getpid(), r.tag)
	r.port.Store(0)
	started := time.Now()
	res = &Results{
		SchemaVersion: SchemaVersion,
		Tool:          "ternbench",
		RunID:         namePrefix + r.id,
		Started:       started,
		Config: RunConfig{
			Paths: cfg.Paths, Workloads: cfg.Workloads, Reps: cfg.Reps,
			DurationSec: cfg.Duration.Seconds(), OmitSec: omit.Seconds(), Quick: cfg.Quick,
			Pin: cfg.Pin, Pods: cfg.Pods, Parallel: cfg.Parallel,
		},
	}
	if slices.Contains(cfg.Workloads, policySweepName) {
		res.Config.PolicyRules = cfg.PolicyRules
	}
	if slices.Contains(cfg.Workloads, servicesName) {
		res.Config.ServiceCounts = cfg.ServiceCounts
	}
	r.res = res
	if dir, err = makeOutDir(cfg.Out, started); err != nil {
		return nil, "", err
	}
	if removed := r.sweepStale(); len(removed) > 0 {
		r.logf("removed what dead runs left behind: %s", strings.Join(removed, ", "))
	}
	if r.tmp, err = os.MkdirTemp("", namePrefix+r.id+"-"); err != nil {
		return nil, "", err
	}

	defer func() {
		r.teardown(ctx)
		if werr := res.WriteFiles(dir); werr != nil {
			res.Errors = append(res.Errors, werr.Error())
		}
		if res.Interrupted && errors.Is(err, ctx.Err()) {
			err = ErrInterrupted
		}
		err = errors.Join(err, r.verdict())
		r.logf("results in %s", dir)
	}()

	r.logf("run %s: paths %s, workloads %s, %d rep(s) of %s; sampling foreign load for %s",
		res.RunID, strings.Join(cfg.Paths, ","), strings.Join(cfg.Workloads, ","), cfg.Reps, cfg.Duration, loadSampleWindow)
	res.Env = collectEnv(ctx, cfg.SourceDir)
	res.Env.LoadBefore = readLoad(ctx, loadSampleWindow)
	return res, dir, r.execute(ctx)
}

// execute builds the plugins, sets up the paths and runs the repetitions.
func (r *runner) execute(ctx context.Context) error {
	res := r.res
	unavailable := r.buildPlugins(ctx, res.Env.PluginsVersion)
	for _, name := range r.cfg.Paths {
		if ctx.Err() != nil {
			break
		}
		pr := PathResult{Name: name, Description: pathDescriptions[name]}
		if d, ok := xnodeDescriptions[name]; ok {
			pr.Description = d
		}
		if d, ok := servicePathDescriptions[name]; ok {
			pr.Description = d
		} else if d, ok := nodePortDescriptions[name]; ok {
			pr.Description = d
		} else if name == PathEBPF && r.servicesSelected() {
			pr.Description = ebpfDescription + `, "services": "ebpf": Tern's own Service load balancer (Services applied with ternctl)`
		}
		if reason, ok := unavailable[name]; ok {
			pr.Status, pr.Reason = StatusUnavailable, reason
			r.logf("path %s unavailable: %s", name, reason)
			res.Paths = append(res.Paths, pr)
			res.NotMeasured = append(res.NotMeasured, fmt.Sprintf("path %s — unavailable: %s", name, oneLine(reason)))
			continue
		}
		r.logf("setting up path %s", name)
		t, err := r.setupPath(ctx, name)
		if err != nil {
			if t != nil {
				if cerr := t.Close(context.WithoutCancel(ctx)); cerr != nil {
					res.Errors = append(res.Errors, cerr.Error())
				}
			}
			if ctx.Err() != nil {
				break
			}
			pr.Status, pr.Reason = StatusFailed, err.Error()
			r.logf("path %s FAILED: %v", name, err)
			res.Paths = append(res.Paths, pr)
			continue
		}
		pr.Status, pr.Checks = StatusOK, t.checks
		for _, c := range t.checks {
			r.logf("  %s: %s", name, c)
		}
		res.Paths = append(res.Paths, pr)
		r.topos = append(r.topos, t)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}

	var runnable []Workload
	for _, w := range allWorkloads() {
		if !slices.Contains(r.cfg.Workloads, w.Name()) {
			continue
		}
		if ps, ok := w.(*policySweepWorkload); ok {
			ps.counts = r.cfg.PolicyRules
		}
		if sw, ok := w.(*servicesWorkload); ok {
			sw.counts = r.cfg.ServiceCounts
		}
		wr := WorkloadResult{Name: w.Name(), Title: w.Title(), Short: w.Short(), Metrics: w.Metrics(), Status: StatusOK}
		if err := w.Available(); err != nil {
			wr.Status, wr.Reason = StatusUnavailable, err.Error()
			res.NotMeasured = append(res.NotMeasured, fmt.Sprintf("%s — %s", w.Name(), err))
			res.Workloads = append(res.Workloads, wr)
			continue
		}
		for _, t := range r.topos {
			if err := t.supports(w); err != nil {
				if wr.NotApplicable == nil {
					wr.NotApplicable = make(map[string]string)
				}
				wr.NotApplicable[t.Path] = "n/a: " + err.Error()
				res.NotMeasured = append(res.NotMeasured, fmt.Sprintf("%s on %s — n/a: %s", w.Name(), t.Path, err))
			}
		}
		res.Workloads = append(res.Workloads, wr)
		runnable = append(runnable, w)
	}

	wc := &WorkloadContext{Duration: r.cfg.Duration, Omit: omit, Pin: r.cfg.Pin, Pods: r.cfg.Pods, Parallel: r.cfg.Parallel,
		PolicyRules: r.cfg.PolicyRules, r: r}
	// Two phases, each interleaving the paths repetition by repetition:
	// the workloads that leave state behind on a path run last.
	var first, last []Workload
	for _, w := range runnable {
		if runsLast(w) {
			last = append(last, w)
		} else {
			first = append(first, w)
		}
	}
	for _, phase := range [][]Workload{first, last} {
		for rep := 1; rep <= r.cfg.Reps && len(phase) > 0; rep++ {
			wc.Rep = rep
			for _, w := range phase {
				for step := 0; step < stepsOf(w); step++ {
					wc.Step = step
					for _, t := range slices.Clone(r.topos) {
						if t.supports(w) != nil || res.Path(t.Path).Status != StatusOK || r.unavailable[[2]string{w.Name(), t.Path}] {
							continue
						}
						if ctx.Err() != nil {
							return ctx.Err()
						}
						r.sample(ctx, wc, w, t)
					}
				}
				wc.Step = 0
			}
		}
	}
	return ctx.Err()
}

var pathDescriptions = map[string]string{
	PathLimit:     limitDescription,
	PathReference: referenceDescription,
	PathEBPF:      ebpfDescription,
	PathIptables:  iptablesDescription,
}

func (r *runner) setupPath(ctx context.Context, name string) (*Topology, error) {
	switch name {
	case PathLimit:
		return r.setupLimit(ctx)
	case PathReference:
		return r.setupReference(ctx)
	case PathEBPF, PathIptables:
		if name == PathEBPF && r.servicesSelected() {
			return r.setupServicePath(ctx, name)
		}
		t, err := r.setupTern(ctx, name, name, nil)
		if err != nil {
			return t, err
		}
		return t, r.finish(ctx, t)
	case PathDirect, PathKubeProxy, PathIptablesKubeProxy:
		return r.setupServicePath(ctx, name)
	case PathLimitXNode, PathEBPFNative, PathEBPFVXLAN, PathIptablesNative, PathIptablesVXLAN:
		return r.setupXNode(ctx, name)
	case PathNodePortTC, PathNodePortXDP:
		return r.setupNodePort(ctx, name)
	}
	return nil, fmt.Errorf("unknown path %q", name)
}

// sample runs w once on t, with the path's checks around it, and records
// the sample. A failed check fails the path for the rest of the run.
func (r *runner) sample(ctx context.Context, wc *WorkloadContext, w Workload, t *Topology) {
	s := Sample{Path: t.Path, Workload: w.Name(), Rep: wc.Rep, Start: time.Now()}
	var err error
	if w.Traffic() {
		if err = t.verifier.before(ctx); err != nil {
			r.failPath(t, err)
		}
	}
	var m map[string]float64
	if err == nil {
		m, err = w.Run(ctx, wc, t)
		if err == nil && w.Traffic() {
			if err = t.verifier.after(ctx); err != nil {
				r.failPath(t, err)
			}
		}
	}
	var un *unavailableError
	if errors.As(err, &un) && ctx.Err() == nil {
		r.markUnavailable(w, t, un.reason)
		return
	}
	if err != nil {
		if ctx.Err() != nil {
			return // interrupted: not a measurement
		}
		s.Error = err.Error()
		r.logf("rep %d/%d %-10s %-9s ERROR %v", wc.Rep, r.cfg.Reps, w.Name(), t.Path, err)
	} else {
		s.Metrics = make(map[string]float64, len(m))
		for k, v := range m {
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				s.Metrics[k] = v
			}
		}
		r.logf("rep %d/%d %-10s %-9s %s", wc.Rep, r.cfg.Reps, w.Name(), t.Path, headline(w, s.Metrics))
	}
	r.res.Samples = append(r.res.Samples, s)
}

// markUnavailable records that w cannot run on t's path, found out while
// running: reported with the reason, not a failure, not tried again.
func (r *runner) markUnavailable(w Workload, t *Topology, reason string) {
	if r.unavailable == nil {
		r.unavailable = make(map[[2]string]bool)
	}
	r.unavailable[[2]string{w.Name(), t.Path}] = true
	if wr := r.res.Workload(w.Name()); wr != nil {
		if wr.NotApplicable == nil {
			wr.NotApplicable = make(map[string]string)
		}
		wr.NotApplicable[t.Path] = unavailablePrefix + reason
	}
	r.res.NotMeasured = append(r.res.NotMeasured, fmt.Sprintf("%s on %s — unavailable: %s", w.Name(), t.Path, oneLine(reason)))
	r.logf("%s on %s UNAVAILABLE: %s", w.Name(), t.Path, oneLine(reason))
}

// unavailablePrefix starts the NotApplicable reason of a workload found
// unavailable on a path while running (others start with "n/a: ").
const unavailablePrefix = "unavailable: "

func (r *runner) failPath(t *Topology, err error) {
	pr := r.res.Path(t.Path)
	pr.Status, pr.Reason = StatusFailed, err.Error()
	r.logf("path %s FAILED verification: %v", t.Path, err)
}

// headline formats the charted metrics of a sample for the log.
func headline(w Workload, m map[string]float64) string {
	switch w.Name() {
	case policySweepName:
		return "done (one line per rule count above)"
	case servicesName:
		return "done (line above)"
	}
	var parts []string
	for _, spec := range w.Metrics() {
		if v, ok := m[spec.Name]; ok && spec.Chart {
			parts = append(parts, fmt.Sprintf("%s %s %s", spec.Title, FormatValue(v), spec.Unit))
		}
	}
	return strings.Join(parts, ", ")
}

// teardown closes every topology, removes the run's directory, checks for
// leaks and samples the load again.
func (r *runner) teardown(ctx context.Context) {
	res := r.res
	res.Interrupted = ctx.Err() != nil
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), teardownTimeout)
	defer cancel()
	r.logf("tearing down")
	r.procs.stopAll()
	for i := len(r.topos) - 1; i >= 0; i-- {
		if err := r.topos[i].Close(cctx); err != nil {
			res.Errors = append(res.Errors, err.Error())
		}
	}
	r.topos = nil
	if r.tmp != "" {
		if m := mountsContaining(r.tmp); len(m) > 0 {
			res.Errors = append(res.Errors, fmt.Sprintf("not removing %s: still mounted: %s", r.tmp, strings.Join(m, ", ")))
		} else if err := os.RemoveAll(r.tmp); err != nil {
			res.Errors = append(res.Errors, err.Error())
		}
	}
	res.Leaks = r.leakCheck(cctx)
	if len(res.Leaks) > 0 {
		r.logf("LEAK CHECK: %s", strings.Join(res.Leaks, "; "))
	} else {
		r.logf("leak check: nothing left behind")
	}
	res.Env.LoadAfter = readLoad(cctx, loadSampleWindow)
	res.Env.ForeignLoad = foreignLoadWarning(res.Env.LoadBefore, res.Env.LoadAfter)
	if res.Env.ForeignLoad != "" {
		r.logf("foreign load: %s", res.Env.ForeignLoad)
	}
	res.Finished = time.Now()
	sort.SliceStable(res.Samples, func(i, j int) bool { return res.Samples[i].Rep < res.Samples[j].Rep })
	res.Summarize()
}

// verdict is the run's error: failed paths, failed samples, leaks,
// teardown errors, interruption. Unavailable paths are not errors.
func (r *runner) verdict() error {
	res := r.res
	var errs []error
	for _, p := range res.Paths {
		if p.Status == StatusFailed {
			errs = append(errs, fmt.Errorf("path %s failed: %s", p.Name, p.Reason))
		}
	}
	for _, s := range res.Samples {
		if s.Error != "" {
			errs = append(errs, fmt.Errorf("rep %d %s on %s: %s", s.Rep, s.Workload, s.Path, s.Error))
		}
	}
	for _, e := range res.Errors {
		errs = append(errs, errors.New(e))
	}
	for _, l := range res.Leaks {
		errs = append(errs, errors.New("leak: "+l))
	}
	return errors.Join(errs...)
}

// makeOutDir creates out/<UTC timestamp>[-n]/.
func makeOutDir(out string, t time.Time) (string, error) {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return "", fmt.Errorf("create %s: %w", out, err)
	}
	base := filepath.Join(out, t.UTC().Format("20060102-150405"))
	dir := base
	for i := 2; ; i++ {
		err := os.Mkdir(dir, 0o755)
		if err == nil {
			return dir, nil
		}
		if !errors.Is(err, os.ErrExist) || i > 100 {
			return "", fmt.Errorf("create %s: %w", dir, err)
		}
		dir = fmt.Sprintf("%s-%d", base, i)
	}
}

// PrintCatalog writes the known paths and workloads with a line each.
func PrintCatalog(w io.Writer) {
	fmt.Fprintln(w, "paths (interleaved in this order by default):")
	for _, p := range AllPaths {
		fmt.Fprintf(w, "  %-10s %s\n", p, pathDescriptions[p])
	}
	fmt.Fprintln(w, "Service paths (only when named in --paths; with the services workload, ebpf runs Tern's load balancer):")
	for _, p := range ServicePaths {
		fmt.Fprintf(w, "  %-19s %s\n", p, servicePathDescriptions[p])
	}
	fmt.Fprintln(w, "workloads:")
	for _, wl := range allWorkloads() {
		fmt.Fprintf(w, "  %-12s %s\n", wl.Name(), wl.Title())
	}
}
