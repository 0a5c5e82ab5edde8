package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// Every test gets its own bpffs mount (testutil.MountBPFFS) and state
// directory, and interfaces live in a per-test network namespace; the
// loader's netlink and TCX calls resolve interfaces in the namespace of the
// calling thread, so they run inside ns.Do.

// newLoader returns a loader for the embedded object on a fresh bpffs and
// state directory.
func newLoader(t *testing.T) *Loader {
	t.Helper()
	return New(testutil.MountBPFFS(t), t.TempDir())
}

// versioned returns a loader on l's directories that loads the embedded
// object under another version name, as an upgraded plugin would.
func versioned(l *Loader, version string) *Loader {
	return &Loader{BPFFSDir: l.BPFFSDir, StateDir: l.StateDir, Spec: ternbpf.LoadTern, Version: version}
}

func load(t *testing.T, l *Loader) *Objects {
	t.Helper()
	objs, err := l.Load()
	if err != nil {
		t.Fatalf("load %s: %v", l.Version, err)
	}
	t.Cleanup(objs.Close)
	return objs
}

// loadIn loads from inside n: an upgrade finds legacy attachments by
// ifindex in the namespace of the calling thread.
func loadIn(t *testing.T, n ns.NetNS, l *Loader) *Objects {
	t.Helper()
	var objs *Objects
	do(t, n, func() error {
		var err error
		objs, err = l.Load()
		if err != nil {
			return fmt.Errorf("load %s: %w", l.Version, err)
		}
		return nil
	})
	t.Cleanup(objs.Close)
	return objs
}

func do(t *testing.T, n ns.NetNS, f func() error) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

func progID(t *testing.T, objs *Objects) ebpf.ProgramID {
	t.Helper()
	p, err := objs.Program("tern_from_pod")
	if err != nil {
		t.Fatal(err)
	}
	id, err := ProgramID(p)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// veth is the host end of a veth pair in a test namespace.
type veth struct {
	name  string
	index int
}

// addVeth creates an up veth pair in n and returns its first end.
func addVeth(t *testing.T, n ns.NetNS) veth {
	t.Helper()
	v := veth{name: testutil.UniqueName("lv")}
	do(t, n, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = v.name
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: testutil.UniqueName("lp")}); err != nil {
			return fmt.Errorf("add veth %s: %w", v.name, err)
		}
		l, err := netlinksafe.LinkByName(v.name)
		if err != nil {
			return err
		}
		v.index = l.Attrs().Index
		return netlink.LinkSetUp(l)
	})
	return v
}

func delLink(t *testing.T, n ns.NetNS, v veth) {
	t.Helper()
	do(t, n, func() error {
		l, err := netlinksafe.LinkByName(v.name)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
}

// tcxPrograms lists the programs attached at TCX ingress of v.
func tcxPrograms(t *testing.T, n ns.NetNS, v veth) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	do(t, n, func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: v.index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("query tcx ingress of %s: %w", v.name, err)
		}
		for _, p := range res.Programs {
			ids = append(ids, p.ID)
		}
		return nil
	})
	return ids
}

// clsBPFFilters lists the cls_bpf filters at clsact ingress of v.
func clsBPFFilters(t *testing.T, n ns.NetNS, v veth) []*netlink.BpfFilter {
	t.Helper()
	var out []*netlink.BpfFilter
	do(t, n, func() error {
		l, err := netlinksafe.LinkByName(v.name)
		if err != nil {
			return err
		}
		filters, err := netlinksafe.FilterList(l, netlink.HANDLE_MIN_INGRESS)
		if err != nil {
			return fmt.Errorf("list filters of %s: %w", v.name, err)
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				out = append(out, bf)
			}
		}
		return nil
	})
	return out
}

func hasClsact(t *testing.T, n ns.NetNS, v veth) bool {
	t.Helper()
	found := false
	do(t, n, func() error {
		l, err := netlinksafe.LinkByName(v.name)
		if err != nil {
			return err
		}
		qdiscs, err := netlinksafe.QdiscList(l)
		if err != nil {
			return err
		}
		for _, q := range qdiscs {
			found = found || q.Type() == "clsact"
		}
		return nil
	})
	return found
}

