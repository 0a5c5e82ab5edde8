package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// namePrefix starts the name of every namespace, temporary directory and
// network of the harness: "ternbench-<pid>-<random>-…".
const namePrefix = "ternbench-"

// leakCheck looks for anything of this run left after teardown: network
// namespaces, links in the root namespace, mounts, temporary files,
// netfilter rules in the root namespace, CNI state in the default
// directories, processes.
func (r *runner) leakCheck(ctx context.Context) []string {
	var leaks []string
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if strings.Contains(e.Name(), r.id) {
				leaks = append(leaks, "network namespace "+e.Name())
			}
		}
	}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if r.ours(l.Attrs().Name) {
				leaks = append(leaks, "link in the root netns "+l.Attrs().Name)
			}
		}
	}
	for _, m := range mountsContaining(r.id) {
		leaks = append(leaks, "mount "+m)
	}
	if _, err := os.Stat(r.tmp); err == nil {
		leaks = append(leaks, "temporary directory "+r.tmp)
	}
	for _, tool := range [][]string{{"iptables-save"}, {"nft", "list", "ruleset"}} {
		if _, err := exec.LookPath(tool[0]); err != nil {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		out, err := exec.CommandContext(cctx, tool[0], tool[1:]...).Output()
		cancel()
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(out), "\n") {
			if r.ours(line) {
				leaks = append(leaks, fmt.Sprintf("root netns %s: %s", tool[0], strings.TrimSpace(line)))
			}
		}
	}
	for _, p := range r.cfg.Paths {
		for _, dir := range []string{"/var/lib/cni/networks", "/var/lib/cni/results"} {
			m, _ := filepath.Glob(filepath.Join(dir, "*"+r.netName(p)+"*"))
			for _, f := range m {
				leaks = append(leaks, "CNI state "+f)
			}
		}
	}
	for _, p := range r.procs.stopAll() {
		leaks = append(leaks, "process still running (killed now): "+p)
	}
	return leaks
}

// ours reports whether s names something of this run: the run ID, or a
// link name built from its tag (tl<tag>c, tbr<tag>, tbe<tag>, tbi<tag>).
func (r *runner) ours(s string) bool {
	if strings.Contains(s, r.id) {
		return true
	}
	for _, p := range []string{"tl", "tbr", "tbe", "tbi"} {
		if strings.Contains(s, p+r.tag) {
			return true
		}
	}
	return false
}

// mountsContaining lists the mount points of this mount namespace whose
// path contains s.
func mountsContaining(s string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.Contains(fields[4], s) {
			out = append(out, fields[4])
		}
	}
	return out
}

// sweepStale removes what earlier runs killed before their teardown (kill
// -9, machine reboot of a container…) left behind: namespaces, bpffs
// mounts and temporary directories named ternbench-<pid>-… whose pid is
// no longer running. Running harnesses are left alone.
func (r *runner) sweepStale() []string {
	var removed []string
	dead := func(name string) bool {
		rest, ok := strings.CutPrefix(name, namePrefix)
		if !ok {
			return false
		}
		pidStr, _, _ := strings.Cut(rest, "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid <= 0 || pid == os.Getpid() {
			return false
		}
		return syscall.Kill(pid, 0) == syscall.ESRCH
	}
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if dead(e.Name()) {
				if err := netns.DeleteNamed(e.Name()); err == nil || errors.Is(err, os.ErrNotExist) {
					removed = append(removed, "netns "+e.Name())
				}
			}
		}
	}
	tmp := os.TempDir()
	for _, m := range mountsContaining(filepath.Join(tmp, namePrefix)) {
		rel, _ := filepath.Rel(tmp, m)
		top, _, _ := strings.Cut(rel, string(filepath.Separator))
		if dead(top) {
			if err := unix.Unmount(m, unix.MNT_DETACH); err == nil {
				removed = append(removed, "mount "+m)
			}
		}
	}
	if ents, err := os.ReadDir(tmp); err == nil {
		for _, e := range ents {
			if e.IsDir() && dead(e.Name()) {
				dir := filepath.Join(tmp, e.Name())
				if len(mountsContaining(dir)) == 0 && os.RemoveAll(dir) == nil {
					removed = append(removed, "directory "+dir)
				}
			}
		}
	}
	return removed
}
