package bpf

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/policy/compile"
)

// Tern's Service load balancer (lib/lb.h) on crafted packets, in the NAT
// test world (snat_test.go): pods a, b, c are 10.244.1.2-4 with
// ENDPOINT_F_LB set; the maps are written as datapath/ebpf writes them.

var (
	lbVIP      = netip.MustParseAddr("10.96.0.10")
	lbLoopback = netip.MustParseAddr("169.254.42.1") // the objects' default
)

type lbBackend struct {
	ip   netip.Addr
	port uint16
}

// lbReset empties every map of natWorld.reset and the load balancer's,
// and marks the endpoints as balanced by Tern.
func lbReset(t testing.TB, w *natWorld) {
	t.Helper()
	w.reset(t)
	for _, name := range []string{TernMapTernLbSvc, TernMapTernLbBackends, TernMapTernLbRev, TernMapTernLbCt, TernMapTernLbAffinity, TernMapTernEpPolicy, TernMapTernPolicyCt} {
		clearMap(t, w.maps[name])
	}
	for _, ep := range []natEP{w.a, w.b, w.c} {
		v := ep.value()
		v.Flags |= uint32(TernEndpointFlagsENDPOINT_F_LB)
		if err := w.maps[TernMapTernEndpoints].Put(natAddr(ep.ip), v); err != nil {
			t.Fatal(err)
		}
	}
}

func clearMap(t testing.TB, m *ebpf.Map) {
	t.Helper()
	var (
		k, v []byte
		keys [][]byte
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, bytes.Clone(k))
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
}

