package e2e

import (
	"net"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/routing"
)

// tcIndexDecided is TERN_TC_INDEX_DECIDED (bpf/lib/verdict.h).
const tcIndexDecided = 0x8000

// tcIndexWitness is a tc program that counts the packets it sees in slot 0
// of an array, and those with TERN_TC_INDEX_DECIDED in skb->tc_index in
// slot 1; it passes everything on (TCX_NEXT).
func tcIndexWitness(t *testing.T) (*ebpf.Program, *ebpf.Map) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	const tcIndexOff = 44 // offsetof(struct __sk_buff, tc_index)
	count := func(key int32) asm.Instructions {
		return asm.Instructions{
			asm.StoreImm(asm.RFP, -4, int64(key), asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "next"+string(rune('0'+key))),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		}
	}
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	insns = append(insns, count(0)...)
	insns = append(insns,
		asm.LoadMem(asm.R2, asm.R6, tcIndexOff, asm.Word).WithSymbol("next0"),
		asm.And.Imm(asm.R2, tcIndexDecided),
		asm.JEq.Imm(asm.R2, 0, "next1"))
	insns = append(insns, count(1)...)
	insns = append(insns,
		asm.Mov.Imm(asm.R0, -1).WithSymbol("next1"), // TC_ACT_UNSPEC: TCX_NEXT
		asm.Return())
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, Instructions: insns, License: "GPL"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog, m
}

func witnessCounts(t *testing.T, m *ebpf.Map) (all, decided uint64) {
	t.Helper()
	if err := m.Lookup(uint32(0), &all); err != nil {
		t.Fatal(err)
	}
	if err := m.Lookup(uint32(1), &decided); err != nil {
		t.Fatal(err)
	}
	return all, decided
}

// TestMultiNodeDecidedPassesUplink: a pod's packet that tern_from_pod sends
// to a pod of another node itself (native routing, bpf_redirect_neigh) has
// had every question tern_to_uplink would ask answered; tern_from_pod says
// so in skb->tc_index (TERN_TC_INDEX_DECIDED), tern_to_uplink passes it at
// once and takes the bit off. Witness programs on node1's uplink, one on
// each side of tern_to_uplink in its TCX chain, see the bit on the pod's
// packets before it and on none after it. Traffic still flows both ways.
func TestMultiNodeDecidedPassesUplink(t *testing.T) {
	w := newMultiNode(t, "ebpf", routing.ModeNative)
	from := addPod(t, w.nodes[0].Node, w.nodes[0].conf, "dcpod")
	to := addPod(t, w.nodes[1].Node, w.nodes[1].conf, "dcpod")
	udpEchoServer(t, to.NS, 8081)
	w.sync(t, w.clusterNodes())

	before, beforeCounts := tcIndexWitness(t)
	after, afterCounts := tcIndexWitness(t)
	err := w.nodes[0].NS.Do(func(ns.NetNS) error {
		lk, err := netlink.LinkByName(mnUplink)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: lk.Attrs().Index, Attach: ebpf.AttachTCXEgress})
		if err != nil {
			return err
		}
		if len(res.Programs) != 1 {
			t.Fatalf("TCX egress of %s: %d programs, want tern_to_uplink alone", mnUplink, len(res.Programs))
		}
		toUplink := res.Programs[0].ID
		for _, a := range []struct {
			prog   *ebpf.Program
			anchor link.Anchor
		}{{before, link.BeforeProgramByID(toUplink)}, {after, link.AfterProgramByID(toUplink)}} {
			l, err := link.AttachTCX(link.TCXOptions{Interface: lk.Attrs().Index, Program: a.prog, Attach: ebpf.AttachTCXEgress, Anchor: a.anchor})
			if err != nil {
				return err
			}
			t.Cleanup(func() { l.Close() })
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	const exchanges = 5
	for i := 0; i < exchanges; i++ {
		if err := udpEchoVia(from.NS, net.JoinHostPort(to.IP, "8081")); err != nil {
			t.Fatalf("udp echo node1 -> node2: %v", err)
		}
	}
	if err := testutil.Ping(from.NS, to.IP, exchanges); err != nil {
		t.Fatalf("ping node1 -> node2: %v", err)
	}
	allBefore, decidedBefore := witnessCounts(t, beforeCounts)
	allAfter, decidedAfter := witnessCounts(t, afterCounts)
	t.Logf("before tern_to_uplink: %d packets, %d marked decided; after: %d, %d", allBefore, decidedBefore, allAfter, decidedAfter)
	if decidedBefore < 2*exchanges {
		t.Errorf("%d packets marked decided before tern_to_uplink, want the pod's %d at least", decidedBefore, 2*exchanges)
	}
	if decidedAfter != 0 {
		t.Errorf("%d packets still marked after tern_to_uplink, want 0: the bit must go no further", decidedAfter)
	}
	if allAfter < decidedBefore {
		t.Errorf("%d packets after tern_to_uplink, fewer than the %d marked before it", allAfter, decidedBefore)
	}
}
