package loader

import (
	"fmt"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestAttachClsactFirst: auto mode's choice for an unshaped pod attaches a
// cls_bpf filter on a fresh veth, and TCX where the device refuses clsact
// (an ingress qdisc, as the bandwidth plugin adds) or a foreign filter holds
// Tern's priority; the foreign qdisc and filter are left as they were.
func TestAttachClsactFirst(t *testing.T) {
	n, l, objs, id := attachWorld(t, "ldr")
	attachIn := func(v veth, mode Mode) Mode {
		t.Helper()
		return attachUsing(t, n, l, objs, v, mode)
	}

	t.Run("fresh veth", func(t *testing.T) {
		v := addVeth(t, n)
		if used := attachIn(v, ModeClsactFirst); used != ModeLegacy {
			t.Fatalf("used %q, want legacy", used)
		}
		wantClsBPF(t, n, l, objs, v, id)
		detach(t, n, l, v)
	})

	t.Run("ingress qdisc", func(t *testing.T) {
		v := addVeth(t, n)
		do(t, n, func() error {
			return netlink.QdiscAdd(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
				LinkIndex: v.index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS}})
		})
		if used := attachIn(v, ModeClsactFirst); used != ModeTCX {
			t.Fatalf("used %q, want tcx", used)
		}
		if got := tcxPrograms(t, n, v); len(got) != 1 || got[0] != id {
			t.Errorf("tcx programs %v, want [%d]", got, id)
		}
		var kinds []string
		do(t, n, func() error {
			lk, err := netlinksafe.LinkByName(v.name)
			if err != nil {
				return err
			}
			qs, err := netlinksafe.QdiscList(lk)
			for _, q := range qs {
				kinds = append(kinds, q.Type())
			}
			return err
		})
		if !slices.Contains(kinds, "ingress") || slices.Contains(kinds, "clsact") {
			t.Errorf("qdiscs %v, want the ingress qdisc kept and no clsact", kinds)
		}
		if err := checkAttached(n, l, objs, v); err != nil {
			t.Errorf("CheckAttached: %v", err)
		}
		detach(t, n, l, v)
	})

	t.Run("foreign filter at Tern's priority", func(t *testing.T) {
		v := addVeth(t, n)
		f := newForeignProgs(t)
		do(t, n, func() error {
			if err := netlink.QdiscAdd(&netlink.GenericQdisc{QdiscType: "clsact", QdiscAttrs: netlink.QdiscAttrs{
				LinkIndex: v.index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}); err != nil {
				return err
			}
			return netlink.FilterAdd(&netlink.BpfFilter{
				FilterAttrs: netlink.FilterAttrs{LinkIndex: v.index, Parent: netlink.HANDLE_MIN_INGRESS,
					Handle: 0x99, Protocol: unix.ETH_P_ALL, Priority: clsBPFPriority},
				Fd: f.passOK.FD(), Name: "foreign", DirectAction: true,
			})
		})
		if used := attachIn(v, ModeClsactFirst); used != ModeTCX {
			t.Fatalf("used %q, want tcx", used)
		}
		if got := tcxPrograms(t, n, v); len(got) != 1 || got[0] != id {
			t.Errorf("tcx programs %v, want [%d]", got, id)
		}
		if fs := clsBPFFilters(t, n, v); len(fs) != 1 || fs[0].Name != "foreign" {
			t.Errorf("cls_bpf filters %+v, want the foreign one only", fs)
		}
		detach(t, n, l, v)
	})
}

// TestAttachKeepsKind: re-attaching in auto mode (restore, a pod's second
// hook, tcAttach changed to auto) stays with the kind the hook has: a TCX
// link is updated, not joined by a filter, and a clsact filter replaced, not
// joined by a TCX link; either would run the program twice.
func TestAttachKeepsKind(t *testing.T) {
	n, l, objs, id := attachWorld(t, "ldr")
	for _, tc := range []struct {
		first, again, want Mode
	}{
		{ModeTCX, ModeClsactFirst, ModeTCX},
		{ModeLegacy, ModeAuto, ModeLegacy},
		{ModeLegacy, ModeClsactFirst, ModeLegacy},
		{ModeTCX, ModeAuto, ModeTCX},
	} {
		t.Run(fmt.Sprintf("%q then %q", tc.first, tc.again), func(t *testing.T) {
			v := addVeth(t, n)
			attach(t, n, l, objs, v, tc.first)
			var used Mode
			do(t, n, func() error {
				var err error
				used, err = l.Attach(objs, v.name, v.index, HookPodIngress, tc.again)
				return err
			})
			if used != tc.want {
				t.Errorf("used %q, want %q", used, tc.want)
			}
			tcx, cls := tcxPrograms(t, n, v), clsBPFFilters(t, n, v)
			if tc.want == ModeTCX && (len(tcx) != 1 || tcx[0] != id || len(cls) != 0) {
				t.Errorf("tcx %v, cls_bpf %d filter(s): want tcx [%d] only", tcx, len(cls), id)
			}
			if tc.want == ModeLegacy && (len(tcx) != 0 || len(cls) != 1) {
				t.Errorf("tcx %v, cls_bpf %d filter(s): want one cls_bpf filter only", tcx, len(cls))
			}
			detach(t, n, l, v)
			delLink(t, n, v)
		})
	}
}

