package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/policy/compile"
)

// The kube-proxy coexistence branches of tern_from_pod (lib/stack.h), on
// crafted packets: Service CIDR traffic to the host stack undecided, answers
// of flows the stack delivered (a tern_stack_ct entry) back to the stack
// instead of bpf_redirect_peer or snat_out, and everything else as before.
// The entries tern_to_pod writes from the stack's conntrack cannot be made
// here (BPF_PROG_TEST_RUN packets carry no conntrack entry); the end-to-end
// test TestServicesKubeProxy covers that half.

var (
	stackClusterIP = netip.MustParseAddr("10.96.0.10")
	stackClient    = netip.MustParseAddr("192.0.2.2") // an external NodePort client
)

// stackKey is tern_stack_ct's (= tern_policy_ct's) key of the flow between
// a:ap and b:bp, and whether a is its hi end, computed as policy_ct_key_of
// does on the network-order values loaded as native integers.
func stackKey(a netip.Addr, ap uint16, b netip.Addr, bp uint16, proto uint8) (TernPolicyCtKey, bool) {
	sa, sb, pa, pb := endpointKey(a), endpointKey(b), natPort(ap), natPort(bp)
	hi := sa > sb || (sa == sb && pa > pb)
	if hi {
		return TernPolicyCtKey{LoAddr: sb, HiAddr: sa, LoPort: pb, HiPort: pa, Proto: proto}, true
	}
	return TernPolicyCtKey{LoAddr: sa, HiAddr: sb, LoPort: pa, HiPort: pb, Proto: proto}, false
}

// noteDelivered does what tern_to_pod does when the stack delivers orig's
// flow (from:fp to to:tp) into a pod: noteStackFlow, last seen age ago.
func (w *polTest) noteDelivered(t *testing.T, from netip.Addr, fp uint16, to netip.Addr, tp uint16, proto uint8, age time.Duration) {
	t.Helper()
	noteStackFlow(t, w.objs.maps, from, fp, to, tp, proto, age)
}

// noteStackFlow does what stack_note_delivered does for the flow from:fp
// -> to:tp (tern_to_pod, tern_to_uplink; unreachable in BPF_PROG_TEST_RUN,
// whose packets carry no conntrack entry): the tern_stack_ct entry, last
// seen age ago, and the flow's policy conntrack entry, if any, cleared of
// POLICY_CT_F_NO_STACK.
func noteStackFlow(t *testing.T, maps map[string]*ebpf.Map, from netip.Addr, fp uint16, to netip.Addr, tp uint16, proto uint8, age time.Duration) {
	t.Helper()
	k := putStackFlow(t, maps, from, fp, to, tp, proto, age)
	for _, name := range []string{TernMapTernPolicyCt, TernMapTernPolicyCtOther} {
		var pe TernPolicyCtEntry
		if err := maps[name].Lookup(k, &pe); err != nil {
			continue
		}
		pe.Flags &^= uint16(TernPolicyCtFlagsPOLICY_CT_F_NO_STACK)
		if err := maps[name].Put(k, pe); err != nil {
			t.Fatal(err)
		}
	}
}

// putStackFlow writes only the tern_stack_ct entry of the flow from:fp ->
// to:tp, last seen age ago (removed at the end of the test), and returns
// its key.
func putStackFlow(t *testing.T, maps map[string]*ebpf.Map, from netip.Addr, fp uint16, to netip.Addr, tp uint16, proto uint8, age time.Duration) TernPolicyCtKey {
	t.Helper()
	k, hi := stackKey(from, fp, to, tp, proto)
	e := TernPolicyCtEntry{LastSeen: natMonoNow(t) - uint64(age)}
	if hi {
		e.Flags = uint16(TernPolicyCtFlagsPOLICY_CT_F_ORIG_HI)
	}
	if err := maps[TernMapTernStackCt].Put(k, e); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = maps[TernMapTernStackCt].Delete(k) })
	return k
}

func (w *polTest) serviceCIDR(t *testing.T, cidr string) {
	t.Helper()
	p := netip.MustParsePrefix(cidr)
	k := TernLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: endpointKey(p.Addr())}
	if err := w.objs.maps[TernMapTernServiceCidrs].Put(k, uint8(1)); err != nil {
		t.Fatal(err)
	}
}