// eventually retries cond until it returns nil or timeout passes. Releasing
// an unpinned bpf_link is asynchronous (the bpffs inode is freed after an
// RCU grace period and the link put from a workqueue), so a detach by unpin
// takes a moment to show.
func eventually(t *testing.T, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func checkAttached(n ns.NetNS, l *Loader, objs *Objects, v veth) error {
	return n.Do(func(ns.NetNS) error {
		return l.CheckAttached(objs, v.name, v.index, HookPodIngress)
	})
}

// attachWorld is the set-up of the attach tests: a network namespace
// (named after prefix), a loader with its objects loaded, and the ID of
// the pod ingress program they attach.
func attachWorld(t *testing.T, prefix string) (ns.NetNS, *Loader, *Objects, ebpf.ProgramID) {
	t.Helper()
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, prefix)
	l := newLoader(t)
	objs := load(t, l)
	return n, l, objs, progID(t, objs)
}

// attachUsing attaches the pod ingress program to v in mode, inside n, and
// returns the mode the loader used (auto modes choose one).
func attachUsing(t *testing.T, n ns.NetNS, l *Loader, objs *Objects, v veth, mode Mode) Mode {
	t.Helper()
	var used Mode
	do(t, n, func() error {
		var err error
		used, err = l.Attach(objs, v.name, v.index, HookPodIngress, mode)
		return err
	})
	return used
}

func attach(t *testing.T, n ns.NetNS, l *Loader, objs *Objects, v veth, mode Mode) {
	t.Helper()
	do(t, n, func() error {
		used, err := l.Attach(objs, v.name, v.index, HookPodIngress, mode)
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", mode, v.name, err)
		}
		if used != mode {
			return fmt.Errorf("attach %s to %s: used mode %q", mode, v.name, used)
		}
		return nil
	})
}

func detach(t *testing.T, n ns.NetNS, l *Loader, v veth) {
	t.Helper()
	do(t, n, func() error {
		if err := l.Detach(v.name, HookPodIngress); err != nil {
			return fmt.Errorf("detach %s: %w", v.name, err)
		}
		return nil
	})
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestLoadPinsAndReuses(t *testing.T) {
	testutil.RequirePrivileged(t)
	l := newLoader(t)

	first := load(t, l)
	second := load(t, l)
	// Another plugin process: a new loader on the same node directories.
	third := load(t, New(l.BPFFSDir, l.StateDir))

	id := progID(t, first)
	for i, objs := range []*Objects{second, third} {
		if got := progID(t, objs); got != id {
			t.Errorf("load %d: program ID %d, want %d (reloaded instead of reusing the pin)", i+2, got, id)
		}
	}
	for _, name := range []string{ternbpf.TernMapTernEndpoints, ternbpf.TernMapTernMetrics} {
		var ids []ebpf.MapID
		for _, objs := range []*Objects{first, third} {
			m, err := objs.Map(name)
			if err != nil {
				t.Fatal(err)
			}
			info, err := m.Info()
			if err != nil {
				t.Fatal(err)
			}
			id, _ := info.ID()
			ids = append(ids, id)
		}
		if ids[0] != ids[1] {
			t.Errorf("map %s: ID %d in the third load, want %d", name, ids[1], ids[0])
		}
	}

	for _, p := range []string{
		filepath.Join(l.BPFFSDir, "maps", ternbpf.TernMapTernEndpoints),
		filepath.Join(l.BPFFSDir, "maps", ternbpf.TernMapTernMetrics),
		filepath.Join(l.BPFFSDir, "progs", l.Version, ternbpf.TernProgTernFromPod),
	} {
		if !exists(p) {
			t.Errorf("%s is not pinned", p)
		}
	}
	if got := dirNames(t, filepath.Join(l.BPFFSDir, "progs")); !slices.Equal(got, []string{l.Version}) {
		t.Errorf("progs/ holds %v, want only [%s]", got, l.Version)
	}
	if l.Version != ternbpf.ObjectVersion() || l.Version == "" {
		t.Errorf("New: version %q, want the object's %q", l.Version, ternbpf.ObjectVersion())
	}
}

func TestLoadConcurrent(t *testing.T) {
	testutil.RequirePrivileged(t)
	base := newLoader(t)

	const loaders = 8
	var (
		wg   sync.WaitGroup
		ids  [loaders]ebpf.ProgramID
		errs [loaders]error
	)
	for i := range loaders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			objs, err := New(base.BPFFSDir, base.StateDir).Load()
			if err != nil {
				errs[i] = err
				return
			}
			defer objs.Close()
			p, err := objs.Program(ternbpf.TernProgTernFromPod)
			if err == nil {
				ids[i], err = ProgramID(p)
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("loader %d: %v", i, err)
		}
	}
	for i, id := range ids {
		if id != ids[0] {
			t.Errorf("loader %d: program ID %d, loader 0 got %d", i, id, ids[0])
		}
	}
	if got := dirNames(t, filepath.Join(base.BPFFSDir, "progs")); !slices.Equal(got, []string{base.Version}) {
		t.Errorf("progs/ holds %v, want only [%s]", got, base.Version)
	}
}

