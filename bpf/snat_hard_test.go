package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Tests of the NAT's hardening: no flow ever changes owner, the collector,
// the keyed port choice, and masquerade never failing open.

// natSipHash16 is SipHash-2-4 of a 16-byte message, written from the
// paper (Aumasson, Bernstein 2012) independently of lib/nat.h.
func natSipHash16(k0, k1 uint64, msg [16]byte) uint64 {
	v0 := k0 ^ 0x736f6d6570736575
	v1 := k1 ^ 0x646f72616e646f6d
	v2 := k0 ^ 0x6c7967656e657261
	v3 := k1 ^ 0x7465646279746573
	round := func() {
		v0 += v1
		v1 = bits.RotateLeft64(v1, 13)
		v1 ^= v0
		v0 = bits.RotateLeft64(v0, 32)
		v2 += v3
		v3 = bits.RotateLeft64(v3, 16)
		v3 ^= v2
		v0 += v3
		v3 = bits.RotateLeft64(v3, 21)
		v3 ^= v0
		v2 += v1
		v1 = bits.RotateLeft64(v1, 17)
		v1 ^= v2
		v2 = bits.RotateLeft64(v2, 32)
	}
	for _, m := range []uint64{binary.LittleEndian.Uint64(msg[:8]), binary.LittleEndian.Uint64(msg[8:]), 16 << 56} {
		v3 ^= m
		round()
		round()
		v0 ^= m
	}
	v2 ^= 0xff
	for range 4 {
		round()
	}
	return v0 ^ v1 ^ v2 ^ v3
}

func TestNATSipHashVector(t *testing.T) {
	// The paper's test vector set: key 00..0f, message 00..0f (length 16).
	var msg [16]byte
	for i := range msg {
		msg[i] = byte(i)
	}
	if got, want := natSipHash16(0x0706050403020100, 0x0f0e0d0c0b0a0908, msg), uint64(0x3f2acc7f57c29bdb); got != want {
		t.Fatalf("SipHash-2-4 reference vector: %#x, want %#x", got, want)
	}
}

// natCandidates are the NAT ports lib/nat.h tries for tuple t under key,
// in order, for the range lo-hi.
func natCandidates(key TernNatKey, t TernNatTuple, lo, hi uint32) []uint16 {
	var msg [16]byte
	binary.NativeEndian.PutUint32(msg[0:], t.Saddr)
	binary.NativeEndian.PutUint32(msg[4:], t.Daddr)
	binary.NativeEndian.PutUint16(msg[8:], t.Sport)
	binary.NativeEndian.PutUint16(msg[10:], t.Dport)
	msg[12] = t.Proto
	h := uint32(natSipHash16(key.K0, key.K1, msg))
	var out []uint16
	for i := range uint32(16) {
		out = append(out, uint16(lo+(h+i*0x9e3779b9)%(hi-lo+1)))
	}
	return out
}

// natIPv4 is p's IPv4 packet, without Ethernet header.
func natIPv4(p natPkt) []byte {
	p.srcMAC, p.dstMAC = make(net.HardwareAddr, 6), make(net.HardwareAddr, 6)
	return p.frame()[14:]
}

func (w *natWorld) setKey(t testing.TB, k TernNatKey) {
	t.Helper()
	if err := w.maps[TernMapTernNatKey].Put(uint32(0), k); err != nil {
		t.Fatal(err)
	}
}

// TestSNATKeyedPort: the NAT port a flow gets is the first candidate of
// SipHash under the node's key, so it changes with the key: with another
// key the same flow gets another port, both predicted.
func TestSNATKeyedPort(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	keys := []TernNatKey{{K0: 0x0123456789abcdef, K1: 0xfedcba9876543210}, {K0: 42, K1: 4242}}
	tuple := natTuple(w.a.ip, 33333, natServer, 443, unix.IPPROTO_TCP)
	var ports []uint16
	for _, k := range keys {
		w.reset(t)
		w.setKey(t, k)
		want := natCandidates(k, tuple, natPortLo, natPortHi)[0]
		v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 33333, dport: 443, tcpFlags: natTCPSyn})
		if v != natActRedirect {
			t.Fatalf("verdict %d", v)
		}
		got := natParse(t, out).sport
		if got != want {
			t.Errorf("key %+v: NAT port %d, want %d (SipHash-2-4 of the tuple)", k, got, want)
		}
		ports = append(ports, got)
	}
	if ports[0] == ports[1] {
		t.Errorf("both keys gave port %d: the choice does not depend on the key", ports[0])
	}
}

