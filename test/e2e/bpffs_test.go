package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestExampleConfigDefaultBPFFS runs ADD, traffic and DEL with
// examples/10-tern.conflist as `make install` puts it (bpffsDir
// /sys/fs/bpf/tern) on a node whose /sys/fs/bpf is not a bpffs: the plugin
// must mount one there instead of failing every ADD on sysfs's refused
// mkdir. The node is this test re-executed in new PID and mount namespaces
// with a fresh sysfs on /sys, so the machine's own /sys/fs/bpf is never
// touched and the bpffs vanishes with the namespace. Only stateDir is
// changed (a per-test directory instead of /var/lib/tern).
func TestExampleConfigDefaultBPFFS(t *testing.T) {
	testutil.RequirePrivileged(t)
	if os.Getenv("TERN_TEST_E2E_ROLE") == "node" {
		defaultBPFFSNode(t)
		return
	}
	cniPath := testutil.BuildPlugins(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
		self, "-test.run=^TestExampleConfigDefaultBPFFS$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "TERN_TEST_E2E_ROLE=node", "TERN_CNI_PATH="+cniPath)
	out, err := cmd.CombinedOutput()
	t.Logf("node:\n%s", out)
	if err != nil {
		t.Fatalf("node: %v", err)
	}
}

func defaultBPFFSNode(t *testing.T) {
	if err := unix.Unmount("/sys", unix.MNT_DETACH); err != nil {
		t.Fatalf("unmount /sys: %v", err)
	}
	if err := unix.Mount("sysfs", "/sys", "sysfs", 0, ""); err != nil {
		t.Fatalf("mount sysfs: %v", err)
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil || st.Type == unix.BPF_FS_MAGIC {
		t.Fatalf("fresh sysfs: /sys/fs/bpf is a bpffs already or missing (%v)", err)
	}

	raw, err := os.ReadFile("../../examples/10-tern.conflist")
	if err != nil {
		t.Fatal(err)
	}
	var list map[string]any
	if err := json.Unmarshal(raw, &list); err != nil {
		t.Fatal(err)
	}
	n := testutil.NewNode(t)
	plugin := list["plugins"].([]any)[0].(map[string]any)
	if plugin["bpffsDir"] != "/sys/fs/bpf/tern" {
		t.Fatalf("example bpffsDir is %v, the test expects the default", plugin["bpffsDir"])
	}
	plugin["stateDir"] = n.StateDir
	// The node namespace has no default route, so no uplink to masquerade
	// out of.
	plugin["ipMasq"] = false
	conf, err := json.Marshal(list)
	if err != nil {
		t.Fatal(err)
	}

	a := addPod(t, n, conf, "a")
	b := addPod(t, n, conf, "b")
	if err := testutil.Ping(a.NS, b.IP, 2); err != nil {
		t.Errorf("ping %s -> %s: %v", a.IP, b.IP, err)
	}
	if err := unix.Statfs("/sys/fs/bpf/tern", &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		t.Errorf("/sys/fs/bpf/tern is not on a bpffs after ADD (%v)", err)
	}
	mounts, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	if c := strings.Count(string(mounts), "bpf /sys/fs/bpf bpf "); c != 1 {
		t.Errorf("bpffs mounted %d times on /sys/fs/bpf, want once:\n%s", c, mounts)
	}
	for _, p := range []*pod{a, b} {
		if err := n.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
			t.Errorf("DEL %s: %v", p.Name, err)
		}
	}
}