// lbService writes a frontend with its rev-NAT entry and backend slots.
func lbService(t testing.TB, w *natWorld, vip netip.Addr, port uint16, proto uint8, id uint32, svc TernLbSvc, backends ...lbBackend) {
	t.Helper()
	svc.Id, svc.Count = id, uint32(len(backends))
	for i, b := range backends {
		if err := w.maps[TernMapTernLbBackends].Put(TernLbSlotKey{Id: id, Slot: uint32(i)}, TernLbBackend{Addr: natAddr(b.ip), Port: natPort(b.port)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.maps[TernMapTernLbRev].Put(id, TernLbBackend{Addr: natAddr(vip), Port: natPort(port)}); err != nil {
		t.Fatal(err)
	}
	if err := w.maps[TernMapTernLbSvc].Put(TernLbSvcKey{Addr: natAddr(vip), Port: natPort(port), Proto: proto}, svc); err != nil {
		t.Fatal(err)
	}
}

// lbRun runs prog and checks the verdict and the metrics that moved.
func lbRun(t *testing.T, w *natWorld, prog *ebpf.Program, ifindex int, frame []byte, want uint32, metrics ...TernMetric) []byte {
	t.Helper()
	before := w.metrics(t)
	verdict, out := w.run(t, prog, ifindex, frame)
	if verdict != want {
		t.Errorf("verdict %d, want %d", verdict, want)
	}
	after := w.metrics(t)
	wantM := map[TernMetric]uint64{}
	for _, m := range metrics {
		wantM[m]++
	}
	for m := range TernMetricMETRIC_MAX {
		if d := after[m] - before[m]; d != wantM[m] {
			t.Errorf("metric %d moved by %d, want %d", m, d, wantM[m])
		}
	}
	return out
}

func (w *natWorld) podFrame(ep natEP, p natPkt) []byte {
	p.srcMAC, p.dstMAC = ep.mac, ep.hostMAC
	if !p.src.IsValid() {
		p.src = ep.ip
	}
	return p.frame()
}

// DNAT before delivery, reverse NAT of the answer, for TCP and UDP; the
// flow stays on its backend when the slots change; SCTP with the same
// port; a pod of a network without ENDPOINT_F_LB is not balanced.
func TestLBDNATAndReverse(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	redirect := uint32(natActRedirect)
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		lbReset(t, w)
		lbService(t, w, lbVIP, 53, proto, 7, TernLbSvc{}, lbBackend{w.b.ip, 5353})
		// a's first packet is DNATed to b and delivered into b.
		out := lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: proto, sport: 40000, dport: 53, tcpFlags: natTCPSyn, payload: []byte("query")}),
			redirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
		p := natParse(t, out)
		if p.src != w.a.ip || p.dst != w.b.ip || p.sport != 40000 || p.dport != 5353 || !bytes.Equal(p.dstMAC, w.b.mac) || string(p.payload) != "query" {
			t.Errorf("proto %d: DNATed to %s:%d from %s:%d (mac %s)", proto, p.dst, p.dport, p.src, p.sport, p.dstMAC)
		}
		// b's answer leaves from the Service address into a.
		out = lbRun(t, w, w.fromPod, w.b.ifindex, w.podFrame(w.b, natPkt{dst: w.a.ip, proto: proto, sport: 5353, dport: 40000, tcpFlags: natTCPSyn | natTCPAck, payload: []byte("answer")}),
			redirect, TernMetricMETRIC_LB_REV_NAT, TernMetricMETRIC_REDIRECT_PEER)
		p = natParse(t, out)
		if p.src != lbVIP || p.sport != 53 || p.dst != w.a.ip || p.dport != 40000 || !bytes.Equal(p.dstMAC, w.a.mac) {
			t.Errorf("proto %d: answer from %s:%d to %s:%d", proto, p.src, p.sport, p.dst, p.dport)
		}
		// The slot now names c: the flow stays on b (pinned), a new
		// flow goes to c.
		lbService(t, w, lbVIP, 53, proto, 7, TernLbSvc{}, lbBackend{w.c.ip, 5353})
		out = lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: proto, sport: 40000, dport: 53, tcpFlags: natTCPAck}),
			redirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
		if p = natParse(t, out); p.dst != w.b.ip {
			t.Errorf("proto %d: established flow moved to %s", proto, p.dst)
		}
		out = lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: proto, sport: 40001, dport: 53, tcpFlags: natTCPSyn}),
			redirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
		if p = natParse(t, out); p.dst != w.c.ip {
			t.Errorf("proto %d: new flow went to %s", proto, p.dst)
		}
		// Not a frontend (another port): not translated (here
		// masqueraded as any destination outside the cluster).
		out = lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: proto, sport: 40000, dport: 54}),
			redirect, TernMetricMETRIC_SNAT)
		if p = natParse(t, out); p.dst != lbVIP || p.dport != 54 {
			t.Errorf("proto %d: packet to a non-frontend went to %s:%d", proto, p.dst, p.dport)
		}
	}

	// SCTP: addresses translated (its CRC32c covers no pseudo header),
	// the port kept.
	lbReset(t, w)
	lbService(t, w, lbVIP, 9000, unix.IPPROTO_SCTP, 3, TernLbSvc{}, lbBackend{w.b.ip, 9000})
	out := lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: unix.IPPROTO_SCTP, l4: sctpHeader(5000, 9000)}),
		redirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
	if dst := netip.AddrFrom4([4]byte(out[30:34])); dst != w.b.ip || !bytes.Equal(out[34:46], sctpHeader(5000, 9000)) {
		t.Errorf("SCTP DNATed to %s, header % x", dst, out[34:46])
	}

	// A pod whose network leaves Services to kube-proxy: not balanced.
	lbReset(t, w)
	lbService(t, w, lbVIP, 53, unix.IPPROTO_UDP, 7, TernLbSvc{}, lbBackend{w.b.ip, 5353})
	if err := w.maps[TernMapTernEndpoints].Put(natAddr(w.a.ip), w.a.value()); err != nil {
		t.Fatal(err)
	}
	frame := w.podFrame(w.a, natPkt{dst: lbVIP, proto: unix.IPPROTO_UDP, sport: 40000, dport: 53})
	if out := lbRun(t, w, w.fromPod, w.a.ifindex, frame, redirect, TernMetricMETRIC_SNAT); natParse(t, out).dst != lbVIP {
		t.Errorf("kube-proxy-mode pod's packet was DNATed")
	}
}

