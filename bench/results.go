package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"time"
)

// SchemaVersion is the version of the results.json layout. Bump it when a
// field changes meaning or disappears; adding a field does not need it.
const SchemaVersion = 1

// Path statuses.
const (
	StatusOK          = "ok"          // set up, verified, measured
	StatusUnavailable = "unavailable" // a prerequisite is missing (binary does not build, tool absent)
	StatusFailed      = "failed"      // setup failed or the path is not the path it claims
)

// Directions of a metric.
const (
	HigherIsBetter = "higher"
	LowerIsBetter  = "lower"
	Informational  = "" // context only (bytes moved, error counts): no ratio is meaningful
)

// Results is everything a run measured: the content of results.json.
type Results struct {
	SchemaVersion int       `json:"schemaVersion"`
	Tool          string    `json:"tool"`
	RunID         string    `json:"runID"`
	Started       time.Time `json:"started"`
	Finished      time.Time `json:"finished"`
	Interrupted   bool      `json:"interrupted,omitempty"`

	Config    RunConfig        `json:"config"`
	Env       Env              `json:"env"`
	Paths     []PathResult     `json:"paths"`
	Workloads []WorkloadResult `json:"workloads"`
	Samples   []Sample         `json:"samples"`
	Summary   []SummaryRow     `json:"summary"`

	// NotMeasured lists what was asked for (or designed) but not measured,
	// with the reason, e.g. "policy-sweep on reference — n/a: the reference
	// bridge plugin does not implement NetworkPolicy".
	NotMeasured []string `json:"notMeasured,omitempty"`
	// Errors are failures that make the run's exit status non-zero.
	Errors []string `json:"errors,omitempty"`
	// Leaks is what the final leak check found left behind.
	Leaks []string `json:"leaks,omitempty"`
}

// RunConfig is the resolved configuration of a run.
type RunConfig struct {
	Paths       []string `json:"paths"`
	Workloads   []string `json:"workloads"`
	Reps        int      `json:"reps"`
	DurationSec float64  `json:"durationSec"`
	OmitSec     float64  `json:"omitSec"`
	Quick       bool     `json:"quick"`
	Pin         string   `json:"pin"` // CPU list given to taskset, "" when not pinned
	Pods        int      `json:"pods"`
	Parallel    int      `json:"parallel"`
	PolicyRules []int    `json:"policyRules,omitempty"` // rule counts of the policy sweep
	// ServiceCounts are the Service counts of the services workload.
	ServiceCounts []int `json:"serviceCounts,omitempty"`
}

// Env describes the machine and the software under test.
type Env struct {
	Kernel          string `json:"kernel"`
	CPUModel        string `json:"cpuModel"`
	NProc           int    `json:"nproc"`
	Iperf3Version   string `json:"iperf3Version"`
	SockperfVersion string `json:"sockperfVersion"`
	GoVersion       string `json:"goVersion"`
	TernCommit      string `json:"ternCommit"`
	PluginsVersion  string `json:"pluginsVersion"` // containernetworking/plugins used for the reference path
	BrNetfilter     bool   `json:"brNetfilter"`    // br_netfilter loaded: bridged traffic walks iptables
	LoadBefore      Load   `json:"loadBefore"`
	LoadAfter       Load   `json:"loadAfter"`
	// ForeignLoad is a warning when the machine was busy with other work
	// before or after the run; empty when it looked idle.
	ForeignLoad string `json:"foreignLoad,omitempty"`
}

// Load is the load average and the CPU use of the whole machine over a
// one-second window in which the harness itself is idle.
type Load struct {
	Load1       float64 `json:"load1"`
	Load5       float64 `json:"load5"`
	Load15      float64 `json:"load15"`
	BusyPercent float64 `json:"busyPercent"`
}

// PathResult is the state of one path at the end of the run.
type PathResult struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Status      string `json:"status"`
	Reason      string `json:"reason,omitempty"`
	// Checks are the verifications that passed ("tcx ingress program
	// tern_pod on tbe1a2b3c", "FORWARD counting rule: 0 packets").
	Checks []string `json:"checks,omitempty"`
}

// MetricSpec describes one number a workload reports.
type MetricSpec struct {
	Name   string `json:"name"`
	Title  string `json:"title"`
	Unit   string `json:"unit"`
	Better string `json:"better"`
	Chart  bool   `json:"chart,omitempty"` // drawn in chart.svg
}

// WorkloadResult describes one workload of the run.
type WorkloadResult struct {
	Name    string       `json:"name"`
	Title   string       `json:"title"`
	Short   string       `json:"short,omitempty"` // chart heading
	Status  string       `json:"status"`          // StatusOK or StatusUnavailable
	Reason  string       `json:"reason,omitempty"`
	Metrics []MetricSpec `json:"metrics"`
	// NotApplicable maps a path to the reason the workload does not apply
	// to it (the control plane of the limit path, for instance).
	NotApplicable map[string]string `json:"notApplicable,omitempty"`
}

// Sample is one workload run once on one path.
type Sample struct {
	Path     string             `json:"path"`
	Workload string             `json:"workload"`
	Rep      int                `json:"rep"` // 1-based
	Start    time.Time          `json:"start"`
	Metrics  map[string]float64 `json:"metrics,omitempty"`
	Error    string             `json:"error,omitempty"`
}

