package loader

import (
	"bufio"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// cgroupPrograms lists the programs attached to cgroup dir at hook.
func cgroupPrograms(t *testing.T, dir string, hook Hook) []ebpf.ProgramID {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: cgroupAttachType(hook)})
	if err != nil {
		t.Fatalf("query %s of %s: %v", hook, dir, err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids
}

func sockProgID(t *testing.T, objs *Objects, hook Hook) ebpf.ProgramID {
	t.Helper()
	p, err := objs.Program(hook.program())
	if err != nil {
		t.Fatal(err)
	}
	id, err := ProgramID(p)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestAttachCgroup: the socket programs attach to a cgroup with pinned
// links; attaching again keeps them; an upgrade moves them to the new
// programs; another path moves them there; DetachCgroup takes them off and
// unpins them.
func TestAttachCgroup(t *testing.T) {
	testutil.RequirePrivileged(t)
	v1 := &Loader{BPFFSDir: testutil.MountBPFFS(t), StateDir: t.TempDir(), Spec: ternbpf.LoadTernSock, Version: "v1"}
	cg1, cg2 := testutil.NewCgroup(t), testutil.NewCgroup(t)
	t.Cleanup(func() { _ = v1.DetachCgroup() }) // before the cgroups go
	old := load(t, v1)

	check := func(what, dir string, objs *Objects) {
		t.Helper()
		for _, hook := range CgroupHooks {
			want := []ebpf.ProgramID(nil)
			if objs != nil {
				want = []ebpf.ProgramID{sockProgID(t, objs, hook)}
			}
			if got := cgroupPrograms(t, dir, hook); !slices.Equal(got, want) {
				t.Errorf("%s: %s of %s runs %v, want %v", what, hook, filepath.Base(dir), got, want)
			}
		}
	}
	if err := v1.AttachCgroup(old, cg1); err != nil {
		t.Fatal(err)
	}
	check("attached", cg1, old)
	if !v1.CgroupAttached() {
		t.Error("CgroupAttached: false after AttachCgroup")
	}
	if err := v1.AttachCgroup(old, cg1); err != nil {
		t.Fatal(err)
	}
	check("attached again", cg1, old)

	v2 := &Loader{BPFFSDir: v1.BPFFSDir, StateDir: v1.StateDir, Spec: ternbpf.LoadTernSock, Version: "v2"}
	cur := load(t, v2)
	check("upgraded", cg1, cur)

	if err := v2.AttachCgroup(cur, cg2); err != nil {
		t.Fatal(err)
	}
	check("moved, old cgroup", cg1, nil)
	check("moved, new cgroup", cg2, cur)

	if err := v2.DetachCgroup(); err != nil {
		t.Fatal(err)
	}
	check("detached", cg2, nil)
	if v2.CgroupAttached() {
		t.Error("CgroupAttached: true after DetachCgroup")
	}
	if err := v2.DetachCgroup(); err != nil {
		t.Errorf("DetachCgroup with nothing attached: %v", err)
	}
}

func TestCgroup2Root(t *testing.T) {
	for _, c := range []struct{ mountinfo, want string }{
		{"", ""},
		{`25 30 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate`, "/sys/fs/cgroup"},
		{`24 30 0:21 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
26 24 0:23 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
27 24 0:24 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu`, "/sys/fs/cgroup/unified"},
		// A bind mount of a sub-cgroup (root field not "/") is no root.
		{`40 30 0:22 /kubepods /mnt/cg rw - cgroup2 cgroup2 rw
41 30 0:22 / /run/my\040cgroup rw - cgroup2 cgroup2 rw`, "/run/my cgroup"},
	} {
		got, err := cgroup2RootIn(bufio.NewScanner(strings.NewReader(c.mountinfo)))
		if err != nil || got != c.want {
			t.Errorf("%q: %q, %v; want %q", c.mountinfo, got, err, c.want)
		}
	}
}
