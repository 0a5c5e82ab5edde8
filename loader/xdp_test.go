package loader

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// TestUplinkXDPHook: the uplink's XDP program attaches in driver mode by a
// pinned link (whatever tc mode is asked), CheckAttached sees it, attaching
// again keeps one attachment, an upgrade points the link at the new
// program, Detach takes it off; a device without native XDP refuses.
func TestUplinkXDPHook(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "ulxdp")
	name := testutil.UniqueName("ulx")
	var index, bridgeIndex int
	ulDo(t, n, func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
			return err
		}
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "ulbridge"}}); err != nil {
			return err
		}
		lk, err := netlinksafe.LinkByName(name)
		if err != nil {
			return err
		}
		index = lk.Attrs().Index
		d, err := netlinksafe.LinkByName("ulbridge")
		if err != nil {
			return err
		}
		bridgeIndex = d.Attrs().Index
		return netlink.LinkSetUp(lk)
	})
	xdpProg := func() uint32 {
		var id uint32
		ulDo(t, n, func() error {
			lk, err := netlinksafe.LinkByName(name)
			if err != nil {
				return err
			}
			if x := lk.Attrs().Xdp; x != nil && x.Attached && x.AttachMode == 1 /* XDP_ATTACHED_DRV */ {
				id = x.ProgId
			}
			return nil
		})
		return id
	}
	v1 := New(testutil.MountBPFFS(t), t.TempDir())
	var old, cur *Objects
	ulDo(t, n, func() error {
		var err error
		if old, err = v1.Load(); err != nil {
			return err
		}
		for range 2 {
			mode, err := v1.Attach(old, name, index, HookUplinkXDP, ModeLegacy)
			if err != nil {
				return err
			}
			if mode != ModeXDP {
				t.Errorf("Attach mode %q, want %q", mode, ModeXDP)
			}
		}
		return v1.CheckAttached(old, name, index, HookUplinkXDP)
	})
	defer old.Close()
	oldID, _ := ProgramID(old.Programs[ternbpf.TernXDPProgTernXdpUplink])
	if got := xdpProg(); got != uint32(oldID) {
		t.Fatalf("XDP program (driver mode) on %s: id %d, want %d", name, got, oldID)
	}
	ulDo(t, n, func() error {
		if got, err := v1.Attachments(HookUplinkXDP); err != nil || !slices.Equal(got, []string{name}) {
			t.Errorf("Attachments: %v %v, want [%s]", got, err, name)
		}
		if _, err := v1.Attach(old, "ulbridge", bridgeIndex, HookUplinkXDP, ModeAuto); err == nil {
			t.Error("XDP attached in driver mode to a bridge (no native XDP)")
		}
		return nil
	})
	if _, err := os.Stat(v1.linkPin("ulbridge", HookUplinkXDP)); err == nil {
		t.Error("a failed attach left a link pin")
	}

	v2 := &Loader{BPFFSDir: v1.BPFFSDir, StateDir: v1.StateDir, Specs: ternbpf.LoadSpecs, Version: "v2"}
	ulDo(t, n, func() error {
		var err error
		if cur, err = v2.Load(); err != nil {
			return err
		}
		return v2.CheckAttached(cur, name, index, HookUplinkXDP)
	})
	defer cur.Close()
	curID, _ := ProgramID(cur.Programs[ternbpf.TernXDPProgTernXdpUplink])
	if got := xdpProg(); got != uint32(curID) || curID == oldID {
		t.Errorf("after the upgrade: XDP program id %d, want the new %d (old %d)", got, curID, oldID)
	}
	if err := n.Do(func(ns.NetNS) error { return v1.CheckAttached(old, name, index, HookUplinkXDP) }); err == nil {
		t.Error("CheckAttached accepts the old program after the upgrade")
	}
	if entries, _ := os.ReadDir(filepath.Join(v1.BPFFSDir, progsDir)); len(entries) != 1 || entries[0].Name() != "v2" {
		t.Errorf("progs/ after the upgrade: %v", entries)
	}

	ulDo(t, n, func() error { return v2.Detach(name, HookUplinkXDP) })
	if got := xdpProg(); got != 0 {
		t.Errorf("XDP program %d still on %s after Detach", got, name)
	}
	if err := n.Do(func(ns.NetNS) error { return v2.CheckAttached(cur, name, index, HookUplinkXDP) }); err == nil {
		t.Error("CheckAttached passes after Detach")
	}
}