// TestSNATAllocatorFindsOwnPort: a flow whose forward entry is gone while
// its reverse entry holds its second candidate gets that port back, not
// its first candidate, free by now (which would change its source port
// mid-connection and hold two ports).
func TestSNATAllocatorFindsOwnPort(t *testing.T) {
	w := newNATWorld(t, natOptions{portMin: 61000, portMax: 61001})
	tuple := natTuple(w.a.ip, 40000, natServer, 443, unix.IPPROTO_TCP)
	c := natCandidates(TernNatKey{}, tuple, 61000, 61001)
	if c[0] == c[1] {
		t.Fatalf("candidates %v", c[:2])
	}
	rk := natTuple(natServer, 443, natNodeIP, c[1], unix.IPPROTO_TCP)
	own := TernNatEntry{LastSeen: natMonoNow(t), Addr: natAddr(w.a.ip), Port: natPort(40000), Flags: uint16(TernNatFlagsNAT_F_SEEN_REPLY)}
	if err := w.maps[TernMapTernNatRev].Put(rk, own); err != nil {
		t.Fatal(err)
	}
	v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 40000, dport: 443, tcpFlags: natTCPAck})
	if v != natActRedirect {
		t.Fatalf("verdict %d", v)
	}
	if got := natParse(t, out).sport; got != c[1] {
		t.Errorf("NAT port %d, want its own %d (its first candidate %d is free)", got, c[1], c[0])
	}
	if n := w.count(t, TernMapTernNatRev); n != 1 {
		t.Errorf("%d reverse entries, want 1: the flow holds a second port", n)
	}
}

// TestSNATFastPathChecksReverse: a flow whose reverse entry was lost and
// whose port another pod's flow now holds (what an LRU eviction led to)
// must not send with that port again, or its replies would go to the
// other pod.
func TestSNATFastPathChecksReverse(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	pkt := natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 5000, dport: 53, payload: []byte("q")}
	v, out := w.fromPodRun(t, w.a, pkt)
	if v != natActRedirect {
		t.Fatalf("verdict %d", v)
	}
	port := natParse(t, out).sport
	rk := natTuple(natServer, 53, natNodeIP, port, unix.IPPROTO_UDP)
	other := TernNatEntry{LastSeen: natMonoNow(t), Addr: natAddr(w.b.ip), Port: natPort(6000)}
	if err := w.maps[TernMapTernNatRev].Put(rk, other); err != nil {
		t.Fatal(err)
	}
	v, out = w.fromPodRun(t, w.a, pkt)
	if v == natActRedirect && natParse(t, out).sport == port {
		t.Fatalf("pod a's flow still sends with port %d, which pod b's flow holds", port)
	}
	if got := w.metrics(t)[TernMetricMETRIC_NAT_REV_LOST]; got != 1 {
		t.Errorf("nat_rev_lost %d, want 1", got)
	}
	var e TernNatEntry
	if err := w.maps[TernMapTernNatRev].Lookup(rk, &e); err != nil || e != other {
		t.Errorf("pod b's reverse entry changed: %+v %v", e, err)
	}
}

