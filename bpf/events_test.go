package bpf

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// drainEvents reads every event waiting in the objects' ring buffer.
func drainEvents(t *testing.T, objs *testObjs) []TernEvent {
	t.Helper()
	return drainRing(t, objs.maps[TernMapTernEvents])
}

// drainRing reads every event waiting in the ring buffer m.
func drainRing(t *testing.T, m *ebpf.Map) []TernEvent {
	t.Helper()
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	rd.SetDeadline(time.Now()) // what is there, no waiting
	var out []TernEvent
	for range 10000 {
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		var ev TernEvent
		if len(rec.RawSample) < binary.Size(ev) {
			t.Fatalf("event of %d bytes, want %d", len(rec.RawSample), binary.Size(ev))
		}
		if _, err := binary.Decode(rec.RawSample, binary.NativeEndian, &ev); err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
	t.Fatal("ring buffer never empties")
	return nil
}

func setEventConfig(t *testing.T, objs *testObjs, c TernEventConfig) {
	t.Helper()
	if err := objs.maps[TernMapTernEventConfig].Put(uint32(0), c); err != nil {
		t.Fatal(err)
	}
}

func readLimiter(t *testing.T, objs *testObjs) TernEventLimiter {
	t.Helper()
	var perCPU []TernEventLimiter
	if err := objs.maps[TernMapTernEventLimiter].Lookup(uint32(0), &perCPU); err != nil {
		t.Fatal(err)
	}
	var sum TernEventLimiter
	for _, l := range perCPU {
		sum.Sent += l.Sent
		sum.Suppressed += l.Suppressed
		sum.Lost += l.Lost
	}
	return sum
}

func be32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func be16(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// TestDropEvents provokes every drop reason the pod programs' unit tests
// can provoke with a crafted packet and checks that each sends one event,
// with the reason, the interface and the packet's addresses, under the
// default configuration (all-zero tern_event_config).
func TestDropEvents(t *testing.T) {
	w := newPolTest(t)
	a, b := w.a, w.b
	loop := netip.MustParseAddr("127.0.0.1")
	world := netip.MustParseAddr("8.8.8.8")
	syn := func(src, dst netip.Addr, dport uint16) natPkt {
		return natPkt{src: src, dst: dst, proto: tcp, sport: 40000, dport: dport, tcpFlags: natTCPSyn}
	}
	type want struct {
		kind          TernEventKind
		reason        TernMetric // drops
		dir           TernPolicyDir
		local, remote uint32 // policy
		src, dst      netip.Addr
		sport, dport  uint16
		ethProto      uint16
	}
	cases := []struct {
		name    string
		isolate bool // A isolated for egress, B for ingress, nothing allowed
		to      bool // through tern_to_pod on B's veth (else tern_from_pod on A's)
		frame   []byte
		want    want
	}{
		{
			name:  "spoofed: A sends with B's address (natPkt from A's MAC)",
			frame: natPkt{srcMAC: a.mac, dstMAC: a.hostMAC, src: b.ip, dst: world, proto: tcp, sport: 1, dport: 80, tcpFlags: natTCPSyn}.frame(),
			want:  want{kind: TernEventKindEVENT_DROP, reason: TernMetricMETRIC_DROP_SPOOFED, src: b.ip, dst: world, sport: 1, dport: 80, ethProto: etherTypeIPv4},
		},
		{
			name:  "loopback: A to 127.0.0.1:80",
			frame: w.fromA(syn(a.ip, loop, 80)).frame(),
			want:  want{kind: TernEventKindEVENT_DROP, reason: TernMetricMETRIC_DROP_LOOPBACK, src: a.ip, dst: loop, sport: 40000, dport: 80, ethProto: etherTypeIPv4},
		},
		{
			name:  "non-IPv4: IPv6 UDP from A (ipv6UDP)",
			frame: ethernet(a.hostMAC, a.mac, etherTypeIPv6, ipv6UDP(netip.MustParseAddr("fe80::1"), netip.MustParseAddr("fe80::2"), []byte("x"))),
			want:  want{kind: TernEventKindEVENT_DROP, reason: TernMetricMETRIC_DROP_NON_IPV4, ethProto: etherTypeIPv6},
		},
		{
			name:  "ARP spoofed: A claims B's address (arpRequest)",
			frame: ethernet(broadcast, a.mac, etherTypeARP, arpRequest(a.mac, b.ip, polGateway)),
			want:  want{kind: TernEventKindEVENT_DROP, reason: TernMetricMETRIC_DROP_ARP_SPOOFED, ethProto: etherTypeARP},
		},
		{
			name:  "truncated: IPv4 header with ihl 4",
			frame: ethernet(a.hostMAC, a.mac, etherTypeIPv4, ipv4{ihl: 4, ttl: 64, proto: unix.IPPROTO_UDP, src: a.ip, dst: b.ip}.bytes(udp(1, 2, []byte("x")))),
			want:  want{kind: TernEventKindEVENT_DROP, reason: TernMetricMETRIC_DROP_TRUNCATED, ethProto: etherTypeIPv4, src: a.ip, dst: b.ip},
		},
		{
			name:    "policy, egress: A (isolated, nothing allowed) to B:80",
			isolate: true,
			frame:   w.fromA(syn(a.ip, b.ip, 80)).frame(),
			want:    want{kind: TernEventKindEVENT_POLICY, dir: TernPolicyDirPOLICY_DIR_EGRESS, local: polIDA, remote: polClassB, src: a.ip, dst: b.ip, sport: 40000, dport: 80, ethProto: etherTypeIPv4},
		},
		{
			name:    "policy, ingress: 8.8.8.8 to B:443 (isolated), through tern_to_pod",
			isolate: true,
			to:      true,
			frame:   w.into(b, syn(world, b.ip, 443)).frame(),
			want:    want{kind: TernEventKindEVENT_POLICY, dir: TernPolicyDirPOLICY_DIR_INGRESS, local: polIDB, remote: 0, src: world, dst: b.ip, sport: 40000, dport: 443, ethProto: etherTypeIPv4},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w.install(t, polRuleSet(c.isolate, c.isolate))
			drainEvents(t, w.objs)
			prog, ifindex := w.from, a.ifindex
			if c.to {
				prog, ifindex = w.to, b.ifindex
			}
			before := readMetrics(t, w.objs)
			v, _, err := runFromPod(w.ns, prog, ifindex, c.frame)
			if err != nil {
				t.Fatal(err)
			}
			if v != tcActShot {
				t.Fatalf("verdict %d, want drop", v)
			}
			evs := drainEvents(t, w.objs)
			if len(evs) != 1 {
				t.Fatalf("%d events, want 1: %+v", len(evs), evs)
			}
			ev := evs[0]
			wt := c.want
			if TernEventKind(ev.Type) != wt.kind || ev.Ifindex != uint32(ifindex) || ev.Len != uint32(len(c.frame)) ||
				ev.EthProto != be16(wt.ethProto) || ev.TsNs == 0 {
				t.Errorf("event %+v: want kind %d ifindex %d len %d ethertype %#x", ev, wt.kind, ifindex, len(c.frame), wt.ethProto)
			}
			if wt.src.IsValid() && (ev.Saddr != be32(wt.src) || ev.Daddr != be32(wt.dst) || ev.Sport != be16(wt.sport) || ev.Dport != be16(wt.dport)) {
				t.Errorf("event %+v: want %s:%d -> %s:%d", ev, wt.src, wt.sport, wt.dst, wt.dport)
			}
			switch wt.kind {
			case TernEventKindEVENT_DROP:
				if TernMetric(ev.Reason) != wt.reason {
					t.Errorf("reason %d, want %d", ev.Reason, wt.reason)
				}
				// The metric the event names is the one counted.
				after := readMetrics(t, w.objs)
				if after[wt.reason].Packets != before[wt.reason].Packets+1 {
					t.Errorf("metric %d not counted", wt.reason)
				}
			case TernEventKindEVENT_POLICY:
				if TernPolicyDir(ev.Dir) != wt.dir || TernEventVerdict(ev.Verdict) != TernEventVerdictEVENT_VERDICT_DENY ||
					ev.LocalId != wt.local || ev.RemoteClass != wt.remote {
					t.Errorf("policy event %+v: want dir %d deny local %d remote %d", ev, wt.dir, wt.local, wt.remote)
				}
			}
		})
	}
}

// TestEventConfig: traces and policy allows are off by default and on with
// their flags; drops and denials go off with theirs.
func TestEventConfig(t *testing.T) {
	w := newPolTest(t)
	a, b := w.a, w.b
	ping := w.fromA(natPkt{dst: b.ip, proto: icmp, icmpType: 8, icmpID: 7}).frame()
	spoofed := natPkt{srcMAC: a.mac, dstMAC: a.hostMAC, src: b.ip, dst: a.ip, proto: udpP, sport: 1, dport: 2}.frame()
	run := func(t *testing.T, cfg TernEventConfig, isolate bool, frame []byte, want uint32) []TernEvent {
		t.Helper()
		w.install(t, polRuleSet(isolate, false, pk(0, 0, polIDA, 0xffffffff, 0, 0), pk(1, 0, polIDA, 0xffffffff, 0, 0)))
		setEventConfig(t, w.objs, cfg)
		drainEvents(t, w.objs)
		v, _, err := runFromPod(w.ns, w.from, a.ifindex, frame)
		if err != nil {
			t.Fatal(err)
		}
		if v != want {
			t.Fatalf("verdict %d, want %d", v, want)
		}
		return drainEvents(t, w.objs)
	}
	if evs := run(t, TernEventConfig{}, false, ping, tcActRedirect); len(evs) != 0 {
		t.Errorf("default config: a redirect sent %+v", evs)
	}
	evs := run(t, TernEventConfig{Flags: uint32(TernEventFlagsEVENT_F_TRACE)}, false, ping, tcActRedirect)
	if len(evs) != 1 || TernEventKind(evs[0].Type) != TernEventKindEVENT_TRACE || TernMetric(evs[0].Reason) != TernMetricMETRIC_REDIRECT_PEER ||
		evs[0].Saddr != be32(a.ip) || evs[0].Daddr != be32(b.ip) || evs[0].Sport != be16(7) {
		t.Errorf("traces on: %+v, want one redirect_peer trace of A -> B", evs)
	}
	if evs := run(t, TernEventConfig{}, true, ping, tcActRedirect); len(evs) != 0 {
		t.Errorf("default config: an allowed flow sent %+v", evs)
	}
	evs = run(t, TernEventConfig{Flags: uint32(TernEventFlagsEVENT_F_POLICY_ALLOW)}, true, ping, tcActRedirect)
	if len(evs) != 1 || TernEventKind(evs[0].Type) != TernEventKindEVENT_POLICY || TernEventVerdict(evs[0].Verdict) != TernEventVerdictEVENT_VERDICT_ALLOW ||
		TernPolicyDir(evs[0].Dir) != TernPolicyDirPOLICY_DIR_EGRESS || evs[0].LocalId != polIDA || evs[0].RemoteClass != polClassB {
		t.Errorf("policy allows on: %+v, want one egress allow of identity %d to class %d", evs, polIDA, polClassB)
	}
	if evs := run(t, TernEventConfig{Flags: uint32(TernEventFlagsEVENT_F_NO_DROP)}, false, spoofed, tcActShot); len(evs) != 0 {
		t.Errorf("drops off: %+v", evs)
	}
	denied := w.fromA(natPkt{dst: b.ip, proto: tcp, sport: 1, dport: 80, tcpFlags: natTCPSyn}).frame()
	w.install(t, polRuleSet(true, false))
	setEventConfig(t, w.objs, TernEventConfig{Flags: uint32(TernEventFlagsEVENT_F_NO_POLICY_DENY)})
	drainEvents(t, w.objs)
	if v, _, err := runFromPod(w.ns, w.from, a.ifindex, denied); err != nil || v != tcActShot {
		t.Fatalf("denied flow: verdict %d, %v", v, err)
	}
	if evs := drainEvents(t, w.objs); len(evs) != 0 {
		t.Errorf("denials off: %+v", evs)
	}
}

// TestEventRateLimit: at 1 event per second with a burst of 3, ten drops
// in a row send 3 events and count 7 as suppressed (the run takes well
// under the 1 s that would earn a fourth token... unless the CPU is stolen
// for a second, which the check allows for).
func TestEventRateLimit(t *testing.T) {
	w := newPolTest(t)
	a, b := w.a, w.b
	w.install(t, polRuleSet(false, false))
	setEventConfig(t, w.objs, TernEventConfig{Rate: 1, Burst: 3})
	spoofed := natPkt{srcMAC: a.mac, dstMAC: a.hostMAC, src: b.ip, dst: a.ip, proto: udpP, sport: 1, dport: 2}.frame()
	start := time.Now()
	for range 10 {
		if v, _, err := runFromPod(w.ns, w.from, a.ifindex, spoofed); err != nil || v != tcActShot {
			t.Fatalf("verdict %d, %v", v, err)
		}
	}
	elapsed := time.Since(start)
	evs := drainEvents(t, w.objs)
	lim := readLimiter(t, w.objs)
	extra := int(elapsed / time.Second) // tokens earned while running
	if len(evs) < 3 || len(evs) > 3+extra || int(lim.Sent) != len(evs) || lim.Sent+lim.Suppressed != 10 || lim.Lost != 0 {
		t.Errorf("%d events, limiter %+v after %v; want 3 sent, 7 suppressed", len(evs), lim, elapsed)
	}
}

// TestDropEventsNAT: the drops of the masquerading path, and of the uplink
// program (a second object sharing the maps), send their events too.
func TestDropEventsNAT(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	ring := w.maps[TernMapTernEvents]
	one := func(t *testing.T, want TernMetric, ifindex int) TernEvent {
		t.Helper()
		evs := drainRing(t, ring)
		if len(evs) != 1 || TernEventKind(evs[0].Type) != TernEventKindEVENT_DROP || TernMetric(evs[0].Reason) != want || evs[0].Ifindex != uint32(ifindex) {
			t.Fatalf("events %+v, want one drop %d on ifindex %d", evs, want, ifindex)
		}
		return evs[0]
	}

	drainRing(t, ring)
	if v, _ := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: 47, payload: []byte{0, 0, 8, 0}}); v != natActShot {
		t.Fatalf("GRE to the server: verdict %d", v)
	}
	if ev := one(t, TernMetricMETRIC_DROP_NAT_UNSUPPORTED, w.a.ifindex); ev.Proto != 47 || ev.Saddr != be32(w.a.ip) || ev.Daddr != be32(natServer) {
		t.Errorf("nat unsupported event %+v: want GRE %s -> %s", ev, w.a.ip, natServer)
	}

	// A reply of a masqueraded flow whose TTL expires on the hop into the
	// pod, on the uplink.
	v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 5353, dport: 53, payload: []byte("q")})
	if v != natActRedirect {
		t.Fatalf("tern_from_pod verdict %d", v)
	}
	natPort := natParse(t, out).sport
	drainRing(t, ring)
	reply := natPkt{src: natServer, dst: natNodeIP, ttl: 1, proto: unix.IPPROTO_UDP, sport: 53, dport: natPort, payload: []byte("a"),
		srcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, dstMAC: w.uplinkMAC}
	if v, _ := w.run(t, w.fromUplink, w.uplink, reply.frame()); v != natActShot {
		t.Fatalf("TTL 1 reply: verdict %d", v)
	}
	if ev := one(t, TernMetricMETRIC_DROP_REV_TTL, w.uplink); ev.Saddr != be32(natServer) || ev.Dport != be16(natPort) {
		t.Errorf("rev ttl event %+v: want from %s to NAT port %d", ev, natServer, natPort)
	}
}
