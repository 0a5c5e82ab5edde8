package bench

import (
	"flag"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestConfigDefaults(t *testing.T) {
	cfg := Config{Pin: "none"}
	if err := cfg.resolve(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Paths, AllPaths) || cfg.Reps != DefaultReps || cfg.Duration != DefaultDuration ||
		cfg.Pods != DefaultPods || cfg.Parallel != DefaultParallel || cfg.Out != DefaultOut || cfg.Pin != "" {
		t.Fatalf("defaults: %+v", cfg)
	}
	if !slices.Contains(cfg.Workloads, "policy-sweep") || !slices.Contains(cfg.Workloads, "tcp-stream") || slices.Contains(cfg.Workloads, servicesName) {
		t.Errorf("default workloads %v", cfg.Workloads)
	}
}

func TestConfigQuickAndExplicitFlags(t *testing.T) {
	var cfg Config
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	if err := fs.Parse([]string{"--quick", "--reps", "2", "--paths", "limit, reference", "--workloads", "tcp-stream,cni"}); err != nil {
		t.Fatal(err)
	}
	if err := cfg.resolve(); err != nil {
		t.Fatal(err)
	}
	if cfg.Reps != 2 || cfg.Duration != QuickDuration || cfg.Pods != QuickPods {
		t.Errorf("quick with --reps 2: %+v", cfg)
	}
	if !slices.Equal(cfg.Paths, []string{"limit", "reference"}) || !slices.Equal(cfg.Workloads, []string{"tcp-stream", "cni"}) {
		t.Errorf("lists: %v %v", cfg.Paths, cfg.Workloads)
	}
	wantPin := ""
	if runtime.NumCPU() >= 2 {
		wantPin = "1"
	}
	if cfg.Pin != wantPin {
		t.Errorf("--pin auto on %d CPUs = %q, want %q", runtime.NumCPU(), cfg.Pin, wantPin)
	}
}

func TestConfigRejects(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Paths: []string{"cilium"}}, "unknown path"},
		{Config{Paths: []string{"limit", "limit"}}, "given twice"},
		{Config{Workloads: []string{"netperf"}}, "unknown workload"},
		{Config{Duration: 1500 * time.Millisecond}, "whole number of seconds"},
		{Config{Pods: 500}, "--pods 500"},
		{Config{Reps: -1}, "--reps"},
		{Config{Pin: "1;rm"}, "CPU list"},
	} {
		err := tc.cfg.resolve()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: err = %v, want %q", tc.cfg, err, tc.want)
		}
	}
}