// A backend on another node: DNATed and handed to the host stack (routed
// to the node of the backend); the answer arriving on the uplink is
// reverse-translated and delivered into the client.
func TestLBRemoteBackend(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	lbService(t, w, lbVIP, 80, unix.IPPROTO_TCP, 9, TernLbSvc{}, lbBackend{natOtherPod, 8080})
	out := lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: unix.IPPROTO_TCP, sport: 41000, dport: 80, tcpFlags: natTCPSyn}),
		natActOK, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_PASS_HOST)
	if p := natParse(t, out); p.dst != natOtherPod || p.dport != 8080 || p.src != w.a.ip {
		t.Errorf("DNATed to %s:%d from %s", p.dst, p.dport, p.src)
	}
	answer := natPkt{src: natOtherPod, dst: w.a.ip, proto: unix.IPPROTO_TCP, sport: 8080, dport: 41000, tcpFlags: natTCPSyn | natTCPAck}
	answer.srcMAC, answer.dstMAC = []byte{2, 0, 0, 0, 0, 2}, w.uplinkMAC
	out = lbRun(t, w, w.fromUplink, w.uplink, answer.frame(), natActRedirect, TernMetricMETRIC_LB_REV_NAT, TernMetricMETRIC_REDIRECT_PEER)
	if p := natParse(t, out); p.src != lbVIP || p.sport != 80 || p.dst != w.a.ip || !bytes.Equal(p.dstMAC, w.a.mac) {
		t.Errorf("answer from %s:%d to %s", p.src, p.sport, p.dst)
	}
	// Something else from that pod is not translated.
	other := answer
	other.sport = 8081
	lbRun(t, w, w.fromUplink, w.uplink, other.frame(), natActOK, TernMetricMETRIC_PASS_UPLINK)
}

// A backend in the host stack of this node (a host-network pod, the API
// server behind the kubernetes Service): the pod's packet is DNATed to the
// node's address and handed to the stack; the host's answer, which the
// stack sends into the pod through the host veth (tern_to_pod), leaves
// from the frontend the pod addressed.
func TestLBHostNetworkBackend(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	lbService(t, w, lbVIP, 443, unix.IPPROTO_TCP, 11, TernLbSvc{}, lbBackend{natNodeIP, 16443})
	out := lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: unix.IPPROTO_TCP, sport: 42000, dport: 443, tcpFlags: natTCPSyn}),
		natActOK, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_PASS_HOST)
	if p := natParse(t, out); p.dst != natNodeIP || p.dport != 16443 || p.src != w.a.ip {
		t.Errorf("DNATed to %s:%d from %s", p.dst, p.dport, p.src)
	}
	answer := natPkt{src: natNodeIP, dst: w.a.ip, proto: unix.IPPROTO_TCP, sport: 16443, dport: 42000, tcpFlags: natTCPSyn | natTCPAck}
	answer.srcMAC, answer.dstMAC = w.a.hostMAC, w.a.mac
	out = lbRun(t, w, w.toPod, w.a.ifindex, answer.frame(), natActOK, TernMetricMETRIC_LB_REV_NAT, TernMetricMETRIC_PASS_TO_POD)
	if p := natParse(t, out); p.src != lbVIP || p.sport != 443 || p.dst != w.a.ip || p.dport != 42000 {
		t.Errorf("answer from %s:%d to %s:%d, want from %s:443", p.src, p.sport, p.dst, p.dport, lbVIP)
	}
	// Another flow from the host to the pod is not translated.
	other := answer
	other.sport = 16444
	if p := natParse(t, lbRun(t, w, w.toPod, w.a.ifindex, other.frame(), natActOK, TernMetricMETRIC_PASS_TO_POD)); p.src != natNodeIP || p.sport != 16444 {
		t.Errorf("unrelated host packet rewritten to %s:%d", p.src, p.sport)
	}
}