func TestAttachTCX(t *testing.T) {
	n, l, objs, id := attachWorld(t, "ldr")
	v := addVeth(t, n)

	attach(t, n, l, objs, v, ModeTCX)
	pin := filepath.Join(l.BPFFSDir, "links", v.name+"@ingress")
	if !exists(pin) {
		t.Fatalf("link pin %s missing", pin)
	}
	if got := tcxPrograms(t, n, v); !slices.Equal(got, []ebpf.ProgramID{id}) {
		t.Errorf("tcx ingress of %s runs %v, want [%d]", v.name, got, id)
	}
	if err := checkAttached(n, l, objs, v); err != nil {
		t.Errorf("CheckAttached: %v", err)
	}

	// The pin is the only reference to the link: removing it detaches.
	if err := os.Remove(pin); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, func() error {
		if got := tcxPrograms(t, n, v); len(got) != 0 {
			return fmt.Errorf("tcx ingress of %s still runs %v after the pin was removed", v.name, got)
		}
		return nil
	})
	err := checkAttached(n, l, objs, v)
	if err == nil {
		t.Fatal("CheckAttached succeeded with nothing attached")
	}
	for _, want := range []string{"not attached", v.name, "tern_from_pod"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("CheckAttached error %q does not mention %q", err, want)
		}
	}
}

// TestAttachTCXAgain: attaching again replaces the attachment, right away
// (a retried ADD), with exactly one program left running.
func TestAttachTCXAgain(t *testing.T) {
	n, l, objs, id := attachWorld(t, "ldr")
	v := addVeth(t, n)

	for range 3 {
		attach(t, n, l, objs, v, ModeTCX)
	}
	if got := tcxPrograms(t, n, v); !slices.Equal(got, []ebpf.ProgramID{id}) {
		t.Errorf("tcx ingress of %s runs %v, want [%d]", v.name, got, id)
	}
	if err := checkAttached(n, l, objs, v); err != nil {
		t.Errorf("CheckAttached: %v", err)
	}

	// DEL then ADD of the same interface, back to back.
	for range 3 {
		detach(t, n, l, v)
		if got := tcxPrograms(t, n, v); len(got) != 0 {
			t.Errorf("tcx ingress of %s still runs %v when Detach returned", v.name, got)
		}
		attach(t, n, l, objs, v, ModeTCX)
	}
	if got := tcxPrograms(t, n, v); !slices.Equal(got, []ebpf.ProgramID{id}) {
		t.Errorf("tcx ingress of %s runs %v, want [%d]", v.name, got, id)
	}
}

// TestAttachTCXRecreatedInterface: a link pin left by a deleted interface
// of the same name does not stop the new interface from being attached.
func TestAttachTCXRecreatedInterface(t *testing.T) {
	n, l, objs, id := attachWorld(t, "ldr")
	v := addVeth(t, n)
	attach(t, n, l, objs, v, ModeTCX)
	delLink(t, n, v)

	again := veth{name: v.name}
	do(t, n, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = again.name
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: testutil.UniqueName("lp")}); err != nil {
			return err
		}
		lk, err := netlinksafe.LinkByName(again.name)
		if err != nil {
			return err
		}
		again.index = lk.Attrs().Index
		return nil
	})
	attach(t, n, l, objs, again, ModeTCX)
	if got := tcxPrograms(t, n, again); !slices.Equal(got, []ebpf.ProgramID{id}) {
		t.Errorf("tcx ingress of the recreated %s runs %v, want [%d]", again.name, got, id)
	}
	if err := checkAttached(n, l, objs, again); err != nil {
		t.Errorf("CheckAttached: %v", err)
	}
}