// TestSNATNoOwnerChange: NAT maps of 8 entries and 2 ports. Pod a fills
// them with flows to 8 servers; pod b then opens flows to the same
// servers. b's flows are refused (map full, counted), and every reply to
// each of a's ports keeps going to a, its packets keep their port. With
// LRU maps b's inserts would evict a's reverse entries and b would win
// their ports.
func TestSNATNoOwnerChange(t *testing.T) {
	const n = 8
	w := newNATWorld(t, natOptions{portMin: 61000, portMax: 61001, natEntries: n})
	server := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}) }
	pkt := func(i int) natPkt {
		return natPkt{dst: server(i), proto: unix.IPPROTO_UDP, sport: 5000, dport: 53, payload: []byte("q")}
	}
	ports := map[int]uint16{}
	for i := range n {
		v, out := w.fromPodRun(t, w.a, pkt(i))
		if v != natActRedirect {
			t.Fatalf("a's flow %d: verdict %d; metrics %v", i, v, w.metrics(t))
		}
		ports[i] = natParse(t, out).sport
	}
	check := func(when string) {
		t.Helper()
		for i := range n {
			v, in := w.fromUplinkRun(t, natPkt{src: server(i), proto: unix.IPPROTO_UDP, sport: 53, dport: ports[i], payload: []byte("a")})
			if v != natActRedirect {
				t.Errorf("%s: reply from %s to port %d: verdict %d, want delivered to a", when, server(i), ports[i], v)
				continue
			}
			if r := natParse(t, in); r.dst != w.a.ip || r.dport != 5000 {
				t.Errorf("%s: reply from %s to port %d delivered to %s:%d, want pod a %s:5000", when, server(i), ports[i], r.dst, r.dport, w.a.ip)
			}
			v, out := w.fromPodRun(t, w.a, pkt(i))
			if got := natParse(t, out).sport; v != natActRedirect || got != ports[i] {
				t.Errorf("%s: a's flow %d: verdict %d port %d, want its port %d", when, i, v, got, ports[i])
			}
		}
	}
	check("full")
	for round := range 3 {
		for i := range n {
			v, out := w.fromPodRun(t, w.b, pkt(i))
			if v == natActRedirect {
				p := natParse(t, out).sport
				t.Errorf("round %d: b's flow to %s got port %d (a holds %d)", round, server(i), p, ports[i])
			}
		}
		check(fmt.Sprintf("after b's round %d", round))
	}
	if got := w.metrics(t)[TernMetricMETRIC_DROP_NAT_MAP_FULL]; got != 3*n {
		t.Errorf("drop_nat_map_full %d, want %d", got, 3*n)
	}
}