// ClientIP affinity: every flow of a client goes to the backend its first
// flow got, while the affinity entry is fresh; another client is balanced
// on its own; an expired entry, or one whose backend left its slot, is
// balanced again.
func TestLBAffinity(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	backends := []lbBackend{{natOtherPod, 80}, {netip.MustParseAddr("10.244.2.6"), 80}, {netip.MustParseAddr("10.244.2.7"), 80}, {netip.MustParseAddr("10.244.2.8"), 80}}
	lbService(t, w, lbVIP, 80, unix.IPPROTO_TCP, 4, TernLbSvc{AffinityTimeout: 60}, backends...)
	send := func(ep natEP, sport uint16) netip.Addr {
		t.Helper()
		out := lbRun(t, w, w.fromPod, ep.ifindex, w.podFrame(ep, natPkt{dst: lbVIP, proto: unix.IPPROTO_TCP, sport: sport, dport: 80, tcpFlags: natTCPSyn}),
			natActOK, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_PASS_HOST)
		return natParse(t, out).dst
	}
	first := send(w.a, 30000)
	for sport := uint16(30001); sport < 30040; sport++ {
		if got := send(w.a, sport); got != first {
			t.Fatalf("flow %d of the same client went to %s, first to %s", sport, got, first)
		}
	}
	// Without affinity the same 40 flows spread (4 backends).
	ak := TernLbAffinityKey{Client: natAddr(w.a.ip), Id: 4}
	var aff TernLbAffinity
	if err := w.maps[TernMapTernLbAffinity].Lookup(ak, &aff); err != nil || aff.Addr != natAddr(first) {
		t.Fatalf("affinity entry %+v: %v", aff, err)
	}
	// Expired: balanced again (and the entry refreshed to the new choice).
	seen := map[netip.Addr]bool{}
	for sport := uint16(31000); sport < 31040; sport++ {
		aff.LastSeen = natMonoNow(t) - 61e9
		if err := w.maps[TernMapTernLbAffinity].Put(ak, aff); err != nil {
			t.Fatal(err)
		}
		seen[send(w.a, sport)] = true
	}
	if len(seen) < 2 {
		t.Errorf("expired affinity: 40 flows all went to %v", seen)
	}
	// The backend left its slot (another backend moved in): balanced again.
	if err := w.maps[TernMapTernLbAffinity].Lookup(ak, &aff); err != nil {
		t.Fatal(err)
	}
	other := backends[0]
	if natAddr(other.ip) == aff.Addr {
		other = backends[1]
	}
	if err := w.maps[TernMapTernLbBackends].Put(TernLbSlotKey{Id: 4, Slot: uint32(aff.Pad)}, TernLbBackend{Addr: natAddr(other.ip), Port: natPort(80)}); err != nil {
		t.Fatal(err)
	}
	if got := send(w.a, 32000); natAddr(got) == aff.Addr {
		t.Errorf("went to %s, which left its slot", got)
	}

	// A stamp ahead of the program's clock (written with the fine clock
	// by sock_lb.c, read here with the coarse one, which lags it by up
	// to a tick) is fresh: the flows keep the affinity backend.
	if err := w.maps[TernMapTernLbAffinity].Lookup(ak, &aff); err != nil {
		t.Fatal(err)
	}
	pinned := aff.Addr
	for sport := uint16(33000); sport < 33040; sport++ {
		aff.LastSeen = natMonoNow(t) + 1e9
		if err := w.maps[TernMapTernLbAffinity].Put(ak, aff); err != nil {
			t.Fatal(err)
		}
		if got := send(w.a, sport); natAddr(got) != pinned {
			t.Fatalf("stamp ahead of the clock: flow %d went to %s, not the affinity backend", sport, got)
		}
	}
}

