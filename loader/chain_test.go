package loader

import (
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// Chaining with programs and filters that are not Tern's, on real traffic:
// a "pod" namespace sends frames through a packet socket into a veth whose
// other end, in the "node" namespace, carries Tern's tern_from_pod and a
// foreign program.

// foreignProgs are two foreign tc programs: one that passes everything for
// good (TC_ACT_OK), and one that counts what it sees and lets it go on
// (TCX_NEXT).
type foreignProgs struct {
	passOK  *ebpf.Program
	counter *ebpf.Program
	count   *ebpf.Map // [0]: packets the counter saw
}

func newForeignProgs(t *testing.T) *foreignProgs {
	t.Helper()
	count, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { count.Close() })
	passOK, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "foreign_ok", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { passOK.Close() })
	counter, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "foreign_count", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, count.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, -1).WithSymbol("out"), // TCX_NEXT / TC_ACT_UNSPEC
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { counter.Close() })
	return &foreignProgs{passOK: passOK, counter: counter, count: count}
}

func (f *foreignProgs) seen(t *testing.T) uint64 {
	t.Helper()
	var v uint64
	if err := f.count.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// chainWorld is a node namespace holding the host end of a veth whose
// peer is in a pod namespace, with Tern loaded and the pod registered as
// the endpoint 10.66.0.2 behind the host end.
type chainWorld struct {
	node, pod ns.NetNS
	host      veth
	hostMAC   net.HardwareAddr
	podMAC    net.HardwareAddr
	l         *Loader
	objs      *Objects
}

var chainPodIP = [4]byte{10, 66, 0, 2}

func newChainWorld(t *testing.T) *chainWorld {
	t.Helper()
	testutil.RequirePrivileged(t)
	w := &chainWorld{node: testutil.NewNetNS(t, "chn"), pod: testutil.NewNetNS(t, "chp")}
	w.host.name = testutil.UniqueName("ch")
	do(t, w.node, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = w.host.name
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(w.pod.Fd()))}); err != nil {
			return err
		}
		lk, err := netlinksafe.LinkByName(w.host.name)
		if err != nil {
			return err
		}
		w.host.index, w.hostMAC = lk.Attrs().Index, lk.Attrs().HardwareAddr
		return netlink.LinkSetUp(lk)
	})
	do(t, w.pod, func() error {
		lk, err := netlinksafe.LinkByName("eth0")
		if err != nil {
			return err
		}
		w.podMAC = lk.Attrs().HardwareAddr
		return netlink.LinkSetUp(lk)
	})
	w.l = newLoader(t)
	w.objs = load(t, w.l)
	eps, err := w.objs.Map(ternbpf.TernMapTernEndpoints)
	if err != nil {
		t.Fatal(err)
	}
	var ep ternbpf.TernEndpoint
	ep.Ifindex = uint32(w.host.index)
	copy(ep.PodMac[:], w.podMAC)
	copy(ep.HostMac[:], w.hostMAC)
	if err := eps.Put(binary.NativeEndian.Uint32(chainPodIP[:]), ep); err != nil {
		t.Fatal(err)
	}
	return w
}

// attachForeign attaches prog at TCX ingress of the host end with anchor.
func (w *chainWorld) attachForeign(t *testing.T, prog *ebpf.Program, anchor link.Anchor) link.Link {
	t.Helper()
	var lk link.Link
	do(t, w.node, func() error {
		var err error
		lk, err = link.AttachTCX(link.TCXOptions{Interface: w.host.index, Program: prog, Attach: ebpf.AttachTCXIngress, Anchor: anchor})
		if err != nil {
			return fmt.Errorf("attach foreign tcx: %w", err)
		}
		t.Cleanup(func() { lk.Close() })
		return nil
	})
	return lk
}