// TestSNATGC: the collector removes expired pairs and expired single
// forward entries (inbound records, orphans), keeps live ones (a pair is
// live while either half is), counts what it removed, and its timer
// keeps collecting.
func TestSNATGC(t *testing.T) {
	w := newNATWorld(t, natOptions{gcInterval: 1})
	udp := func(ep natEP, sport uint16, dst netip.Addr) natPkt {
		return natPkt{dst: dst, proto: unix.IPPROTO_UDP, sport: sport, dport: 53, payload: []byte("q")}
	}
	servers := []netip.Addr{natServer, natServer2, netip.MustParseAddr("203.0.113.12"), netip.MustParseAddr("203.0.113.13")}
	ports := map[netip.Addr]uint16{}
	for _, s := range servers {
		v, out := w.fromPodRun(t, w.a, udp(w.a, 5000, s))
		if v != natActRedirect {
			t.Fatalf("verdict %d", v)
		}
		ports[s] = natParse(t, out).sport
	}
	// An inbound flow record.
	syn := natPkt{src: natServer, dst: w.a.ip, proto: unix.IPPROTO_UDP, sport: 7777, dport: 8080, payload: []byte("i")}
	if v, _ := w.fromUplinkRun(t, syn); v != natActOK {
		t.Fatalf("inbound: verdict %d", v)
	}
	fk := func(s netip.Addr) TernNatTuple { return natTuple(w.a.ip, 5000, s, 53, unix.IPPROTO_UDP) }
	rk := func(s netip.Addr) TernNatTuple { return natTuple(s, 53, natNodeIP, ports[s], unix.IPPROTO_UDP) }
	age := func(m string, k TernNatTuple, d time.Duration) {
		t.Helper()
		var e TernNatEntry
		if err := w.maps[m].Lookup(k, &e); err != nil {
			t.Fatalf("%s %+v: %v", m, k, err)
		}
		e.LastSeen = natMonoNow(t) - uint64(d)
		if err := w.maps[m].Put(k, e); err != nil {
			t.Fatal(err)
		}
	}
	idle := 2 * time.Minute // UDP timeout 60 s
	// servers[0]: live. servers[1]: both halves idle: removed.
	age(TernMapTernNat, fk(servers[1]), idle)
	age(TernMapTernNatRev, rk(servers[1]), idle)
	// servers[2]: the forward half idle, a reply just now: live.
	age(TernMapTernNat, fk(servers[2]), idle)
	// servers[3]: an idle forward entry without its reverse entry: removed.
	age(TernMapTernNat, fk(servers[3]), idle)
	if err := w.maps[TernMapTernNatRev].Delete(rk(servers[3])); err != nil {
		t.Fatal(err)
	}
	// The inbound record, idle: removed.
	inb := natTuple(w.a.ip, 8080, natServer, 7777, unix.IPPROTO_UDP)
	age(TernMapTernNat, inb, idle)

	var removed uint32
	err := w.ns.Do(func(ns.NetNS) error {
		var err error
		removed, _, err = w.gc.Test(make([]byte, 14))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if int32(removed) != 4 {
		t.Errorf("tern_nat_gc returned %d, want 4 entries removed", int32(removed))
	}
	has := func(m string, k TernNatTuple) bool {
		var e TernNatEntry
		err := w.maps[m].Lookup(k, &e)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
		return err == nil
	}
	for _, c := range []struct {
		what string
		m    string
		k    TernNatTuple
		want bool
	}{
		{"live pair, forward", TernMapTernNat, fk(servers[0]), true},
		{"live pair, reverse", TernMapTernNatRev, rk(servers[0]), true},
		{"idle pair, forward", TernMapTernNat, fk(servers[1]), false},
		{"idle pair, reverse", TernMapTernNatRev, rk(servers[1]), false},
		{"pair with a fresh reply, forward", TernMapTernNat, fk(servers[2]), true},
		{"pair with a fresh reply, reverse", TernMapTernNatRev, rk(servers[2]), true},
		{"idle orphan forward entry", TernMapTernNat, fk(servers[3]), false},
		{"idle inbound record", TernMapTernNat, inb, false},
	} {
		if got := has(c.m, c.k); got != c.want {
			t.Errorf("%s: present %v, want %v", c.what, got, c.want)
		}
	}
	if got := w.metrics(t)[TernMetricMETRIC_NAT_GC]; got != 4 {
		t.Errorf("nat_gc metric %d, want 4", got)
	}

	// The timer (every second here) collects without anyone asking.
	age(TernMapTernNat, fk(servers[0]), idle)
	age(TernMapTernNatRev, rk(servers[0]), idle)
	deadline := time.Now().Add(15 * time.Second)
	for has(TernMapTernNatRev, rk(servers[0])) || has(TernMapTernNat, fk(servers[0])) {
		if time.Now().After(deadline) {
			t.Fatal("the collector's timer did not remove an idle pair within 15 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !has(TernMapTernNatRev, rk(servers[2])) {
		t.Error("the timer removed a live pair")
	}
}

// TestSNATFailClosed: a packet that must be masqueraded never reaches the
// stack untranslated unless the stack keeps it on the node (local
// delivery, or a drop with an ICMP error to the pod): routes out of
// another interface, packets too big for the uplink without DF, ICMP that
// cannot be translated are dropped and counted.
func TestSNATFailClosed(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	var (
		viaOther    = netip.MustParseAddr("100.64.9.0")
		blackholed  = netip.MustParseAddr("100.64.10.0")
		unreachable = netip.MustParseAddr("100.64.11.0")
	)
	err := w.ns.Do(func(ns.NetNS) error {
		other, err := netlink.LinkByName("nh2") // pod c's host veth: not the uplink
		if err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{Dst: &net.IPNet{IP: viaOther.AsSlice(), Mask: net.CIDRMask(24, 32)}, LinkIndex: other.Attrs().Index}); err != nil {
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{Dst: &net.IPNet{IP: blackholed.AsSlice(), Mask: net.CIDRMask(24, 32)}, Type: unix.RTN_BLACKHOLE}); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{Dst: &net.IPNet{IP: unreachable.AsSlice(), Mask: net.CIDRMask(24, 32)}, Type: unix.RTN_UNREACHABLE})
	})
	if err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("b"), 1600) // uplink MTU 1500
	udp := func(dst netip.Addr) natPkt {
		return natPkt{dst: dst, proto: unix.IPPROTO_UDP, sport: 1000, dport: 53, payload: []byte("q")}
	}
	// An ICMP port unreachable about a packet nobody sent the pod.
	strayErr := func() []byte {
		inner := natIPv4(natPkt{src: natServer, dst: w.a.ip, proto: unix.IPPROTO_UDP, sport: 53, dport: 4444, payload: []byte("x")})
		icmp := append([]byte{3, 3, 0, 0, 0, 0, 0, 0}, inner[:28]...)
		binary.BigEndian.PutUint16(icmp[2:], natCsum(icmp))
		return icmp
	}()
	cases := []struct {
		name    string
		pkt     natPkt
		config  *TernNodeConfig
		verdict uint32
		metric  TernMetric
	}{
		{name: "routed out of another interface", pkt: udp(viaOther), verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_NO_ROUTE},
		{name: "uplink config names another interface", pkt: udp(natServer), verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_NO_ROUTE,
			config: &TernNodeConfig{NodeIp: natAddr(natNodeIP), UplinkIfindex: 1}},
		{name: "larger than the uplink MTU, DF clear", pkt: natPkt{dst: natServer, noDF: true, proto: unix.IPPROTO_UDP, sport: 1000, dport: 53, payload: big},
			verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_TOO_BIG},
		{name: "larger than the uplink MTU, DF set: the stack answers frag-needed", pkt: natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 1000, dport: 53, payload: big},
			verdict: natActOK, metric: TernMetricMETRIC_PASS_HOST},
		{name: "blackhole route: the stack drops it", pkt: udp(blackholed), verdict: natActOK, metric: TernMetricMETRIC_PASS_HOST},
		{name: "unreachable route: the stack answers unreachable", pkt: udp(unreachable), verdict: natActOK, metric: TernMetricMETRIC_PASS_HOST},
		{name: "ICMP timestamp request", pkt: natPkt{dst: natServer, proto: unix.IPPROTO_ICMP, icmpType: 13, icmpID: 1},
			verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_ICMP},
		{name: "ICMP error about no masqueraded flow", pkt: natPkt{dst: natServer, proto: unix.IPPROTO_ICMP, l4: strayErr},
			verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_ICMP},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w.reset(t)
			if tc.config != nil {
				w.setConfig(t, *tc.config)
			}
			p := tc.pkt
			p.src, p.srcMAC, p.dstMAC = w.a.ip, w.a.mac, w.a.hostMAC
			in := p.frame()
			v, out := w.run(t, w.fromPod, w.a.ifindex, in)
			if v != tc.verdict {
				t.Errorf("verdict %d, want %d", v, tc.verdict)
			}
			if v == natActOK && !bytes.Equal(out, in) {
				t.Errorf("packet changed on its way to the stack")
			}
			w.wantMetrics(t, map[TernMetric]uint64{tc.metric: 1})
		})
	}
}