// The reply entry of a pod's flow carries its frontend (LB_CT_F_FRONTEND),
// so the answer is translated without the tern_lb_rev lookup: with that
// entry deleted it still leaves from the Service address. A reply entry
// written by an older object (the client's address in it, no flag) is
// still translated through tern_lb_rev.
func TestLBReplyCarriesFrontend(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	redirect := uint32(natActRedirect)
	lbReset(t, w)
	lbService(t, w, lbVIP, 53, unix.IPPROTO_UDP, 7, TernLbSvc{}, lbBackend{w.b.ip, 5353})
	lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: unix.IPPROTO_UDP, sport: 40000, dport: 53}),
		redirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
	rk := TernNatTuple{Saddr: natAddr(w.b.ip), Daddr: natAddr(w.a.ip), Sport: natPort(5353), Dport: natPort(40000), Proto: unix.IPPROTO_UDP}
	var e TernLbCtEntry
	if err := w.maps[TernMapTernLbCt].Lookup(rk, &e); err != nil {
		t.Fatalf("reply entry: %v", err)
	}
	if e.Flags&uint16(TernLbCtFlagsLB_CT_F_FRONTEND) == 0 || e.Addr != natAddr(lbVIP) || e.Port != natPort(53) {
		t.Fatalf("reply entry %+v does not carry the frontend %s:53", e, lbVIP)
	}
	if err := w.maps[TernMapTernLbRev].Delete(uint32(7)); err != nil {
		t.Fatal(err)
	}
	answer := w.podFrame(w.b, natPkt{dst: w.a.ip, proto: unix.IPPROTO_UDP, sport: 5353, dport: 40000})
	out := lbRun(t, w, w.fromPod, w.b.ifindex, answer, redirect, TernMetricMETRIC_LB_REV_NAT, TernMetricMETRIC_REDIRECT_PEER)
	if p := natParse(t, out); p.src != lbVIP || p.sport != 53 {
		t.Errorf("answer left from %s:%d, want %s:53", p.src, p.sport, lbVIP)
	}

	// An entry as an older object wrote it: through tern_lb_rev.
	e.Flags &^= uint16(TernLbCtFlagsLB_CT_F_FRONTEND)
	e.Addr, e.Port = natAddr(w.a.ip), natPort(40000)
	if err := w.maps[TernMapTernLbCt].Put(rk, e); err != nil {
		t.Fatal(err)
	}
	if err := w.maps[TernMapTernLbRev].Put(uint32(7), TernLbBackend{Addr: natAddr(lbVIP), Port: natPort(53)}); err != nil {
		t.Fatal(err)
	}
	out = lbRun(t, w, w.fromPod, w.b.ifindex, answer, redirect, TernMetricMETRIC_LB_REV_NAT, TernMetricMETRIC_REDIRECT_PEER)
	if p := natParse(t, out); p.src != lbVIP || p.sport != 53 {
		t.Errorf("older entry: answer left from %s:%d, want %s:53", p.src, p.sport, lbVIP)
	}
}

// A pod reaching itself through its Service, under deny-all in both
// directions: the packet comes back into the pod from the service-loopback
// address, the answer goes back as from the Service; neither is decided
// by policy (a pod cannot be denied itself).
func TestLBHairpin(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	flags := uint32(TernEpPolicyFlagsEP_POLICY_F_INGRESS | TernEpPolicyFlagsEP_POLICY_F_EGRESS)
	if err := w.maps[TernMapTernEpPolicy].Put(natAddr(w.a.ip), TernEpPolicy{LocalId: 1, Flags: flags}); err != nil {
		t.Fatal(err)
	}
	lbService(t, w, lbVIP, 80, unix.IPPROTO_TCP, 5, TernLbSvc{}, lbBackend{w.a.ip, 8080})
	out := lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: unix.IPPROTO_TCP, sport: 42000, dport: 80, tcpFlags: natTCPSyn}),
		natActRedirect, TernMetricMETRIC_LB_HAIRPIN)
	p := natParse(t, out)
	if p.src != lbLoopback || p.sport != 42000 || p.dst != w.a.ip || p.dport != 8080 || !bytes.Equal(p.dstMAC, w.a.mac) {
		t.Errorf("hairpin: %s:%d -> %s:%d", p.src, p.sport, p.dst, p.dport)
	}
	out = lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbLoopback, proto: unix.IPPROTO_TCP, sport: 8080, dport: 42000, tcpFlags: natTCPSyn | natTCPAck}),
		natActRedirect, TernMetricMETRIC_LB_HAIRPIN)
	p = natParse(t, out)
	if p.src != lbVIP || p.sport != 80 || p.dst != w.a.ip || p.dport != 42000 {
		t.Errorf("hairpin answer: %s:%d -> %s:%d", p.src, p.sport, p.dst, p.dport)
	}
	// To the loopback address without such a flow (another port, or
	// another pod): dropped, not delivered.
	lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbLoopback, proto: unix.IPPROTO_TCP, sport: 8080, dport: 42001, tcpFlags: natTCPAck}),
		natActShot, TernMetricMETRIC_DROP_LB)
	lbRun(t, w, w.fromPod, w.b.ifindex, w.podFrame(w.b, natPkt{dst: lbLoopback, proto: unix.IPPROTO_TCP, sport: 8080, dport: 42000, tcpFlags: natTCPAck}),
		natActShot, TernMetricMETRIC_DROP_LB)
	// The deny-all is real: a to b is dropped by a's egress.
	lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: w.b.ip, proto: unix.IPPROTO_TCP, sport: 42000, dport: 80, tcpFlags: natTCPSyn}),
		natActShot, TernMetricMETRIC_DROP_POLICY_EGRESS)
}