// send sends a UDP datagram from src to dst (10.99.0.1: nothing of
// Tern's, so tern_from_pod hands it on to the stack) out of the pod's eth0,
// and waits until Tern's metrics have moved by one packet.
func (w *chainWorld) send(t *testing.T, src [4]byte) {
	t.Helper()
	before := w.ternPackets(t)
	u := []byte{0x9c, 0x40, 0x1f, 0x90, 0, 9, 0, 0, 'x'}
	ip := []byte{0x45, 0, 0, byte(20 + len(u)), 0, 1, 0x40, 0, 64, unix.IPPROTO_UDP, 0, 0}
	ip = append(append(ip, src[:]...), 10, 99, 0, 1)
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	frame := append(append(append([]byte{}, w.hostMAC...), w.podMAC...), 0x08, 0x00)
	frame = append(append(frame, ip...), u...)
	do(t, w.pod, func() error {
		lk, err := netlinksafe.LinkByName("eth0")
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: lk.Attrs().Index, Halen: 6}
		copy(sa.Addr[:], w.hostMAC)
		return unix.Sendto(fd, frame, 0, sa)
	})
	// veth delivers on the sending thread (or its backlog): wait for it
	// without assuming a time.
	deadline := time.Now().Add(5 * time.Second)
	for w.ternPackets(t) == before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
}

// metrics reads Tern's counters by metric.
func (w *chainWorld) metrics(t *testing.T) map[ternbpf.TernMetric]uint64 {
	t.Helper()
	m, err := w.objs.Map(ternbpf.TernMapTernMetrics)
	if err != nil {
		t.Fatal(err)
	}
	out := map[ternbpf.TernMetric]uint64{}
	for i := range ternbpf.TernMetricMETRIC_MAX {
		var per []ternbpf.TernMetricValue
		if err := m.Lookup(uint32(i), &per); err != nil {
			t.Fatal(err)
		}
		for _, v := range per {
			out[i] += v.Packets
		}
	}
	return out
}

// ternPackets is every packet Tern counted, whatever the outcome.
func (w *chainWorld) ternPackets(t *testing.T) uint64 {
	var n uint64
	for _, v := range w.metrics(t) {
		n += v
	}
	return n
}

var chainSpoofed = [4]byte{10, 66, 0, 99}

// TestChainTCX: Tern attaches at the head of the TCX chain, so a foreign
// program that was there first and passes everything with TC_ACT_OK does
// not switch off anti-spoofing; Tern passes with TCX_NEXT, so a foreign
// program after it still sees what Tern hands to the stack (and not what
// it drops); CheckAttached reports a foreign program put in front of Tern.
func TestChainTCX(t *testing.T) {
	w := newChainWorld(t)
	f := newForeignProgs(t)
	first := w.attachForeign(t, f.passOK, link.Head()) // there before Tern
	attach(t, w.node, w.l, w.objs, w.host, ModeTCX)
	w.attachForeign(t, f.counter, link.Tail())
	if got := tcxPrograms(t, w.node, w.host); len(got) != 3 || got[0] != progID(t, w.objs) {
		t.Errorf("tcx ingress runs %v, want Tern's %d first of 3", got, progID(t, w.objs))
	}
	if err := checkAttached(w.node, w.l, w.objs, w.host); err != nil {
		t.Errorf("CheckAttached with Tern first: %v", err)
	}

	w.send(t, chainSpoofed)
	if m := w.metrics(t); m[ternbpf.TernMetricMETRIC_DROP_SPOOFED] != 1 {
		t.Errorf("spoofed datagram: Tern's counters %v, want one drop_spoofed (Tern did not run first)", m)
	}
	w.send(t, chainPodIP)
	if m := w.metrics(t); m[ternbpf.TernMetricMETRIC_PASS_HOST] != 1 {
		t.Errorf("valid datagram: Tern's counters %v, want one pass_host", m)
	}
	// The OK program between Tern and the counter ends the chain, so
	// take it out and check the counter sees Tern's pass.
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	w.send(t, chainPodIP)
	if n := f.seen(t); n != 1 {
		t.Errorf("foreign program after Tern saw %d packets, want 1 (the one Tern passed)", n)
	}
	w.send(t, chainSpoofed)
	if n := f.seen(t); n != 1 {
		t.Errorf("foreign program after Tern saw %d packets, want still 1 (Tern dropped the spoofed one)", n)
	}

	// Something put in front of Tern: CHECK says so.
	w.attachForeign(t, f.passOK, link.Head())
	err := checkAttached(w.node, w.l, w.objs, w.host)
	if err == nil || !strings.Contains(err.Error(), "runs after") {
		t.Errorf("CheckAttached with a foreign program first: %v, want a runs-after error", err)
	}
}