func TestAttachLegacy(t *testing.T) {
	n, l, objs, id := attachWorld(t, "ldr")
	v := addVeth(t, n)

	attach(t, n, l, objs, v, ModeLegacy)
	if !hasClsact(t, n, v) {
		t.Errorf("no clsact qdisc on %s", v.name)
	}
	filters := clsBPFFilters(t, n, v)
	if len(filters) != 1 {
		t.Fatalf("%d cls_bpf filters on %s, want 1: %+v", len(filters), v.name, filters)
	}
	if f := filters[0]; f.Id != int(id) || !f.DirectAction || !strings.HasPrefix(f.Name, "tern_from_pod") {
		t.Errorf("filter: id %d direct-action %v name %q, want id %d direct-action tern_from_pod", f.Id, f.DirectAction, f.Name, id)
	}
	if got := tcxPrograms(t, n, v); len(got) != 0 {
		t.Errorf("legacy mode also attached tcx programs %v", got)
	}
	if err := checkAttached(n, l, objs, v); err != nil {
		t.Errorf("CheckAttached: %v", err)
	}
	rec := filepath.Join(l.StateDir, "bpf-legacy", v.name+"@ingress")
	if !exists(rec) {
		t.Errorf("legacy record %s missing", rec)
	}

	// Attaching again replaces the filter rather than adding one.
	attach(t, n, l, objs, v, ModeLegacy)
	if got := clsBPFFilters(t, n, v); len(got) != 1 {
		t.Errorf("%d cls_bpf filters after a second attach, want 1", len(got))
	}

	detach(t, n, l, v)
	if got := clsBPFFilters(t, n, v); len(got) != 0 {
		t.Errorf("%d cls_bpf filters left after Detach: %+v", len(got), got)
	}
	if exists(rec) {
		t.Errorf("legacy record %s left after Detach", rec)
	}
	if err := checkAttached(n, l, objs, v); err == nil || !strings.Contains(err.Error(), "not attached") {
		t.Errorf("CheckAttached after Detach: %v, want a not-attached error", err)
	}
}

func TestUpgrade(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ldr")
	v1 := versioned(newLoader(t), "v1")
	old := loadIn(t, n, v1)
	oldID := progID(t, old)

	tcx, legacy := addVeth(t, n), addVeth(t, n)
	attach(t, n, v1, old, tcx, ModeTCX)
	attach(t, n, v1, old, legacy, ModeLegacy)

	endpoints, err := old.Map(ternbpf.TernMapTernEndpoints)
	if err != nil {
		t.Fatal(err)
	}
	key := uint32(0x0201f40a) // any key
	want := ternbpf.TernEndpoint{Ifindex: uint32(tcx.index), PodMac: [6]uint8{2, 0, 0, 0, 0, 1}}
	if err := endpoints.Put(key, want); err != nil {
		t.Fatal(err)
	}

	v2 := versioned(v1, "v2")
	cur := loadIn(t, n, v2)
	newID := progID(t, cur)
	if newID == oldID {
		t.Fatalf("v2 has the program ID of v1 (%d): not reloaded", newID)
	}

	if got := tcxPrograms(t, n, tcx); !slices.Equal(got, []ebpf.ProgramID{newID}) {
		t.Errorf("tcx ingress of %s runs %v, want only v2's [%d] (v1 was %d)", tcx.name, got, newID, oldID)
	}
	if f := clsBPFFilters(t, n, legacy); len(f) != 1 || f[0].Id != int(newID) {
		t.Errorf("cls_bpf filters of %s: %+v, want one running v2's program %d (v1 was %d)", legacy.name, f, newID, oldID)
	}
	for _, v := range []veth{tcx, legacy} {
		if err := checkAttached(n, v2, cur, v); err != nil {
			t.Errorf("CheckAttached(v2, %s): %v", v.name, err)
		}
		if err := checkAttached(n, v1, old, v); err == nil {
			t.Errorf("CheckAttached(v1, %s) succeeded: v1's program is still attached", v.name)
		}
	}

	progs := filepath.Join(v1.BPFFSDir, "progs")
	if got := dirNames(t, progs); !slices.Equal(got, []string{"v2"}) {
		t.Errorf("progs/ holds %v after the upgrade, want [v2]", got)
	}

	var got ternbpf.TernEndpoint
	m, err := cur.Map(ternbpf.TernMapTernEndpoints)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Lookup(key, &got); err != nil || got != want {
		t.Errorf("endpoint after the upgrade: %+v, %v; want %+v", got, err, want)
	}
}