// No backend: the client gets ICMP port unreachable from the Service
// address quoting its packet (kube-proxy's REJECT), for TCP and UDP; with
// LB_SVC_F_DROP (traffic policy Local, no backend here) it is dropped.
func TestLBNoEndpoints(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		lbService(t, w, lbVIP, 80, proto, 6, TernLbSvc{})
		sent := w.podFrame(w.a, natPkt{dst: lbVIP, proto: proto, sport: 43000, dport: 80, tcpFlags: natTCPSyn, payload: bytes.Repeat([]byte("x"), 100)})
		out := lbRun(t, w, w.fromPod, w.a.ifindex, sent, natActRedirect, TernMetricMETRIC_LB_REJECT)
		p := natParse(t, out)
		tot := int(binary.BigEndian.Uint16(out[16:18]))
		if p.src != lbVIP || p.dst != w.a.ip || out[23] != unix.IPPROTO_ICMP || tot != 56 || !bytes.Equal(p.dstMAC, w.a.mac) || !bytes.Equal(p.srcMAC, w.a.hostMAC) {
			t.Fatalf("proto %d: reject %s -> %s proto %d length %d", proto, p.src, p.dst, out[23], tot)
		}
		icmp := out[34 : 14+tot]
		if icmp[0] != 3 || icmp[1] != 3 || !bytes.Equal(icmp[8:36], sent[14:42]) {
			t.Errorf("proto %d: ICMP type %d code %d, quoting % x\nwant % x", proto, icmp[0], icmp[1], icmp[8:36], sent[14:42])
		}
		lbService(t, w, lbVIP, 80, proto, 6, TernLbSvc{Flags: uint32(TernLbSvcFlagsLB_SVC_F_DROP)})
		lbRun(t, w, w.fromPod, w.a.ifindex, sent, natActShot, TernMetricMETRIC_DROP_LB_NO_LOCAL)
	}
}

// Policy sees the backend: a's egress allowing only b's address lets a
// reach the Service whose backend is b, not the one whose backend is c.
func TestLBPolicyOnBackend(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	if err := w.maps[TernMapTernEpPolicy].Put(natAddr(w.a.ip), TernEpPolicy{LocalId: 1, Flags: uint32(TernEpPolicyFlagsEP_POLICY_F_EGRESS)}); err != nil {
		t.Fatal(err)
	}
	if err := w.maps[TernMapTernIpcache].Put(TernLpmV4Key{Prefixlen: 32, Addr: natAddr(w.b.ip)}, uint32(3)); err != nil {
		t.Fatal(err)
	}
	key := compile.PolicyKey{Dir: compile.Egress, Proto: unix.IPPROTO_TCP, LocalID: 1, RemoteClass: 3, Port: 8080, PortBits: 16}
	if err := w.maps[TernMapTernPolicy].Put(key, compile.PolicyValue{Verdict: compile.VerdictAllow}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { clearMap(t, w.maps[TernMapTernPolicy]); clearMap(t, w.maps[TernMapTernIpcache]) })
	lbService(t, w, lbVIP, 80, unix.IPPROTO_TCP, 1, TernLbSvc{}, lbBackend{w.b.ip, 8080})
	other := netip.MustParseAddr("10.96.0.11")
	lbService(t, w, other, 80, unix.IPPROTO_TCP, 2, TernLbSvc{}, lbBackend{w.c.ip, 8080})
	lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: lbVIP, proto: unix.IPPROTO_TCP, sport: 44000, dport: 80, tcpFlags: natTCPSyn}),
		natActRedirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
	lbRun(t, w, w.fromPod, w.a.ifindex, w.podFrame(w.a, natPkt{dst: other, proto: unix.IPPROTO_TCP, sport: 44000, dport: 80, tcpFlags: natTCPSyn}),
		natActShot, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_DROP_POLICY_EGRESS)
}

