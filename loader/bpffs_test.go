package loader

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// bpffsRoleEnv tells a re-executed test binary which part of
// TestEnsureBPFFSDefaultPath it plays.
const bpffsRoleEnv = "TERN_TEST_BPFFS_ROLE"

// TestEnsureBPFFSDefaultPath runs the default bpffsDir, /sys/fs/bpf/tern, on
// a node whose /sys/fs/bpf is not a bpffs: sysfs refuses the mkdir, so
// EnsureBPFFS must mount on /sys/fs/bpf. The "node" is this test binary
// re-executed as PID 1 of new PID and mount namespaces with a fresh sysfs on
// /sys (the machine's own /sys/fs/bpf is never touched, and everything
// mounted vanishes with the namespace). Inside it, three plugins started at
// once with `ip netns exec` (each in a private mount namespace with another
// fresh sysfs) must mount one bpffs, in the node's namespace, where their
// pins outlive them; then the node's own call finds it and stacks no
// second one.
func TestEnsureBPFFSDefaultPath(t *testing.T) {
	switch os.Getenv(bpffsRoleEnv) {
	case "node":
		bpffsNode(t)
		return
	case "plugin":
		bpffsPlugin(t)
		return
	}
	testutil.RequirePrivileged(t)
	before := bpfMountPoints(t)
	podNS := testutil.NewNetNS(t, "bpffs")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
		self, "-test.run=^TestEnsureBPFFSDefaultPath$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), bpffsRoleEnv+"=node", "TERN_TEST_NETNS="+testutil.NSName(podNS))
	out, err := cmd.CombinedOutput()
	t.Logf("node:\n%s", out)
	if err != nil {
		t.Fatalf("node: %v", err)
	}
	if after := bpfMountPoints(t); len(after) != len(before) {
		t.Errorf("bpffs mounts in the test's namespace changed: before %v, after %v", before, after)
	}
}

func bpffsNode(t *testing.T) {
	if os.Getpid() != 1 {
		t.Fatalf("node role runs as PID 1 of its PID namespace, is %d", os.Getpid())
	}
	freshSysfs(t)
	const dir = "/sys/fs/bpf/tern"
	if ok, _ := IsBPFFS("/sys/fs/bpf"); ok {
		t.Fatal("fresh sysfs: /sys/fs/bpf is already a bpffs")
	}
	if err := os.Mkdir(dir, 0o700); err == nil {
		t.Fatal("mkdir on sysfs succeeded: the test would not reproduce the node")
	}

	// Plugins in private mount namespaces, as `ip netns exec` gives them,
	// three at once on the fresh node: one bpffs must result, in the
	// node's namespace.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	const plugins = 3
	var wg sync.WaitGroup
	for i := range plugins {
		wg.Go(func() {
			cmd := exec.Command("ip", "netns", "exec", os.Getenv("TERN_TEST_NETNS"),
				self, "-test.run=^TestEnsureBPFFSDefaultPath$", "-test.v", "-test.count=1")
			cmd.Env = append(os.Environ(), bpffsRoleEnv+"=plugin", fmt.Sprintf("TERN_TEST_PROBE=probe%d", i))
			out, err := cmd.CombinedOutput()
			t.Logf("plugin %d under ip netns exec:\n%s", i, out)
			if err != nil {
				t.Errorf("plugin %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	if ok, err := IsBPFFS("/sys/fs/bpf"); err != nil || !ok {
		t.Fatalf("after the plugins: /sys/fs/bpf in the node's namespace is not a bpffs (%v, %v): their pins died with them", ok, err)
	}
	for i := range plugins {
		if _, err := os.Stat(filepath.Join(dir, fmt.Sprintf("probe%d", i))); err != nil {
			t.Errorf("plugin %d's pin is not on the node's bpffs: %v", i, err)
		}
	}

	// The node's own plugin: finds the bpffs, mounts nothing more.
	for range 2 {
		if err := EnsureBPFFS(dir); err != nil {
			t.Fatalf("EnsureBPFFS(%s) on the node: %v", dir, err)
		}
	}
	if got := bpfMountPoints(t); len(got) != 1 || got[0] != "/sys/fs/bpf" {
		t.Errorf("bpffs mounts on the node = %v, want exactly [/sys/fs/bpf]", got)
	}
}

func bpffsPlugin(t *testing.T) {
	const dir = "/sys/fs/bpf/tern"
	if ok, _ := IsBPFFS("/sys/fs/bpf"); ok {
		t.Fatal("under ip netns exec: /sys/fs/bpf is already a bpffs, the test reproduces nothing")
	}
	if private, err := inPrivateMountNS(); err != nil || !private {
		t.Fatalf("inPrivateMountNS = %v, %v under ip netns exec", private, err)
	}
	if err := EnsureBPFFS(dir); err != nil {
		t.Fatalf("EnsureBPFFS(%s): %v", dir, err)
	}
	if ok, err := IsBPFFS(dir); err != nil || !ok {
		t.Fatalf("IsBPFFS(%s) = %v, %v", dir, ok, err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(dir, os.Getenv("TERN_TEST_PROBE"))); err != nil {
		t.Fatalf("pin: %v", err)
	}
}

// freshSysfs mounts a new sysfs on /sys, as `ip netns exec` does (detach
// the old one and what is mounted under it, mount sysfs again), so that
// /sys/fs/bpf is an empty directory whatever the machine mounted there.
func freshSysfs(t *testing.T) {
	if err := unix.Unmount("/sys", unix.MNT_DETACH); err != nil {
		t.Fatalf("unmount /sys: %v", err)
	}
	if err := unix.Mount("sysfs", "/sys", "sysfs", 0, ""); err != nil {
		t.Fatalf("mount sysfs: %v", err)
	}
}

// bpfMountPoints lists the mount points of bpffs mounts under /sys in the
// calling process's mount namespace.
func bpfMountPoints(t *testing.T) []string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var points []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// mountinfo: id parent major:minor root mountpoint options ... - fstype source superopts
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 0 || sep+1 >= len(fields) || len(fields) < 5 {
			continue
		}
		if fields[sep+1] == "bpf" && strings.HasPrefix(fields[4], "/sys/") {
			points = append(points, fields[4])
		}
	}
	return points
}