func TestFromPodStack(t *testing.T) {
	w := newPolTest(t)
	tcp, udpP := uint8(unix.IPPROTO_TCP), uint8(unix.IPPROTO_UDP)
	ok, redirect := uint32(tcActOK), uint32(tcActRedirect)

	// A isolated for egress with no rule: anything it opens that policy
	// decides is dropped.
	install := func() {
		t.Helper()
		rs := polRuleSet(true, false)
		w.install(t, rs)
		w.serviceCIDR(t, "10.96.0.0/12")
	}

	t.Run("service CIDR to the stack, undecided", func(t *testing.T) {
		install()
		for _, p := range []natPkt{
			{dst: stackClusterIP, proto: udpP, sport: 40000, dport: 53},
			{dst: stackClusterIP, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn},
		} {
			w.run(t, w.from, w.a.ifindex, w.fromA(p).frame(), ok, TernMetricMETRIC_PASS_SERVICE)
		}
		if n := len(w.ctEntries(t)); n != 0 {
			t.Errorf("%d policy conntrack entries for Service traffic, want none (decided after DNAT)", n)
		}
		// Outside the Service CIDR the same packet is decided: dropped.
		w.run(t, w.from, w.a.ifindex, w.fromA(natPkt{dst: netip.MustParseAddr("10.112.0.10"), proto: udpP, sport: 40000, dport: 53}).frame(),
			uint32(tcActShot), TernMetricMETRIC_DROP_POLICY_EGRESS)
	})

	t.Run("answer of a stack-delivered flow to a local pod: to the stack", func(t *testing.T) {
		install()
		// A:40000 -> ClusterIP:80, DNATed by the stack to B:8080 and
		// delivered into B: B's answer must go back through the stack.
		w.noteDelivered(t, w.a.ip, 40000, w.b.ip, 8080, tcp, 0)
		answer := w.fromB(natPkt{dst: w.a.ip, proto: tcp, sport: 8080, dport: 40000, tcpFlags: natTCPSyn | natTCPAck}).frame()
		w.run(t, w.from, w.b.ifindex, answer, ok, TernMetricMETRIC_PASS_STACK_REPLY)
		k, _ := stackKey(w.a.ip, 40000, w.b.ip, 8080, tcp)
		var e TernPolicyCtEntry
		if err := w.objs.maps[TernMapTernStackCt].Lookup(k, &e); err != nil {
			t.Fatal(err)
		}
		if e.Flags&uint16(TernPolicyCtFlagsPOLICY_CT_F_SEEN_REPLY) == 0 {
			t.Errorf("stack flow flags %#x after the answer, want SEEN_REPLY", e.Flags)
		}
		// Another flow between the same pods never touched the stack:
		// bpf_redirect_peer as before.
		other := w.fromB(natPkt{dst: w.a.ip, proto: tcp, sport: 8080, dport: 40001, tcpFlags: natTCPAck}).frame()
		w.run(t, w.from, w.b.ifindex, other, redirect, TernMetricMETRIC_REDIRECT_PEER)
		// A to B directly: redirected.
		w.run(t, w.from, w.b.ifindex, w.fromB(natPkt{dst: w.a.ip, proto: udpP, sport: 53, dport: 40000}).frame(),
			redirect, TernMetricMETRIC_REDIRECT_PEER)
	})

	t.Run("ICMP error about a stack-delivered flow: to the stack", func(t *testing.T) {
		install()
		// B answers A's datagram (DNATed from a ClusterIP) with port
		// unreachable: the stack must translate the quoted packet back
		// to the ClusterIP, or A's socket ignores the error.
		portUnreach := func(quotedSport uint16) []byte {
			q := w.fromA(natPkt{dst: w.b.ip, proto: udpP, sport: quotedSport, dport: 54, payload: []byte("q")}).frame()[ethHdrLen:]
			b := append([]byte{3, 3, 0, 0, 0, 0, 0, 0}, q[:28]...)
			binary.BigEndian.PutUint16(b[2:], natCsum(b))
			return w.fromB(natPkt{dst: w.a.ip, proto: unix.IPPROTO_ICMP, l4: b}).frame()
		}
		w.noteDelivered(t, w.a.ip, 40000, w.b.ip, 54, udpP, 0)
		w.run(t, w.from, w.b.ifindex, portUnreach(40000), ok, TernMetricMETRIC_PASS_STACK_REPLY)
		w.run(t, w.from, w.b.ifindex, portUnreach(40001), redirect, TernMetricMETRIC_REDIRECT_PEER)
	})

	t.Run("expired stack flow: fast path again", func(t *testing.T) {
		install()
		w.noteDelivered(t, w.a.ip, 40000, w.b.ip, 53, udpP, 61*time.Second) // UDP idles out after 60 s
		answer := w.fromB(natPkt{dst: w.a.ip, proto: udpP, sport: 53, dport: 40000}).frame()
		w.run(t, w.from, w.b.ifindex, answer, redirect, TernMetricMETRIC_REDIRECT_PEER)
		w.noteDelivered(t, w.a.ip, 40000, w.b.ip, 53, udpP, 30*time.Second)
		w.run(t, w.from, w.b.ifindex, answer, ok, TernMetricMETRIC_PASS_STACK_REPLY)
	})

	t.Run("answer of a NodePort/hostPort flow: to the stack, not snat_out", func(t *testing.T) {
		install()
		// B is masqueraded and the node has an uplink: without the stack
		// flow, B's answer to an external client goes to snat_out (whose
		// FIB lookup finds no route in this namespace: pass_host).
		ep := w.b.endpoint()
		ep.Flags = uint32(TernEndpointFlagsENDPOINT_F_MASQ)
		if err := w.objs.endpoints.Put(endpointKey(w.b.ip), ep); err != nil {
			t.Fatal(err)
		}
		if err := w.objs.maps[TernMapTernConfig].Put(uint32(0), TernNodeConfig{NodeIp: endpointKey(netip.MustParseAddr("192.0.2.1")), UplinkIfindex: uint32(w.a.ifindex)}); err != nil {
			t.Fatal(err)
		}
		answer := w.fromB(natPkt{dst: stackClient, proto: tcp, sport: 7000, dport: 50000, tcpFlags: natTCPSyn | natTCPAck}).frame()
		w.run(t, w.from, w.b.ifindex, answer, ok, TernMetricMETRIC_PASS_HOST)
		w.noteDelivered(t, stackClient, 50000, w.b.ip, 7000, tcp, 0)
		w.run(t, w.from, w.b.ifindex, answer, ok, TernMetricMETRIC_PASS_STACK_REPLY)
	})
}

