package bpf

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// BenchmarkLBPath: what Tern's Service load balancer adds to a packet of
// tern_from_pod, kernel-timed with BPF_PROG_TEST_RUN in the NAT test world
// (lb_test.go): pod a's UDP request and pod b's answer of an established
// flow, to b's own address ("direct-*") and through a ClusterIP whose
// backend is b ("svc-*"), with 10 and 10,000 frontends in tern_lb_svc;
// "*-new" is a new flow's first packet (a fresh source port per run; through
// the Service: the backend choice and the two tern_lb_ct entries). No NetworkPolicy selects
// the pods, as in ternbench's services workload. "empty" is the method's
// floor (a program that only returns), to subtract. Reported: the mean and
// the median of the kernel's per-run times.
//
//	go test -run XXX -bench BenchmarkLBPath ./bpf/
func BenchmarkLBPath(b *testing.B) {
	w := newNATWorld(b, natOptions{})
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	const port, backendPort = 53, 5353
	udp := func(ep natEP, dst netip.Addr, sport, dport uint16) []byte {
		return w.podFrame(ep, natPkt{dst: dst, proto: unix.IPPROTO_UDP, sport: sport, dport: dport, payload: make([]byte, 18)})
	}
	for _, n := range []int{10, 10000} {
		lbReset(b, w)
		lbService(b, w, lbVIP, port, unix.IPPROTO_UDP, 1, TernLbSvc{}, lbBackend{w.b.ip, backendPort})
		for i := 2; i <= n; i++ { // the other frontends, one backend each that no packet reaches
			vip := netip.AddrFrom4([4]byte{10, 97, byte(i >> 8), byte(i)})
			lbService(b, w, vip, 80, unix.IPPROTO_TCP, uint32(i), TernLbSvc{},
				lbBackend{netip.AddrFrom4([4]byte{10, 245, byte(i >> 8), byte(i)}), 8080})
		}
		for _, c := range []struct {
			name    string
			prog    *ebpf.Program
			ifindex int
			frame   func(run int) []byte
			verdict uint32
		}{
			{"empty", empty, w.a.ifindex, func(int) []byte { return udp(w.a, w.b.ip, 40000, backendPort) }, natActOK},
			{"direct-request", w.fromPod, w.a.ifindex, func(int) []byte { return udp(w.a, w.b.ip, 40001, backendPort) }, natActRedirect},
			{"direct-reply", w.fromPod, w.b.ifindex, func(int) []byte { return udp(w.b, w.a.ip, backendPort, 40001) }, natActRedirect},
			{"direct-new", w.fromPod, w.a.ifindex, func(run int) []byte { return udp(w.a, w.b.ip, uint16(1024+run%60000), backendPort) }, natActRedirect},
			{"svc-request", w.fromPod, w.a.ifindex, func(int) []byte { return udp(w.a, lbVIP, 40002, port) }, natActRedirect},
			{"svc-reply", w.fromPod, w.b.ifindex, func(int) []byte { return udp(w.b, w.a.ip, backendPort, 40002) }, natActRedirect},
			{"svc-new", w.fromPod, w.a.ifindex, func(run int) []byte { return udp(w.a, lbVIP, uint16(1024+run%60000), port) }, natActRedirect},
			{"svc-new-full", w.fromPod, w.a.ifindex, func(run int) []byte { return udp(w.a, lbVIP, uint16(1024+run%60000), port) }, natActRedirect},
		} {
			if c.name == "svc-new-full" {
				fillLBCT(b, w.maps[TernMapTernLbCt])
			}
			b.Run(fmt.Sprintf("%s/frontends=%d", c.name, n), func(b *testing.B) {
				// The first packet opens the flow's entries (for the
				// replies: the request before them did).
				err := w.ns.Do(func(ns.NetNS) error { return benchRuns(b, c.prog, c.ifindex, c.frame, c.verdict) })
				if err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}

// fillLBCT fills tern_lb_ct to capacity with entries of flows that no
// packet will meet again, as a connection-rate run leaves it (two entries
// per connection, none removed before it expires): every new flow then
// evicts.
func fillLBCT(b *testing.B, m *ebpf.Map) {
	b.Helper()
	const batch = 4096
	n := int(m.MaxEntries())
	keys := make([]TernNatTuple, 0, batch)
	vals := make([]TernLbCtEntry, 0, batch)
	for i := 0; i < n; i++ {
		keys = append(keys, TernNatTuple{Saddr: 0x0a_f6_00_00 | uint32(i>>16), Daddr: 0x0a_60_00_0a,
			Sport: uint16(i), Dport: 80, Proto: unix.IPPROTO_TCP})
		vals = append(vals, TernLbCtEntry{LastSeen: 1, Addr: 0x0a_f4_01_03, Port: 80, RevId: 1})
		if len(keys) == batch || i == n-1 {
			if _, err := m.BatchUpdate(keys, vals, nil); err != nil {
				b.Fatal(err)
			}
			keys, vals = keys[:0], vals[:0]
		}
	}
}