// TestChainClsact: in clsact mode Tern's filter (priority 1) passes with
// TC_ACT_UNSPEC, so a foreign filter at a later priority still sees what
// Tern passes; a foreign filter holding priority 1 is never replaced or
// joined (Attach fails and leaves it as it was); CheckAttached reports a
// foreign filter sharing Tern's priority and a TCX program, which runs
// before clsact.
func TestChainClsact(t *testing.T) {
	w := newChainWorld(t)
	f := newForeignProgs(t)
	foreignFilter := func(prog *ebpf.Program, prio uint16, handle uint32) *netlink.BpfFilter {
		return &netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{LinkIndex: w.host.index, Parent: netlink.HANDLE_MIN_INGRESS,
				Handle: handle, Protocol: unix.ETH_P_ALL, Priority: prio},
			Fd: prog.FD(), Name: "foreign", DirectAction: true,
		}
	}
	addClsact := func() error {
		return netlink.QdiscReplace(&netlink.GenericQdisc{
			QdiscAttrs: netlink.QdiscAttrs{LinkIndex: w.host.index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
			QdiscType:  "clsact",
		})
	}
	foreignID, err := ProgramID(f.passOK)
	if err != nil {
		t.Fatal(err)
	}

	// A foreign filter at priority 1 with Tern's very handle.
	do(t, w.node, func() error {
		if err := addClsact(); err != nil {
			return err
		}
		return netlink.FilterAdd(foreignFilter(f.passOK, 1, clsBPFHandle))
	})
	err = w.node.Do(func(ns.NetNS) error {
		_, err := w.l.Attach(w.objs, w.host.name, w.host.index, HookPodIngress, ModeLegacy)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), "foreign") {
		t.Errorf("Attach over a foreign priority-1 filter: %v, want a refusal", err)
	}
	if got := clsBPFFilters(t, w.node, w.host); len(got) != 1 || got[0].Id != int(foreignID) {
		t.Fatalf("filters after the refused attach: %+v, want the foreign one (id %d) untouched", got, foreignID)
	}

	// Moved out of the way to priority 5, counting: Tern attaches at 1.
	do(t, w.node, func() error {
		if err := netlink.FilterDel(foreignFilter(f.passOK, 1, clsBPFHandle)); err != nil {
			return err
		}
		return netlink.FilterAdd(foreignFilter(f.counter, 5, 1))
	})
	attach(t, w.node, w.l, w.objs, w.host, ModeLegacy)
	if err := checkAttached(w.node, w.l, w.objs, w.host); err != nil {
		t.Errorf("CheckAttached with Tern first: %v", err)
	}
	w.send(t, chainPodIP)
	w.send(t, chainSpoofed)
	if m := w.metrics(t); m[ternbpf.TernMetricMETRIC_PASS_HOST] != 1 || m[ternbpf.TernMetricMETRIC_DROP_SPOOFED] != 1 {
		t.Errorf("Tern's counters %v, want one pass_host and one drop_spoofed", m)
	}
	if n := f.seen(t); n != 1 {
		t.Errorf("foreign filter at priority 5 saw %d packets, want 1 (the one Tern passed)", n)
	}

	// A foreign filter joins Tern's priority: CHECK says so.
	do(t, w.node, func() error { return netlink.FilterAdd(foreignFilter(f.passOK, 1, 0x99)) })
	if err := checkAttached(w.node, w.l, w.objs, w.host); err == nil || !strings.Contains(err.Error(), "does not run first") {
		t.Errorf("CheckAttached with a foreign filter at Tern's priority: %v, want a does-not-run-first error", err)
	}
	do(t, w.node, func() error { return netlink.FilterDel(foreignFilter(f.passOK, 1, 0x99)) })
	if err := checkAttached(w.node, w.l, w.objs, w.host); err != nil {
		t.Errorf("CheckAttached after the foreign filter left: %v", err)
	}
	// A TCX program runs before every clsact filter.
	w.attachForeign(t, f.counter, link.Head())
	if err := checkAttached(w.node, w.l, w.objs, w.host); err == nil || !strings.Contains(err.Error(), "TCX") {
		t.Errorf("CheckAttached with a TCX program in front: %v, want an error naming TCX", err)
	}
}