// TestPolicySelf: a pod reaching itself (its packet hairpinned back by the
// stack after its Service's DNAT, unmasqueraded) passes whatever its
// policy, both ways isolated with no rule.
func TestPolicySelf(t *testing.T) {
	w := newPolTest(t)
	rs := polRuleSet(true, true)
	rs.Endpoints["10.244.1.2"] = compile.EndpointPolicy{LocalID: polIDA, IngressIsolated: true, EgressIsolated: true}
	w.install(t, rs)
	self := w.into(w.a, natPkt{src: w.a.ip, proto: unix.IPPROTO_TCP, sport: 40000, dport: 8080, tcpFlags: natTCPSyn}).frame()
	w.run(t, w.to, w.a.ifindex, self, tcActOK, TernMetricMETRIC_PASS_TO_POD)
	// The same packet to B is denied (A has no egress rule).
	w.run(t, w.to, w.b.ifindex, w.into(w.b, natPkt{src: w.a.ip, proto: unix.IPPROTO_TCP, sport: 40000, dport: 8080, tcpFlags: natTCPSyn}).frame(),
		tcActShot, TernMetricMETRIC_DROP_POLICY_EGRESS)
}

// TestToUplink: tern_to_uplink drops a pod's packet to a Service CIDR that
// nothing translated (it would leave with the pod's address) and lets the
// node's own packets, and pods' packets elsewhere, through. The policy
// branch needs the stack's conntrack entry: TestServicesKubeProxy.
func TestToUplink(t *testing.T) {
	w := newPolTest(t)
	spec, err := LoadTernUplink()
	if err != nil {
		t.Fatal(err)
	}
	repl := map[string]*ebpf.Map{}
	for name := range spec.Maps {
		spec.Maps[name].Pinning = ebpf.PinNone
		if m, ok := w.objs.maps[name]; ok && name[0] != '.' {
			repl[name] = m
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		t.Fatalf("load %+v", err)
	}
	t.Cleanup(coll.Close)
	prog := coll.Programs[TernUplinkProgTernToUplink]
	w.install(t, polRuleSet(false, false))
	w.serviceCIDR(t, "10.96.0.0/12")
	node := netip.MustParseAddr("192.0.2.1")
	up := w.b.ifindex // any interface of the namespace stands for the uplink

	out := func(src, dst netip.Addr) []byte {
		return natPkt{src: src, dst: dst, srcMAC: w.b.hostMAC, dstMAC: w.b.mac, proto: unix.IPPROTO_UDP, sport: 40000, dport: 53}.frame()
	}
	w.run(t, prog, up, out(w.a.ip, stackClusterIP), tcActShot, TernMetricMETRIC_DROP_SVC_NO_DNAT)
	// The node's own packet to a ClusterIP (kube-proxy's OUTPUT chain had
	// no rule either): not a pod address, not ours.
	before := readMetrics(t, w.objs)
	for _, pkt := range [][]byte{out(node, stackClusterIP), out(w.a.ip, stackClient)} {
		verdict, _, err := runFromPod(w.ns, prog, up, pkt)
		if err != nil || verdict != tcActOK {
			t.Errorf("verdict %d (%v), want %d", verdict, err, tcActOK)
		}
	}
	if after := readMetrics(t, w.objs); after != before {
		t.Errorf("metrics moved on packets tern_to_uplink leaves alone: %+v -> %+v", before, after)
	}
}