// TestUpgradeAfterInterfaceVanished: a pod's veth can disappear without a
// DEL (its namespace was destroyed). Its link pin then refers to a link
// whose device is gone; the next upgrade must still move every live
// attachment to the new programs.
func TestUpgradeAfterInterfaceVanished(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ldr")
	v1 := versioned(newLoader(t), "v1")
	old := loadIn(t, n, v1)

	gone, goneLegacy, live := addVeth(t, n), addVeth(t, n), addVeth(t, n)
	attach(t, n, v1, old, gone, ModeTCX)
	attach(t, n, v1, old, goneLegacy, ModeLegacy)
	attach(t, n, v1, old, live, ModeTCX)
	delLink(t, n, gone)
	delLink(t, n, goneLegacy)

	v2 := versioned(v1, "v2")
	cur := loadIn(t, n, v2)
	newID := progID(t, cur)
	if got := tcxPrograms(t, n, live); !slices.Equal(got, []ebpf.ProgramID{newID}) {
		t.Errorf("tcx ingress of %s runs %v, want v2's [%d]", live.name, got, newID)
	}
	if got := dirNames(t, filepath.Join(v1.BPFFSDir, "progs")); !slices.Equal(got, []string{"v2"}) {
		t.Errorf("progs/ holds %v after the upgrade, want [v2]", got)
	}
	// DEL of the vanished pods still works.
	detach(t, n, v2, gone)
	detach(t, n, v2, goneLegacy)
	if got := dirNames(t, filepath.Join(v1.BPFFSDir, "links")); !slices.Equal(got, []string{live.name + "@ingress"}) {
		t.Errorf("links/ holds %v, want only %s@ingress", got, live.name)
	}
}

// TestUpgradeInterrupted: a loader that died after publishing the new
// version's programs but before moving the attachments to them (or whose
// upgrade failed at that step) leaves progs/<new> in place. The next load
// of that version must finish the upgrade, not just reuse the pins.
func TestUpgradeInterrupted(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ldr")
	v1 := versioned(newLoader(t), "v1")
	old := loadIn(t, n, v1)
	oldID := progID(t, old)
	tcx, legacy := addVeth(t, n), addVeth(t, n)
	attach(t, n, v1, old, tcx, ModeTCX)
	attach(t, n, v1, old, legacy, ModeLegacy)

	// What loadNew has done for v2 when it stops before upgradeAttachments.
	spec, err := ternbpf.LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: filepath.Join(v1.BPFFSDir, "maps")},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	dir := filepath.Join(v1.BPFFSDir, "progs", "v2")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := coll.Programs[ternbpf.TernProgTernFromPod].Pin(filepath.Join(dir, ternbpf.TernProgTernFromPod)); err != nil {
		t.Fatal(err)
	}

	v2 := versioned(v1, "v2")
	cur := loadIn(t, n, v2)
	newID := progID(t, cur)
	if newID == oldID {
		t.Fatalf("v2 loaded v1's program %d", oldID)
	}
	if got := tcxPrograms(t, n, tcx); !slices.Equal(got, []ebpf.ProgramID{newID}) {
		t.Errorf("tcx ingress of %s runs %v, want v2's [%d] (v1 was %d)", tcx.name, got, newID, oldID)
	}
	if f := clsBPFFilters(t, n, legacy); len(f) != 1 || f[0].Id != int(newID) {
		t.Errorf("cls_bpf filters of %s: %+v, want one running v2's program %d (v1 was %d)", legacy.name, f, newID, oldID)
	}
	if got := dirNames(t, filepath.Join(v1.BPFFSDir, "progs")); !slices.Equal(got, []string{"v2"}) {
		t.Errorf("progs/ holds %v, want [v2]", got)
	}
}