// TestSNATICMPFromPod: an ICMP error a pod sends about a reply of its
// masqueraded flow leaves translated: outer source the node IP, the quoted
// packet's destination the node IP and NAT port, checksums valid. Errors
// about, and echo replies to, what came to the pod's own address keep it.
func TestSNATICMPFromPod(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 5000, dport: 53, payload: []byte("q")})
	if v != natActRedirect {
		t.Fatalf("verdict %d", v)
	}
	natP := natParse(t, out).sport
	v, in := w.fromUplinkRun(t, natPkt{src: natServer, proto: unix.IPPROTO_UDP, sport: 53, dport: natP, payload: []byte("answer")})
	if v != natActRedirect {
		t.Fatalf("reply verdict %d", v)
	}
	// The pod's socket is gone: port unreachable, quoting the reply as
	// the pod got it.
	quoted := append([]byte{}, in[14:14+28]...)
	icmp := append([]byte{3, 3, 0, 0, 0, 0, 0, 0}, quoted...)
	binary.BigEndian.PutUint16(icmp[2:], natCsum(icmp))
	v, out = w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_ICMP, l4: icmp})
	if v != natActRedirect {
		t.Fatalf("ICMP error from the pod: verdict %d, want translated and sent; metrics %v", v, w.metrics(t))
	}
	o := natParse(t, out) // outer IPv4 and ICMP checksums
	if o.src != natNodeIP || o.dst != natServer || o.ttl != 63 {
		t.Errorf("left as %s -> %s ttl %d, want %s -> %s ttl 63", o.src, o.dst, o.ttl, natNodeIP, natServer)
	}
	inner := out[14+20+8:]
	if natCsum(inner[:20]) != 0 {
		t.Error("quoted IPv4 header checksum is wrong")
	}
	if s, d := netip.AddrFrom4([4]byte(inner[12:16])), netip.AddrFrom4([4]byte(inner[16:20])); s != natServer || d != natNodeIP {
		t.Errorf("quoted %s -> %s, want %s -> %s", s, d, natServer, natNodeIP)
	}
	if sp, dp := binary.BigEndian.Uint16(inner[20:]), binary.BigEndian.Uint16(inner[22:]); sp != 53 || dp != natP {
		t.Errorf("quoted ports %d -> %d, want 53 -> %d", sp, dp, natP)
	}

	// Inbound to the pod's own address: an echo request and a UDP
	// datagram from outside, recorded by the uplink program.
	w.reset(t)
	for _, p := range []natPkt{
		{src: natServer2, dst: w.a.ip, proto: unix.IPPROTO_ICMP, icmpType: 8, icmpID: 77},
		{src: natServer2, dst: w.a.ip, proto: unix.IPPROTO_UDP, sport: 9000, dport: 8125, payload: []byte("m")},
	} {
		if v, _ := w.fromUplinkRun(t, p); v != natActOK {
			t.Fatalf("inbound: verdict %d", v)
		}
	}
	reply := natPkt{src: w.a.ip, dst: natServer2, proto: unix.IPPROTO_ICMP, icmpType: 0, icmpID: 77}
	reply.srcMAC, reply.dstMAC = w.a.mac, w.a.hostMAC
	rf := reply.frame()
	if v, out := w.run(t, w.fromPod, w.a.ifindex, rf); v != natActOK || !bytes.Equal(out, rf) {
		t.Errorf("echo reply to an inbound echo request: verdict %d, want passed unchanged", v)
	}
	dgram := natIPv4(natPkt{src: natServer2, dst: w.a.ip, proto: unix.IPPROTO_UDP, sport: 9000, dport: 8125, payload: []byte("m")})
	icmp = append([]byte{3, 3, 0, 0, 0, 0, 0, 0}, dgram[:28]...)
	binary.BigEndian.PutUint16(icmp[2:], natCsum(icmp))
	unreach := natPkt{src: w.a.ip, dst: natServer2, proto: unix.IPPROTO_ICMP, l4: icmp}
	unreach.srcMAC, unreach.dstMAC = w.a.mac, w.a.hostMAC
	uf := unreach.frame()
	if v, out := w.run(t, w.fromPod, w.a.ifindex, uf); v != natActOK || !bytes.Equal(out, uf) {
		t.Errorf("ICMP error about an inbound flow: verdict %d, want passed unchanged", v)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_PASS_UPLINK: 2, TernMetricMETRIC_PASS_HOST: 2})
}
