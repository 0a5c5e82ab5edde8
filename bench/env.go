package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// foreignBusyPercent is the CPU use, over a window in which the harness is
// idle, above which the machine was busy with something else and the
// figures may be off. The load average is recorded but not judged: it
// decays over minutes and still shows the previous run.
const foreignBusyPercent = 10

// collectEnv records the machine and software versions.
func collectEnv(ctx context.Context, srcDir string) Env {
	e := Env{
		NProc:     runtime.NumCPU(),
		GoVersion: runtime.Version(),
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		e.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	e.CPUModel = cpuModel()
	e.Iperf3Version = toolVersion(ctx, "iperf3", "--version")
	e.SockperfVersion = toolVersion(ctx, "sockperf", "--version")
	e.TernCommit = gitCommit(ctx, srcDir)
	e.PluginsVersion = pluginsVersion(ctx, srcDir)
	_, err := os.Stat("/sys/module/br_netfilter")
	e.BrNetfilter = err == nil
	return e
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// toolVersion returns the first line of "tool --version" without the
// tool's decorations, or "not installed".
func toolVersion(ctx context.Context, tool, flag string) string {
	if _, err := exec.LookPath(tool); err != nil {
		return "not installed"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out, _ := exec.CommandContext(ctx, tool, flag).CombinedOutput()
	line, _, _ := strings.Cut(strings.TrimSpace(ansiEscape.ReplaceAllString(string(out), "")), "\n")
	if line == "" {
		return "unknown"
	}
	return strings.TrimSpace(line)
}

// gitCommit is `git rev-parse HEAD` of the source tree, with "-dirty" when
// tracked files changed, or "unknown".
func gitCommit(ctx context.Context, dir string) string {
	if dir == "" {
		return "unknown"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "git", "rev-parse", "HEAD")
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return "unknown"
	}
	commit := strings.TrimSpace(string(out))
	cmd = exec.CommandContext(ctx, "git", "status", "--porcelain", "--untracked-files=no")
	cmd.Dir = dir
	if st, err := cmd.Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		commit += "-dirty"
	}
	return commit
}

// readLoad samples /proc/loadavg and the machine's CPU use over window, in
// which the harness does nothing.
func readLoad(ctx context.Context, window time.Duration) Load {
	var l Load
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		f := strings.Fields(string(b))
		if len(f) >= 3 {
			l.Load1, _ = strconv.ParseFloat(f[0], 64)
			l.Load5, _ = strconv.ParseFloat(f[1], 64)
			l.Load15, _ = strconv.ParseFloat(f[2], 64)
		}
	}
	busy0, total0, err0 := cpuTimes()
	select {
	case <-ctx.Done():
		return l
	case <-time.After(window):
	}
	busy1, total1, err1 := cpuTimes()
	if err0 == nil && err1 == nil && total1 > total0 {
		l.BusyPercent = 100 * float64(busy1-busy0) / float64(total1-total0)
	}
	return l
}

// cpuTimes returns the busy and total jiffies of all CPUs (/proc/stat).
func cpuTimes() (busy, total uint64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("unexpected /proc/stat: %q", line)
	}
	for i, s := range f[1:] {
		v, _ := strconv.ParseUint(s, 10, 64)
		if i >= 8 { // guest and guest_nice are already in user and nice
			break
		}
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}

// foreignLoadWarning says whether the machine looked busy with other work
// before or after the run.
func foreignLoadWarning(before, after Load) string {
	var w []string
	if before.BusyPercent > foreignBusyPercent {
		w = append(w, fmt.Sprintf("CPU %.0f%% busy before the run", before.BusyPercent))
	}
	if after.BusyPercent > foreignBusyPercent {
		w = append(w, fmt.Sprintf("CPU %.0f%% busy after the run", after.BusyPercent))
	}
	if len(w) == 0 {
		return ""
	}
	return strings.Join(w, ", ") + ": other processes shared the machine; expect more noise, compare ratios rather than absolute figures"
}