func TestDetachIdempotent(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ldr")
	l := newLoader(t)
	objs := load(t, l)

	t.Run("never attached", func(t *testing.T) {
		v := addVeth(t, n)
		detach(t, n, l, v)
		detach(t, n, l, veth{name: "nosuchif0", index: 1 << 20})
	})

	for _, mode := range []Mode{ModeTCX, ModeLegacy} {
		t.Run(string(mode)+" twice", func(t *testing.T) {
			v := addVeth(t, n)
			attach(t, n, l, objs, v, mode)
			detach(t, n, l, v)
			detach(t, n, l, v)
			eventually(t, 5*time.Second, func() error {
				if got := tcxPrograms(t, n, v); len(got) != 0 {
					return fmt.Errorf("tcx programs left on %s: %v", v.name, got)
				}
				return nil
			})
			if got := clsBPFFilters(t, n, v); len(got) != 0 {
				t.Errorf("cls_bpf filters left on %s: %+v", v.name, got)
			}
		})

		t.Run(string(mode)+" after the interface was deleted", func(t *testing.T) {
			v := addVeth(t, n)
			attach(t, n, l, objs, v, mode)
			delLink(t, n, v)
			detach(t, n, l, v)
			detach(t, n, l, v)
		})
	}

	// Nothing of any attachment is left.
	for _, dir := range []string{filepath.Join(l.BPFFSDir, "links"), filepath.Join(l.StateDir, "bpf-legacy")} {
		if names := dirNames(t, dir); len(names) != 0 {
			t.Errorf("%s still holds %v", dir, names)
		}
	}
}

// TestDetachKeepsRecreatedInterface: a legacy record names an interface
// and its ifindex; when an interface of that name was recreated (new
// ifindex), Detach must not touch the new interface's filter.
func TestDetachKeepsRecreatedInterface(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ldr")
	l := newLoader(t)
	objs := load(t, l)
	v := addVeth(t, n)
	attach(t, n, l, objs, v, ModeLegacy)

	// Someone else's interface now has v's ifindex under another name, with
	// a filter of its own at our handle.
	delLink(t, n, v)
	other := veth{name: testutil.UniqueName("lo"), index: v.index}
	do(t, n, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = other.name
		la.Index = other.index
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: testutil.UniqueName("lp")}); err != nil {
			return fmt.Errorf("add veth %s with ifindex %d: %w", other.name, other.index, err)
		}
		return nil
	})
	attach(t, n, New(l.BPFFSDir, t.TempDir()), objs, other, ModeLegacy)

	detach(t, n, l, v)
	if got := clsBPFFilters(t, n, other); len(got) != 1 {
		t.Errorf("Detach(%s) removed the filter of %s, which reuses its ifindex", v.name, other.name)
	}
}

func TestEnsureBPFFS(t *testing.T) {
	testutil.RequirePrivileged(t)
	dir := filepath.Join(t.TempDir(), "bpffs")
	// Registered after TempDir: unmounts before the directory is removed.
	t.Cleanup(func() {
		for {
			// Unmount every stacked mount, so a failing test leaves none.
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
				if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
					t.Errorf("unmount %s: %v", dir, err)
				}
				return
			}
		}
	})

	if ok, err := IsBPFFS(filepath.Dir(dir)); err != nil || ok {
		t.Fatalf("IsBPFFS(tempdir) = %v, %v; want false", ok, err)
	}
	for i := range 2 {
		if err := EnsureBPFFS(dir); err != nil {
			t.Fatalf("EnsureBPFFS #%d: %v", i+1, err)
		}
		if ok, err := IsBPFFS(dir); err != nil || !ok {
			t.Fatalf("after EnsureBPFFS #%d: IsBPFFS = %v, %v", i+1, ok, err)
		}
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if c := strings.Count(string(mounts), " "+dir+" "); c != 1 {
		t.Errorf("%s is mounted %d times, want once", dir, c)
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"": ModeAuto, "auto": ModeAuto, "tcx": ModeTCX, "legacy": ModeLegacy} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseMode("xdp"); err == nil {
		t.Error("ParseMode(xdp) succeeded")
	}
}