// A client outside the node reaches a NodePort on the node's address: the
// uplink DNATs to the backend on the node (the backend's ingress policy
// decides on the client's address; no SNAT), and the backend's answer
// leaves by the uplink from the node port, sent with bpf_redirect_neigh.
// A backend on another node is not reached that way (yet): dropped.
func TestLBNodePortFromUplink(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	client := natServer // an address outside the cluster, behind the gateway
	lbService(t, w, natNodeIP, 30080, unix.IPPROTO_TCP, 8, TernLbSvc{}, lbBackend{w.b.ip, 8080})
	in := natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 45000, dport: 30080, tcpFlags: natTCPSyn}
	in.srcMAC, in.dstMAC = []byte{2, 0, 0, 0, 0, 2}, w.uplinkMAC
	out := lbRun(t, w, w.fromUplink, w.uplink, in.frame(), natActRedirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
	if p := natParse(t, out); p.src != client || p.dst != w.b.ip || p.dport != 8080 || !bytes.Equal(p.dstMAC, w.b.mac) {
		t.Errorf("NodePort DNATed to %s:%d from %s", p.dst, p.dport, p.src)
	}
	out = lbRun(t, w, w.fromPod, w.b.ifindex, w.podFrame(w.b, natPkt{dst: client, proto: unix.IPPROTO_TCP, sport: 8080, dport: 45000, tcpFlags: natTCPSyn | natTCPAck}),
		natActRedirect, TernMetricMETRIC_LB_REV_NAT)
	if p := natParse(t, out); p.src != natNodeIP || p.sport != 30080 || p.dst != client || p.dport != 45000 || p.ttl != 63 {
		t.Errorf("answer from %s:%d to %s:%d ttl %d", p.src, p.sport, p.dst, p.dport, p.ttl)
	}
	// The backend's ingress policy sees the client: isolated without a
	// rule, the next new connection is dropped.
	if err := w.maps[TernMapTernEpPolicy].Put(natAddr(w.b.ip), TernEpPolicy{LocalId: 2, Flags: uint32(TernEpPolicyFlagsEP_POLICY_F_INGRESS)}); err != nil {
		t.Fatal(err)
	}
	in.sport = 45001
	lbRun(t, w, w.fromUplink, w.uplink, in.frame(), natActShot, TernMetricMETRIC_DROP_POLICY_INGRESS)
	// A backend on another node Tern does not know (no tern_remote
	// entry): dropped (TestLBNodePortRemoteBackend has the known ones).
	lbService(t, w, natNodeIP, 30081, unix.IPPROTO_TCP, 9, TernLbSvc{}, lbBackend{natOtherPod, 8080})
	in.dport = 30081
	lbRun(t, w, w.fromUplink, w.uplink, in.frame(), natActShot, TernMetricMETRIC_DROP_LB)
	// Not a frontend: the stack's, as before.
	in.dport = 22
	lbRun(t, w, w.fromUplink, w.uplink, in.frame(), natActOK, TernMetricMETRIC_PASS_UPLINK)
}

// tern_lb_empty (lib/lb.h, lb_no_frontends): while it is clear, the uplink
// looks frontends up (a NodePort is translated); set, it skips the lookup,
// which the datapath only lets happen when tern_lb_svc holds no frontend
// (datapath/ebpf TestLBEmptyFlag): here it is set over a frontend to show
// the program reads it; the packet then goes to the stack untranslated, as
// one for no frontend does. Cleared again, the frontend is back.
func TestLBNoFrontendsFlag(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	lbReset(t, w)
	setEmpty := func(v uint32) {
		t.Helper()
		if err := w.maps[TernMapTernLbEmpty].Put(uint32(0), v); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { setEmpty(0) })
	client := natServer
	lbService(t, w, natNodeIP, 30080, unix.IPPROTO_TCP, 8, TernLbSvc{}, lbBackend{w.b.ip, 8080})
	in := natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 45000, dport: 30080, tcpFlags: natTCPSyn}
	in.srcMAC, in.dstMAC = []byte{2, 0, 0, 0, 0, 2}, w.uplinkMAC
	translated := func(sport uint16) {
		t.Helper()
		in.sport = sport
		out := lbRun(t, w, w.fromUplink, w.uplink, in.frame(), natActRedirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
		if p := natParse(t, out); p.dst != w.b.ip || p.dport != 8080 {
			t.Errorf("NodePort DNATed to %s:%d", p.dst, p.dport)
		}
	}
	translated(45000)
	setEmpty(1)
	in.sport = 45001
	out := lbRun(t, w, w.fromUplink, w.uplink, in.frame(), natActOK, TernMetricMETRIC_PASS_UPLINK)
	if p := natParse(t, out); p.dst != natNodeIP || p.dport != 30080 {
		t.Errorf("with the flag set: %s:%d, want untouched", p.dst, p.dport)
	}
	setEmpty(0)
	translated(45002)
}