// TestPrepareClsact: the clsact qdisc created before the records lock lets
// the cls_bpf attach skip its qdisc replace and foreign-filter check, but
// only on a device where PrepareClsact created the qdisc: where an ingress
// qdisc or a clsact qdisc with a foreign filter at Tern's priority is
// already there, it reports false and the attach checks and falls back to
// TCX as without it, leaving the foreign qdisc and filter alone.
func TestPrepareClsact(t *testing.T) {
	n, l, objs, id := attachWorld(t, "ldp")
	prepare := func(v veth) bool {
		t.Helper()
		var fresh bool
		do(t, n, func() error {
			var err error
			fresh, err = l.PrepareClsact(v.name, v.index)
			return err
		})
		return fresh
	}
	attachIn := func(v veth) Mode {
		t.Helper()
		return attachUsing(t, n, l, objs, v, ModeClsactFirst)
	}

	t.Run("fresh veth", func(t *testing.T) {
		v := addVeth(t, n)
		if !prepare(v) {
			t.Fatal("PrepareClsact on a veth without qdisc: not fresh")
		}
		if used := attachIn(v); used != ModeLegacy {
			t.Fatalf("used %q, want legacy", used)
		}
		wantClsBPF(t, n, l, objs, v, id)
		detach(t, n, l, v)
		if f := clsBPFFilters(t, n, v); len(f) != 0 {
			t.Errorf("cls_bpf filters after detach %+v, want none", f)
		}
	})

	t.Run("ingress qdisc", func(t *testing.T) {
		v := addVeth(t, n)
		do(t, n, func() error {
			return netlink.QdiscAdd(&netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{
				LinkIndex: v.index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS}})
		})
		if prepare(v) {
			t.Fatal("PrepareClsact next to an ingress qdisc: fresh")
		}
		if used := attachIn(v); used != ModeTCX {
			t.Fatalf("used %q, want tcx", used)
		}
		if got := tcxPrograms(t, n, v); len(got) != 1 || got[0] != id {
			t.Errorf("tcx programs %v, want [%d]", got, id)
		}
		detach(t, n, l, v)
	})

	t.Run("foreign filter at Tern's priority", func(t *testing.T) {
		v := addVeth(t, n)
		f := newForeignProgs(t)
		do(t, n, func() error {
			if err := netlink.QdiscAdd(clsactQdisc(v.index)); err != nil {
				return err
			}
			return netlink.FilterAdd(&netlink.BpfFilter{
				FilterAttrs: netlink.FilterAttrs{LinkIndex: v.index, Parent: netlink.HANDLE_MIN_INGRESS,
					Handle: 0x99, Protocol: unix.ETH_P_ALL, Priority: clsBPFPriority},
				Fd: f.passOK.FD(), Name: "foreign", DirectAction: true,
			})
		})
		if prepare(v) {
			t.Fatal("PrepareClsact on a clsact qdisc with a foreign filter: fresh")
		}
		if used := attachIn(v); used != ModeTCX {
			t.Fatalf("used %q, want tcx", used)
		}
		if fs := clsBPFFilters(t, n, v); len(fs) != 1 || fs[0].Name != "foreign" {
			t.Errorf("cls_bpf filters %+v, want the foreign one only", fs)
		}
		detach(t, n, l, v)
	})
}

// wantClsBPF checks that v's pod ingress hook holds program id as its one
// cls_bpf filter, no TCX program, and that CHECK accepts it.
func wantClsBPF(t *testing.T, n ns.NetNS, l *Loader, objs *Objects, v veth, id ebpf.ProgramID) {
	t.Helper()
	if f := clsBPFFilters(t, n, v); len(f) != 1 || f[0].Id != int(id) {
		t.Errorf("cls_bpf filters %+v, want one of program %d", f, id)
	}
	if got := tcxPrograms(t, n, v); len(got) != 0 {
		t.Errorf("tcx programs %v, want none", got)
	}
	if err := checkAttached(n, l, objs, v); err != nil {
		t.Errorf("CheckAttached: %v", err)
	}
}