// SummaryRow aggregates one metric of one workload on one path over the
// repetitions.
type SummaryRow struct {
	Workload string  `json:"workload"`
	Metric   string  `json:"metric"`
	Unit     string  `json:"unit"`
	Better   string  `json:"better"`
	Path     string  `json:"path"`
	N        int     `json:"n"`
	Median   float64 `json:"median"`
	Min      float64 `json:"min"`
	Max      float64 `json:"max"`
	// VsLimit and VsIptables are the paired ratios this path / the other
	// path over the repetitions; nil when the other path has no value.
	VsLimit    *Ratio `json:"vsLimit,omitempty"`
	VsIptables *Ratio `json:"vsIptables,omitempty"`
}

// Path returns the result of the named path, or nil.
func (r *Results) Path(name string) *PathResult {
	for i := range r.Paths {
		if r.Paths[i].Name == name {
			return &r.Paths[i]
		}
	}
	return nil
}

// Workload returns the result of the named workload, or nil.
func (r *Results) Workload(name string) *WorkloadResult {
	for i := range r.Workloads {
		if r.Workloads[i].Name == name {
			return &r.Workloads[i]
		}
	}
	return nil
}

// Row returns the summary row of (workload, metric, path), or nil.
func (r *Results) Row(workload, metric, path string) *SummaryRow {
	for i := range r.Summary {
		s := &r.Summary[i]
		if s.Workload == workload && s.Metric == metric && s.Path == path {
			return s
		}
	}
	return nil
}

// values returns the metric of (workload, path) indexed by repetition
// (0-based), NaN where the sample failed or is missing.
func (r *Results) values(workload, metric, path string) []float64 {
	out := make([]float64, r.Config.Reps)
	for i := range out {
		out[i] = math.NaN()
	}
	for _, s := range r.Samples {
		if s.Workload != workload || s.Path != path || s.Error != "" {
			continue
		}
		v, ok := s.Metrics[metric]
		if !ok || s.Rep < 1 {
			continue
		}
		for len(out) < s.Rep {
			out = append(out, math.NaN())
		}
		out[s.Rep-1] = v
	}
	return out
}

// Summarize recomputes r.Summary from r.Samples: for every workload,
// metric and path whose status is ok, the median, minimum and maximum over
// the repetitions, and the median of the paired ratios against the limit
// and iptables paths.
func (r *Results) Summarize() {
	r.Summary = nil
	okPaths := make(map[string]bool)
	for _, p := range r.Paths {
		okPaths[p.Name] = p.Status == StatusOK
	}
	for _, w := range r.Workloads {
		for _, m := range w.Metrics {
			limit := r.values(w.Name, m.Name, PathLimit)
			ipt := r.values(w.Name, m.Name, PathIptables)
			for _, p := range r.Paths {
				if !okPaths[p.Name] {
					continue
				}
				vals := r.values(w.Name, m.Name, p.Name)
				n := len(finite(vals))
				if n == 0 {
					continue
				}
				lo, hi := MinMax(vals)
				row := SummaryRow{
					Workload: w.Name, Metric: m.Name, Unit: m.Unit, Better: m.Better, Path: p.Name,
					N: n, Median: Median(vals), Min: lo, Max: hi,
				}
				base, cross := crossNodeBaselines[p.Name]
				if svcBase, ok := serviceBaselines[p.Name]; ok {
					base, cross = svcBase, true
				}
				if cross && m.Better != Informational {
					// A cross-node path compares with the cross-node
					// limit and with iptables in its routing mode.
					if base[0] != "" && okPaths[base[0]] {
						row.VsLimit = SummarizeRatios(PairedRatios(vals, r.values(w.Name, m.Name, base[0])))
					}
					if base[1] != "" && okPaths[base[1]] {
						row.VsIptables = SummarizeRatios(PairedRatios(vals, r.values(w.Name, m.Name, base[1])))
					}
				} else if m.Better != Informational {
					if p.Name != PathLimit && okPaths[PathLimit] {
						row.VsLimit = SummarizeRatios(PairedRatios(vals, limit))
					}
					if p.Name != PathIptables && okPaths[PathIptables] {
						row.VsIptables = SummarizeRatios(PairedRatios(vals, ipt))
					}
				}
				r.Summary = append(r.Summary, row)
			}
		}
	}
}

// WriteJSON writes r as indented JSON to path.
func (r *Results) WriteJSON(path string) error {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("encode results: %w", err)
	}
	return writeFileAtomic(path, buf.Bytes())
}

// ReadResults reads a results.json written by WriteJSON.
func ReadResults(path string) (*Results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read results: %w", err)
	}
	var r Results
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode %s: %w", path, err)
	}
	if r.SchemaVersion != SchemaVersion {
		return nil, fmt.Errorf("decode %s: schema version %d, want %d", path, r.SchemaVersion, SchemaVersion)
	}
	return &r, nil
}

// WriteFiles writes results.json, report.md and chart.svg into dir.
func (r *Results) WriteFiles(dir string) error {
	if err := r.WriteJSON(filepath.Join(dir, "results.json")); err != nil {
		return err
	}
	var md bytes.Buffer
	if err := RenderReport(&md, r); err != nil {
		return fmt.Errorf("render report: %w", err)
	}
	if err := writeFileAtomic(filepath.Join(dir, "report.md"), md.Bytes()); err != nil {
		return err
	}
	var svg bytes.Buffer
	if err := RenderChart(&svg, r); err != nil {
		return fmt.Errorf("render chart: %w", err)
	}
	return writeFileAtomic(filepath.Join(dir, "chart.svg"), svg.Bytes())
}

func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
