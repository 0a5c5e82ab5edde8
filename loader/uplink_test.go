package loader

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// Names here start with ul so they cannot clash with the package's other
// tests.

// ulDo runs f in n and fails the test on error.
func ulDo(t *testing.T, n ns.NetNS, f func() error) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// TestMultiObject: New loads every embedded object as one version: both
// programs pinned under it, one set of maps shared by both (the uplink
// program uses the pod program's maps, not copies), data sections kept out
// of Objects.Maps.
func TestMultiObject(t *testing.T) {
	testutil.RequirePrivileged(t)
	l := New(testutil.MountBPFFS(t), t.TempDir())
	objs, err := l.Load()
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	for _, prog := range []string{ternbpf.TernProgTernFromPod, ternbpf.TernUplinkProgTernFromUplink} {
		if _, err := os.Stat(filepath.Join(l.BPFFSDir, progsDir, l.Version, prog)); err != nil {
			t.Errorf("program %s not pinned: %v", prog, err)
		}
	}
	for name := range objs.Maps {
		if name[0] == '.' {
			t.Errorf("Objects.Maps holds the data section %s", name)
		}
	}
	mapIDs := func(prog string) []ebpf.MapID {
		p, err := objs.Program(prog)
		if err != nil {
			t.Fatal(err)
		}
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		ids, _ := info.MapIDs()
		return ids
	}
	shared := map[ebpf.MapID]string{}
	for name, m := range objs.Maps {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		shared[id] = name
	}
	uses := map[string]bool{}
	for _, id := range mapIDs(ternbpf.TernUplinkProgTernFromUplink) {
		if name, ok := shared[id]; ok {
			uses[name] = true
		}
	}
	for _, name := range []string{ternbpf.TernMapTernEndpoints, ternbpf.TernMapTernNatRev, ternbpf.TernMapTernConfig, ternbpf.TernMapTernMetrics} {
		if !uses[name] {
			t.Errorf("tern_from_uplink does not use the shared %s (uses %v)", name, uses)
		}
	}

	// Opening the pinned version gives the same programs.
	again, err := New(l.BPFFSDir, l.StateDir).Load()
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if len(again.Programs) != len(objs.Programs) || len(again.Maps) != len(objs.Maps) {
		t.Errorf("reopened: %d programs, %d maps; want %d and %d", len(again.Programs), len(again.Maps), len(objs.Programs), len(objs.Maps))
	}
}

// TestUplinkHookUpgrade: the uplink attachment (TCX and legacy) follows an
// upgrade like the pod ones, Attachments lists it, Detach removes it.
func TestUplinkHookUpgrade(t *testing.T) {
	for _, mode := range []Mode{ModeTCX, ModeLegacy} {
		t.Run(string(mode), func(t *testing.T) {
			testutil.RequirePrivileged(t)
			n := testutil.NewNetNS(t, "ulup")
			name := testutil.UniqueName("ulv")
			var index int
			ulDo(t, n, func() error {
				if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
					return err
				}
				lk, err := netlinksafe.LinkByName(name)
				if err != nil {
					return err
				}
				index = lk.Attrs().Index
				return netlink.LinkSetUp(lk)
			})
			v1 := New(testutil.MountBPFFS(t), t.TempDir())
			var old, cur *Objects
			ulDo(t, n, func() error {
				var err error
				if old, err = v1.Load(); err != nil {
					return err
				}
				if _, err := v1.Attach(old, name, index, HookUplinkIngress, mode); err != nil {
					return err
				}
				return v1.CheckAttached(old, name, index, HookUplinkIngress)
			})
			defer old.Close()
			// Inside n: legacy records are checked against its interfaces.
			ulDo(t, n, func() error {
				if got, err := v1.Attachments(HookUplinkIngress); err != nil || !slices.Equal(got, []string{name}) {
					t.Errorf("Attachments: %v %v, want [%s]", got, err, name)
				}
				if got, _ := v1.Attachments(HookPodIngress); len(got) != 0 {
					t.Errorf("pod hook attachments: %v, want none", got)
				}
				return nil
			})

			v2 := &Loader{BPFFSDir: v1.BPFFSDir, StateDir: v1.StateDir, Specs: ternbpf.LoadSpecs, Version: "v2"}
			ulDo(t, n, func() error {
				var err error
				if cur, err = v2.Load(); err != nil {
					return err
				}
				return v2.CheckAttached(cur, name, index, HookUplinkIngress)
			})
			defer cur.Close()
			if err := n.Do(func(ns.NetNS) error { return v1.CheckAttached(old, name, index, HookUplinkIngress) }); err == nil {
				t.Error("the old uplink program is still attached after the upgrade")
			}
			entries, _ := os.ReadDir(filepath.Join(v1.BPFFSDir, progsDir))
			if len(entries) != 1 || entries[0].Name() != "v2" {
				t.Errorf("progs/ after the upgrade: %v", entries)
			}

			ulDo(t, n, func() error {
				if err := v2.Detach(name, HookUplinkIngress); err != nil {
					return err
				}
				if got, _ := v2.Attachments(HookUplinkIngress); len(got) != 0 {
					t.Errorf("Attachments after Detach: %v", got)
				}
				return nil
			})
			if err := n.Do(func(ns.NetNS) error { return v2.CheckAttached(cur, name, index, HookUplinkIngress) }); err == nil {
				t.Error("uplink program still attached after Detach")
			}
		})
	}
}
