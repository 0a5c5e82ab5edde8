package cni

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// An opt-in timing trace of one plugin command, to find where the slow
// ADDs of a parallel burst wait (docs/cni-add-profile.md, "Third
// pass"). With TERN_TRACE_FILE set, ADD appends one line to
// that file: the command's phases as milliseconds since the package was
// initialised, the wall clock at that point, the process's CPU time and
// the time its threads spent runnable but waiting for a CPU (schedstat).
// Unset, a trace is nil and every method returns at once.

// traceEpoch is as close to the start of the process as the package can
// see: package init, after the Go runtime started.
var traceEpoch = time.Now()

type trace struct {
	file  string
	marks []string
}

func newTrace() *trace {
	f := os.Getenv("TERN_TRACE_FILE")
	if f == "" {
		return nil
	}
	return &trace{file: f}
}

// mark records that the named phase ended now.
func (t *trace) mark(name string) {
	if t == nil {
		return
	}
	t.marks = append(t.marks, fmt.Sprintf("%s=%.2f", name, float64(time.Since(traceEpoch))/1e6))
}

// write appends the line. O_APPEND writes of one line are atomic for the
// sizes written here, so parallel commands do not interleave.
func (t *trace) write(cmd, id string, err error) {
	if t == nil {
		return
	}
	t.mark("end")
	cpu := 0.0
	if b, rerr := os.ReadFile("/proc/self/stat"); rerr == nil {
		// utime and stime, fields 14 and 15, after the command name.
		if i := strings.LastIndexByte(string(b), ')'); i > 0 {
			f := strings.Fields(string(b)[i+1:])
			if len(f) > 13 {
				u, _ := strconv.ParseFloat(f[11], 64)
				s, _ := strconv.ParseFloat(f[12], 64)
				cpu = (u + s) * 10 // clock ticks of 10 ms
			}
		}
	}
	var runq float64 // ms runnable but not running, over live threads
	tasks, _ := filepath.Glob("/proc/self/task/*/schedstat")
	for _, p := range tasks {
		if b, rerr := os.ReadFile(p); rerr == nil {
			if f := strings.Fields(string(b)); len(f) >= 2 {
				w, _ := strconv.ParseFloat(f[1], 64)
				runq += w / 1e6
			}
		}
	}
	line := fmt.Sprintf("%s pid=%d id=%s epoch=%d err=%t cpu=%.0f runq=%.2f %s\n",
		cmd, os.Getpid(), id, traceEpoch.UnixMicro(), err != nil, cpu, runq, strings.Join(t.marks, " "))
	if f, oerr := os.OpenFile(t.file, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); oerr == nil {
		f.WriteString(line)
		f.Close()
	}
}