// TestLBNodePortRemoteBackend: a NodePort from outside the node whose
// backend is a pod of another node (externalTrafficPolicy Cluster,
// lib/lb_remote.h): DNATed to the backend and SNATed to the node address
// and a port of the NAT range, one port per flow, kept by the flow; sent
// on natively (FIB, TTL - 1) or through the tunnel. The backend's answer
// to that port, on the uplink, goes back out from the NodePort to the
// client; an answer to a port no flow holds is the stack's.
func TestLBNodePortRemoteBackend(t *testing.T) {
	w := newRemoteWorld(t)
	for _, mode := range []string{"native", "vxlan"} {
		t.Run(mode, func(t *testing.T) {
			lbReset(t, w.natWorld)
			w.clearRemote(t)
			w.setRemote(t, mode == "vxlan")
			forwarded := TernMetricMETRIC_REMOTE_NATIVE
			if mode == "vxlan" {
				forwarded = TernMetricMETRIC_REMOTE_VXLAN
			}
			client := natServer
			lbService(t, w.natWorld, natNodeIP, 30081, unix.IPPROTO_TCP, 9, TernLbSvc{}, lbBackend{natOtherPod, 8080})
			send := func(sport uint16, flags uint8) natParsed {
				t.Helper()
				in := natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: sport, dport: 30081, tcpFlags: flags}
				in.srcMAC, in.dstMAC = []byte{2, 0, 0, 0, 0, 2}, w.uplinkMAC
				out := lbRun(t, w.natWorld, w.fromUplink, w.uplink, in.frame(), natActRedirect,
					TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_LB_SNAT_REMOTE, forwarded)
				p := natParse(t, out)
				if p.src != natNodeIP || p.dst != natOtherPod || p.dport != 8080 || p.sport < 61000 || p.ttl != 63 {
					t.Errorf("sent on as %s:%d -> %s:%d ttl %d, want %s:61000-65535 -> %s:8080 ttl 63",
						p.src, p.sport, p.dst, p.dport, p.ttl, natNodeIP, natOtherPod)
				}
				return p
			}
			first := send(45000, natTCPSyn)
			if again := send(45000, natTCPAck); again.sport != first.sport {
				t.Errorf("the flow's next packet left from port %d, its first from %d", again.sport, first.sport)
			}
			if other := send(45001, natTCPSyn); other.sport == first.sport {
				t.Errorf("two flows share SNAT port %d", other.sport)
			}
			if mode == "vxlan" {
				return // answers arrive decapsulated: tern_from_tunnel (e2e TestMultiNodeLBNodePort)
			}
			reply := natPkt{src: natOtherPod, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 8080, dport: first.sport, tcpFlags: natTCPSyn | natTCPAck}
			reply.srcMAC, reply.dstMAC = []byte{2, 0, 0, 0, 0, 2}, w.uplinkMAC
			out := lbRun(t, w.natWorld, w.fromUplink, w.uplink, reply.frame(), natActRedirect, TernMetricMETRIC_LB_REV_NAT)
			if p := natParse(t, out); p.src != natNodeIP || p.sport != 30081 || p.dst != client || p.dport != 45000 || p.ttl != 63 {
				t.Errorf("answer out as %s:%d -> %s:%d ttl %d, want %s:30081 -> %s:45000 ttl 63",
					p.src, p.sport, p.dst, p.dport, p.ttl, natNodeIP, client)
			}
			reply.dport = 60000 // below the NAT range: no flow has it
			lbRun(t, w.natWorld, w.fromUplink, w.uplink, reply.frame(), natActOK, TernMetricMETRIC_PASS_UPLINK)
		})
	}
}
