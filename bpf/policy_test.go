package bpf

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
)

// NetworkPolicy tests: tern_from_pod and tern_to_pod run through
// BPF_PROG_TEST_RUN on frames built by natPkt (snat_test.go), inside a
// namespace holding the two pods' host veths (newWorld), with a rule set
// written into the policy maps with compile's encodings, as the datapath
// writes it. Pod A is 10.244.1.2 (identity 1), pod B 10.244.1.3 (identity
// 2); the node's gateway 10.244.1.1 is a host address.

var (
	polGateway = netip.MustParseAddr("10.244.1.1")
	polWorld   = netip.MustParseAddr("8.8.8.8")        // no ipcache entry: class world
	polBlock   = netip.MustParseAddr("203.0.113.9")    // inside 203.0.113.0/24: class 4
	polRouter  = netip.MustParseAddr("198.51.100.254") // sends ICMP errors
)

// Classes of polRuleSet's ipcache.
const (
	polClassA     = 2
	polClassB     = 3
	polClassBlock = 4
	polIDA        = 1
	polIDB        = 2
)

type polTest struct {
	ns       ns.NetNS
	a, b     pod
	from, to *ebpf.Program
	objs     *testObjs
}

func newPolTest(t *testing.T) *polTest {
	t.Helper()
	return newPolTestWith(t, nil)
}

// newPolTestWith is newPolTest with edit applied to the object's spec.
func newPolTestWith(t *testing.T, edit func(*ebpf.CollectionSpec)) *polTest {
	t.Helper()
	testutil.RequirePrivileged(t)
	objs := loadUnpinnedWith(t, edit)
	w := &polTest{from: objs.prog, to: objs.programs[TernProgTernToPod], objs: objs}
	if w.from == nil || w.to == nil {
		t.Fatalf("object lacks %s or %s", TernProgTernFromPod, TernProgTernToPod)
	}
	w.ns, w.a, w.b = newWorld(t)
	return w
}

// polRuleSet is the base rule set: A and B with their isolation, the
// ipcache of the world above, and the given policy entries.
func polRuleSet(aEgress, bIngress bool, keys ...compile.PolicyKey) *compile.RuleSet {
	rs := &compile.RuleSet{
		Endpoints: map[string]compile.EndpointPolicy{
			"10.244.1.2": {LocalID: polIDA, EgressIsolated: aEgress},
			"10.244.1.3": {LocalID: polIDB, IngressIsolated: bIngress},
		},
		IPCache: []compile.IPCacheEntry{
			polIPCache("10.244.1.1/32", compile.ClassHost),
			polIPCache("10.244.1.2/32", polClassA),
			polIPCache("10.244.1.3/32", polClassB),
			polIPCache("203.0.113.0/24", polClassBlock),
		},
	}
	for _, k := range keys {
		rs.Policy = append(rs.Policy, compile.PolicyEntry{Key: k, Verdict: compile.VerdictAllow})
	}
	return rs
}

func polIPCache(prefix string, class uint32) compile.IPCacheEntry {
	_, n, err := net.ParseCIDR(prefix)
	if err != nil {
		panic(err)
	}
	return compile.IPCacheEntry{Prefix: *n, Class: class}
}

// install empties every map, registers A and B as endpoints and writes rs
// with compile's binary encodings.
func (w *polTest) install(t *testing.T, rs *compile.RuleSet) {
	t.Helper()
	resetMaps(t, w.objs, w.a, w.b)
	writeRuleSet(t, w.objs.maps, rs)
}

// writeRuleSet writes a rule set's three tables into fresh maps.
func writeRuleSet(t testing.TB, maps map[string]*ebpf.Map, rs *compile.RuleSet) {
	t.Helper()
	for ip, ep := range rs.Endpoints {
		k, err := compile.EndpointKeyOf(ip)
		if err != nil {
			t.Fatal(err)
		}
		if err := maps[TernMapTernEpPolicy].Put(k, ep); err != nil {
			t.Fatalf("put endpoint policy %s: %v", ip, err)
		}
	}
	for _, e := range rs.IPCache {
		if err := maps[TernMapTernIpcache].Put(e.Key(), compile.IPCacheValue{Class: e.Class}); err != nil {
			t.Fatalf("put ipcache %s: %v", e.Prefix.String(), err)
		}
	}
	for _, e := range rs.Policy {
		if err := maps[TernMapTernPolicy].Put(e.Key, compile.PolicyValue{Verdict: e.Verdict}); err != nil {
			t.Fatalf("put policy %v: %v", e.Key, err)
		}
	}
}

// fromA, fromB and toX build frames: sent by pod A (B) to its gateway, or
// delivered by the host stack into pod A (B).
func (w *polTest) fromA(p natPkt) natPkt {
	p.src, p.srcMAC, p.dstMAC = w.a.ip, w.a.mac, w.a.hostMAC
	return p
}

func (w *polTest) fromB(p natPkt) natPkt {
	p.src, p.srcMAC, p.dstMAC = w.b.ip, w.b.mac, w.b.hostMAC
	return p
}

func (w *polTest) into(dst pod, p natPkt) natPkt {
	p.dst, p.srcMAC, p.dstMAC = dst.ip, dst.hostMAC, dst.mac
	return p
}

// run runs prog on frame as if it arrived at ifindex, and fails the test
// unless it returns want and counts exactly one packet, in metric m.
func (w *polTest) run(t *testing.T, prog *ebpf.Program, ifindex int, frame []byte, want uint32, m TernMetric) {
	t.Helper()
	before := readMetrics(t, w.objs)
	verdict, _, err := runFromPod(w.ns, prog, ifindex, frame)
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if verdict != want {
		t.Errorf("verdict %d, want %d", verdict, want)
	}
	after := readMetrics(t, w.objs)
	for i := range after {
		var d TernMetricValue
		d.Packets = after[i].Packets - before[i].Packets
		d.Bytes = after[i].Bytes - before[i].Bytes
		var wantD TernMetricValue
		if TernMetric(i) == m {
			wantD = TernMetricValue{Packets: 1, Bytes: uint64(len(frame))}
		}
		if d != wantD {
			t.Errorf("metric %d moved by %+v, want %+v", i, d, wantD)
		}
	}
}

// ctEntries returns the policy conntrack, TCP and the rest, with the SEQ
// flags (which say only that seq_hi is set) masked out.
func (w *polTest) ctEntries(t *testing.T) map[TernPolicyCtKey]TernPolicyCtEntry {
	t.Helper()
	out := map[TernPolicyCtKey]TernPolicyCtEntry{}
	seqFlags := uint16(TernPolicyCtFlagsPOLICY_CT_F_SEQ_ORIG | TernPolicyCtFlagsPOLICY_CT_F_SEQ_REPLY)
	for _, name := range []string{TernMapTernPolicyCt, TernMapTernPolicyCtOther} {
		var (
			k TernPolicyCtKey
			v TernPolicyCtEntry
		)
		it := w.objs.maps[name].Iterate()
		for it.Next(&k, &v) {
			v.Flags &^= seqFlags
			out[k] = v
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// ctMap is the policy conntrack map of proto.
func (w *polTest) ctMap(proto uint8) *ebpf.Map {
	if proto == tcp {
		return w.objs.maps[TernMapTernPolicyCt]
	}
	return w.objs.maps[TernMapTernPolicyCtOther]
}

func (w *polTest) clearCT(t *testing.T) {
	t.Helper()
	for k := range w.ctEntries(t) {
		if err := w.ctMap(k.Proto).Delete(k); err != nil {
			t.Fatal(err)
		}
	}
}

func pk(dir compile.Direction, proto uint8, local, remote uint32, port uint16, bits uint8) compile.PolicyKey {
	return compile.PolicyKey{Dir: dir, Proto: proto, LocalID: local, RemoteClass: remote, Port: port, PortBits: bits}
}

const (
	tcp  = unix.IPPROTO_TCP
	udpP = unix.IPPROTO_UDP
	sctp = unix.IPPROTO_SCTP
	icmp = unix.IPPROTO_ICMP
)

// sctpHeader is an SCTP common header (ports, verification tag, checksum).
func sctpHeader(sport, dport uint16) []byte {
	b := binary.BigEndian.AppendUint16(nil, sport)
	b = binary.BigEndian.AppendUint16(b, dport)
	return append(b, 0, 0, 0, 1, 0, 0, 0, 0)
}

// TestPolicyDecisions: first packets of flows (conntrack empty) against
// single-entry rule sets: ingress and egress, allow and deny, the
// wildcards, the host class, and the packets policy leaves alone.
func TestPolicyDecisions(t *testing.T) {
	w := newPolTest(t)
	ing, egr := compile.Ingress, compile.Egress
	const (
		redirect = tcActRedirect
		ok       = tcActOK
		shot     = tcActShot
	)
	type progKind int
	const (
		fromA progKind = iota // tern_from_pod on A's veth
		fromB                 // tern_from_pod on B's veth
		toB                   // tern_to_pod on B's veth (host stack delivers)
		toA
	)
	synTo := func(dport uint16) natPkt {
		return natPkt{proto: tcp, sport: 40000, dport: dport, tcpFlags: natTCPSyn}
	}
	cases := []struct {
		name             string
		aEgress, bIngres bool
		keys             []compile.PolicyKey
		prog             progKind
		pkt              natPkt
		verdict          uint32
		metric           TernMetric
	}{
		{name: "no isolation, no entries: A->B TCP SYN 80 redirected",
			prog: fromA, pkt: synTo(80), verdict: redirect, metric: TernMetricMETRIC_REDIRECT_PEER},
		{name: "B ingress isolated, no entries: A->B TCP SYN 80 dropped",
			bIngres: true, prog: fromA, pkt: synTo(80), verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "B ingress allows TCP 80 from A's class: A->B TCP 80 redirected",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, tcp, polIDB, polClassA, 80, 16)},
			prog: fromA, pkt: synTo(80), verdict: redirect, metric: TernMetricMETRIC_REDIRECT_PEER},
		{name: "B ingress allows TCP 80 from A's class: A->B TCP 81 dropped",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, tcp, polIDB, polClassA, 80, 16)},
			prog: fromA, pkt: synTo(81), verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "B ingress allows TCP 80 from A's class: A->B UDP 80 dropped (protocol is in the key)",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, tcp, polIDB, polClassA, 80, 16)},
			prog: fromA, pkt: natPkt{proto: udpP, sport: 40000, dport: 80}, verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "B ingress allows TCP 80 from A's class: 8.8.8.8->B TCP 80 (host-delivered) dropped",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, tcp, polIDB, polClassA, 80, 16)},
			prog: toB, pkt: natPkt{src: polWorld, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn}, verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "wildcard remote, UDP 53: 8.8.8.8->B UDP 53 (host-delivered) passes",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, udpP, polIDB, compile.ClassAny, 53, 16)},
			prog: toB, pkt: natPkt{src: polWorld, proto: udpP, sport: 5353, dport: 53}, verdict: ok, metric: TernMetricMETRIC_PASS_TO_POD},
		{name: "wildcard remote, UDP 53: A->B UDP 54 dropped",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, udpP, polIDB, compile.ClassAny, 53, 16)},
			prog: fromA, pkt: natPkt{proto: udpP, sport: 5353, dport: 54}, verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "wildcard protocol from A's class: A->B SCTP 9999 redirected",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, compile.ProtoAny, polIDB, polClassA, 0, 0)},
			prog: fromA, pkt: natPkt{proto: sctp, l4: sctpHeader(7, 9999)}, verdict: redirect, metric: TernMetricMETRIC_REDIRECT_PEER},
		{name: "wildcard protocol from A's class: A->B ICMP echo redirected",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, compile.ProtoAny, polIDB, polClassA, 0, 0)},
			prog: fromA, pkt: natPkt{proto: icmp, icmpType: 8, icmpID: 9}, verdict: redirect, metric: TernMetricMETRIC_REDIRECT_PEER},
		{name: "wildcard protocol from A's class: 203.0.113.9->B ICMP dropped",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, compile.ProtoAny, polIDB, polClassA, 0, 0)},
			prog: toB, pkt: natPkt{src: polBlock, proto: icmp, icmpType: 8, icmpID: 9}, verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "any protocol, any remote: 8.8.8.8->B SCTP passes",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, compile.ProtoAny, polIDB, compile.ClassAny, 0, 0)},
			prog: toB, pkt: natPkt{src: polWorld, proto: sctp, l4: sctpHeader(7, 1)}, verdict: ok, metric: TernMetricMETRIC_PASS_TO_POD},
		{name: "ipBlock class: 203.0.113.9->B SCTP 3868 passes, SCTP ports are read",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, sctp, polIDB, polClassBlock, 3868, 16)},
			prog: toB, pkt: natPkt{src: polBlock, proto: sctp, l4: sctpHeader(7, 3868)}, verdict: ok, metric: TernMetricMETRIC_PASS_TO_POD},
		{name: "ipBlock class: 203.0.113.9->B SCTP 3869 dropped",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, sctp, polIDB, polClassBlock, 3868, 16)},
			prog: toB, pkt: natPkt{src: polBlock, proto: sctp, l4: sctpHeader(7, 3869)}, verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "port prefix 8080/13 (8080-8087): A->B TCP 8087 redirected",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, tcp, polIDB, polClassA, 8080, 13)},
			prog: fromA, pkt: synTo(8087), verdict: redirect, metric: TernMetricMETRIC_REDIRECT_PEER},
		{name: "port prefix 8080/13 (8080-8087): A->B TCP 8088 dropped",
			bIngres: true, keys: []compile.PolicyKey{pk(ing, tcp, polIDB, polClassA, 8080, 13)},
			prog: fromA, pkt: synTo(8088), verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "B ingress isolated, no entries: host 10.244.1.1->B passes (host class)",
			bIngres: true, prog: toB, pkt: natPkt{src: polGateway, proto: tcp, sport: 40000, dport: 22, tcpFlags: natTCPSyn}, verdict: ok, metric: TernMetricMETRIC_PASS_TO_POD},
		{name: "A egress isolated, no entries: A->B dropped at egress",
			aEgress: true, prog: fromA, pkt: synTo(80), verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_EGRESS},
		{name: "A egress allows TCP 443 to B's class: A->B TCP 443 redirected",
			aEgress: true, keys: []compile.PolicyKey{pk(egr, tcp, polIDA, polClassB, 443, 16)},
			prog: fromA, pkt: synTo(443), verdict: redirect, metric: TernMetricMETRIC_REDIRECT_PEER},
		{name: "A egress allows TCP 443 to B's class: A->8.8.8.8 TCP 443 dropped",
			aEgress: true, keys: []compile.PolicyKey{pk(egr, tcp, polIDA, polClassB, 443, 16)},
			prog: fromA, pkt: natPkt{dst: polWorld, proto: tcp, sport: 40000, dport: 443, tcpFlags: natTCPSyn}, verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_EGRESS},
		{name: "A egress allows the host class (the compiler's host entry): A->10.244.1.1 passes to the stack",
			aEgress: true, keys: []compile.PolicyKey{pk(egr, compile.ProtoAny, polIDA, compile.ClassHost, 0, 0)},
			prog: fromA, pkt: natPkt{dst: polGateway, proto: udpP, sport: 5353, dport: 53}, verdict: ok, metric: TernMetricMETRIC_PASS_HOST},
		{name: "A egress isolated, no entries: A->10.244.1.1 dropped (the host class has no special case at egress)",
			aEgress: true, prog: fromA, pkt: natPkt{dst: polGateway, proto: udpP, sport: 5353, dport: 53}, verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_EGRESS},
		{name: "A egress allowed to B, B ingress not: A->B dropped at ingress",
			aEgress: true, bIngres: true, keys: []compile.PolicyKey{pk(egr, tcp, polIDA, polClassB, 80, 16)},
			prog: fromA, pkt: synTo(80), verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "egress entry of the other direction does not allow ingress: B ingress isolated, egress key for B",
			bIngres: true, keys: []compile.PolicyKey{pk(egr, tcp, polIDB, polClassA, 80, 16)},
			prog: fromA, pkt: synTo(80), verdict: shot, metric: TernMetricMETRIC_DROP_POLICY_INGRESS},
		{name: "B egress not isolated: B->8.8.8.8 passes whatever B's ingress",
			bIngres: true, prog: fromB, pkt: natPkt{dst: polWorld, proto: udpP, sport: 5353, dport: 53}, verdict: ok, metric: TernMetricMETRIC_PASS_HOST},
		{name: "tern_to_pod: 8.8.8.8->A (A not ingress isolated) passes",
			aEgress: true, prog: toA, pkt: natPkt{src: polWorld, proto: udpP, sport: 53, dport: 5353}, verdict: ok, metric: TernMetricMETRIC_PASS_TO_POD},
		{name: "tern_to_pod: ARP into B passes",
			bIngres: true, prog: toB, pkt: natPkt{}, verdict: ok, metric: TernMetricMETRIC_PASS_TO_POD},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w.install(t, polRuleSet(tc.aEgress, tc.bIngres, tc.keys...))
			var (
				prog    *ebpf.Program
				ifindex int
				frame   []byte
			)
			p := tc.pkt
			switch arp := p.proto == 0 && p.l4 == nil; {
			case arp && tc.prog == toB:
				prog, ifindex = w.to, w.b.ifindex
				frame = ethernet(broadcast, w.b.hostMAC, etherTypeARP, arpRequest(w.b.hostMAC, polGateway, w.b.ip))
			case arp:
				t.Fatal("ARP cases are tern_to_pod on B")
			}
			switch tc.prog {
			case fromA:
				if !p.dst.IsValid() {
					p.dst = w.b.ip
				}
				prog, ifindex, frame = w.from, w.a.ifindex, w.fromA(p).frame()
			case fromB:
				prog, ifindex, frame = w.from, w.b.ifindex, w.fromB(p).frame()
			case toB:
				if frame == nil {
					prog, ifindex, frame = w.to, w.b.ifindex, w.into(w.b, p).frame()
				}
			case toA:
				prog, ifindex, frame = w.to, w.a.ifindex, w.into(w.a, p).frame()
			}
			w.run(t, prog, ifindex, frame, tc.verdict, tc.metric)
			ct := w.ctEntries(t)
			switch {
			case tc.verdict == shot && len(ct) != 0:
				t.Errorf("a dropped packet left conntrack entries: %+v", ct)
			case tc.verdict != shot && p.proto != 0 && len(ct) != 1:
				t.Errorf("a passed first packet left %d conntrack entries, want 1: %+v", len(ct), ct)
			}
		})
	}

	// Tracked all the same, so that a policy applied later finds the
	// flows established (TestPolicyEstablishedBeforePolicy).
	t.Run("no policy state at all: nothing is decided, the flows are tracked", func(t *testing.T) {
		resetMaps(t, w.objs, w.a, w.b)
		w.run(t, w.from, w.a.ifindex, w.fromA(natPkt{dst: w.b.ip, proto: tcp, sport: 1, dport: 2, tcpFlags: natTCPSyn}).frame(), redirect, TernMetricMETRIC_REDIRECT_PEER)
		w.run(t, w.to, w.b.ifindex, w.into(w.b, natPkt{src: polWorld, proto: udpP, sport: 1, dport: 2}).frame(), ok, TernMetricMETRIC_PASS_TO_POD)
		if ct := w.ctEntries(t); len(ct) != 2 {
			t.Errorf("conntrack without policy state: %+v, want the TCP and the UDP flow", ct)
		}
	})
}

// TestPolicyPortRange: a compiled endPort range (1000-1100, written as
// prefix-aligned blocks) allows exactly its ports: the port is in network
// order in the key, so the blocks are LPM prefixes.
func TestPolicyPortRange(t *testing.T) {
	w := newPolTest(t)
	objs, err := manifest.Decode(strings.NewReader(`
apiVersion: v1
kind: Pod
metadata: {namespace: ns, name: a, labels: {app: a}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: ns, name: b, labels: {app: b}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: ns, name: range}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 1000, endPort: 1100}, {protocol: UDP, port: 1, endPort: 65535}]
`))
	if err != nil {
		t.Fatal(err)
	}
	st, err := manifest.NewState().Apply(objs)
	if err != nil {
		t.Fatal(err)
	}
	topo := policyTopo(map[string][2]string{"10.244.1.2": {"ns", "a"}, "10.244.1.3": {"ns", "b"}}, nil, polGateway.String())
	rs, err := compile.Compile(st, topo, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs.Policy) < 3 {
		t.Fatalf("expected the range to take several entries, got %v", rs.Policy)
	}
	w.install(t, rs)
	for _, c := range []struct {
		proto uint8
		port  uint16
		allow bool
	}{
		{tcp, 999, false}, {tcp, 1000, true}, {tcp, 1023, true}, {tcp, 1024, true}, {tcp, 1050, true},
		{tcp, 1099, true}, {tcp, 1100, true}, {tcp, 1101, false},
		{tcp, 0xe803, false}, // 1000 byte-swapped
		{tcp, 0x0434, true},  // 1076; byte-swapped it would be out of range
		{udpP, 0, false}, {udpP, 1, true}, {udpP, 65535, true},
	} {
		w.clearCT(t)
		p := natPkt{dst: w.b.ip, proto: c.proto, sport: 5000, dport: c.port, tcpFlags: natTCPSyn}
		verdict, _, err := runFromPod(w.ns, w.from, w.a.ifindex, w.fromA(p).frame())
		if err != nil {
			t.Fatal(err)
		}
		if got := verdict != tcActShot; got != c.allow {
			t.Errorf("proto %d port %d: allowed %v, want %v", c.proto, c.port, got, c.allow)
		}
		if got := compile.Simulate(rs, policyPacket(w.a.ip, w.b.ip, c.proto, c.port)); got != c.allow {
			t.Errorf("proto %d port %d: the simulator says %v, the table says %v", c.proto, c.port, got, c.allow)
		}
	}
}

// TestPolicyConntrack: replies of allowed flows pass both ways, established
// flows survive a policy that no longer allows them, RST and FIN shorten
// their lifetime, and a SYN reopening a closed tuple is decided anew.
func TestPolicyConntrack(t *testing.T) {
	w := newPolTest(t)
	ing, egr := compile.Ingress, compile.Egress
	// Both pods isolated both ways; A may open TCP 80 to B and UDP 53 to
	// the world, B nothing.
	allow := []compile.PolicyKey{
		pk(egr, tcp, polIDA, polClassB, 80, 16),
		pk(ing, tcp, polIDB, polClassA, 80, 16),
		pk(egr, udpP, polIDA, compile.ClassWorld, 53, 16),
	}
	rs := polRuleSet(true, true, allow...)
	rs.Endpoints["10.244.1.2"] = compile.EndpointPolicy{LocalID: polIDA, IngressIsolated: true, EgressIsolated: true}
	rs.Endpoints["10.244.1.3"] = compile.EndpointPolicy{LocalID: polIDB, IngressIsolated: true, EgressIsolated: true}
	w.install(t, rs)

	aToB := func(flags uint8) []byte {
		return w.fromA(natPkt{dst: w.b.ip, proto: tcp, sport: 40001, dport: 80, tcpFlags: flags}).frame()
	}
	bToA := func(flags uint8) []byte {
		return w.fromB(natPkt{dst: w.a.ip, proto: tcp, sport: 80, dport: 40001, tcpFlags: flags}).frame()
	}
	redirect, shot, ok := uint32(tcActRedirect), uint32(tcActShot), uint32(tcActOK)
	peer, dropE := TernMetricMETRIC_REDIRECT_PEER, TernMetricMETRIC_DROP_POLICY_EGRESS

	// Without the SYN, B's answer is a new flow B's egress denies.
	w.run(t, w.from, w.b.ifindex, bToA(natTCPSyn|natTCPAck), shot, dropE)
	w.run(t, w.from, w.a.ifindex, aToB(natTCPSyn), redirect, peer)
	key := TernPolicyCtKey{LoAddr: endpointKey(w.a.ip), HiAddr: endpointKey(w.b.ip), LoPort: natPort(40001), HiPort: natPort(80), Proto: tcp}
	// NO_STACK: delivering it, tern_from_pod asked tern_stack_ct
	// (stack_owned) and found no flow of the host stack: the flow's later
	// packets do not ask again (the flag is not the subject here, and is
	// masked below).
	noStack := uint16(TernPolicyCtFlagsPOLICY_CT_F_NO_STACK)
	ct := w.ctEntries(t)
	if e, found := ct[key]; !found || len(ct) != 1 || e.Flags != noStack {
		t.Fatalf("conntrack after the SYN: %+v, want only %+v with flags NO_STACK", ct, key)
	}
	w.run(t, w.from, w.b.ifindex, bToA(natTCPSyn|natTCPAck), redirect, peer)
	if e := w.ctEntries(t)[key]; e.Flags&^noStack != uint16(TernPolicyCtFlagsPOLICY_CT_F_SEEN_REPLY) {
		t.Errorf("flags after the reply %#x, want SEEN_REPLY", e.Flags)
	}
	w.run(t, w.from, w.a.ifindex, aToB(natTCPAck), redirect, peer)

	// A policy update that no longer allows the flow: established, it
	// goes on (the entries stay), but a new flow is denied.
	rs2 := polRuleSet(true, true)
	rs2.Endpoints["10.244.1.2"] = rs.Endpoints["10.244.1.2"]
	rs2.Endpoints["10.244.1.3"] = rs.Endpoints["10.244.1.3"]
	resetPolicyOnly(t, w, rs2)
	w.run(t, w.from, w.a.ifindex, aToB(natTCPAck), redirect, peer)
	w.run(t, w.from, w.b.ifindex, bToA(natTCPAck), redirect, peer)
	other := w.fromA(natPkt{dst: w.b.ip, proto: tcp, sport: 40002, dport: 80, tcpFlags: natTCPSyn}).frame()
	w.run(t, w.from, w.a.ifindex, other, shot, dropE)

	// An idle established flow lives long (6 h by default): 11 s idle is
	// nothing.
	age := func(d time.Duration) {
		t.Helper()
		var e TernPolicyCtEntry
		if err := w.ctMap(tcp).Lookup(key, &e); err != nil {
			t.Fatal(err)
		}
		e.LastSeen = natMonoNow(t) - uint64(d)
		if err := w.ctMap(tcp).Put(key, e); err != nil {
			t.Fatal(err)
		}
	}
	age(11 * time.Second)
	w.run(t, w.from, w.b.ifindex, bToA(natTCPAck), redirect, peer)

	// RST: the entry has 10 s left; past them, B's next segment is a new
	// flow, denied.
	w.run(t, w.from, w.a.ifindex, aToB(natTCPRst), redirect, peer)
	if e := w.ctEntries(t)[key]; e.Flags&uint16(TernPolicyCtFlagsPOLICY_CT_F_RST) == 0 {
		t.Errorf("flags after RST %#x, want RST set", e.Flags)
	}
	w.run(t, w.from, w.b.ifindex, bToA(natTCPAck), redirect, peer)
	age(11 * time.Second)
	w.run(t, w.from, w.b.ifindex, bToA(natTCPAck), shot, dropE)

	// FIN both ways does the same; before that, a SYN reopening the
	// closed tuple is decided by the policy in force (which denies it).
	if err := w.objs.maps[TernMapTernPolicyCt].Put(key, TernPolicyCtEntry{LastSeen: natMonoNow(t), Flags: uint16(TernPolicyCtFlagsPOLICY_CT_F_SEEN_REPLY)}); err != nil {
		t.Fatal(err)
	}
	w.run(t, w.from, w.a.ifindex, aToB(natTCPFin|natTCPAck), redirect, peer)
	w.run(t, w.from, w.b.ifindex, bToA(natTCPFin|natTCPAck), redirect, peer)
	wantFlags := uint16(TernPolicyCtFlagsPOLICY_CT_F_SEEN_REPLY | TernPolicyCtFlagsPOLICY_CT_F_FIN_ORIG | TernPolicyCtFlagsPOLICY_CT_F_FIN_REPLY)
	if e := w.ctEntries(t)[key]; e.Flags&^noStack != wantFlags {
		t.Errorf("flags after FIN both ways %#x, want %#x", e.Flags, wantFlags)
	}
	w.run(t, w.from, w.a.ifindex, aToB(natTCPAck), redirect, peer) // last ACK: still within 10 s
	w.run(t, w.from, w.a.ifindex, aToB(natTCPSyn), shot, dropE)
	age(11 * time.Second)
	w.run(t, w.from, w.b.ifindex, bToA(natTCPAck), shot, dropE)

	// UDP to the world and its reply through the host stack (tern_to_pod):
	// A is ingress isolated with no ingress entries.
	w.install(t, rs)
	query := w.fromA(natPkt{dst: polWorld, proto: udpP, sport: 33333, dport: 53}).frame()
	answer := w.into(w.a, natPkt{src: polWorld, proto: udpP, sport: 53, dport: 33333}).frame()
	unasked := w.into(w.a, natPkt{src: polWorld, proto: udpP, sport: 53, dport: 33334}).frame()
	w.run(t, w.to, w.a.ifindex, answer, shot, TernMetricMETRIC_DROP_POLICY_INGRESS)
	w.run(t, w.from, w.a.ifindex, query, ok, TernMetricMETRIC_PASS_HOST)
	w.run(t, w.to, w.a.ifindex, answer, ok, TernMetricMETRIC_PASS_TO_POD)
	w.run(t, w.to, w.a.ifindex, unasked, shot, TernMetricMETRIC_DROP_POLICY_INGRESS)

	// Host to an isolated pod: allowed, and the pod's answers ride on it
	// although A's egress has no entry for the host.
	syn := w.into(w.a, natPkt{src: polGateway, proto: tcp, sport: 50000, dport: 8080, tcpFlags: natTCPSyn}).frame()
	synAck := w.fromA(natPkt{dst: polGateway, proto: tcp, sport: 8080, dport: 50000, tcpFlags: natTCPSyn | natTCPAck}).frame()
	w.run(t, w.to, w.a.ifindex, syn, ok, TernMetricMETRIC_PASS_TO_POD)
	w.run(t, w.from, w.a.ifindex, synAck, ok, TernMetricMETRIC_PASS_HOST)
}

// resetPolicyOnly replaces the policy tables, leaving conntrack as it is.
func resetPolicyOnly(t *testing.T, w *polTest, rs *compile.RuleSet) {
	t.Helper()
	for _, name := range []string{TernMapTernEpPolicy, TernMapTernIpcache, TernMapTernPolicy} {
		m := w.objs.maps[name]
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
	writeRuleSet(t, w.objs.maps, rs)
}

// TestPolicyICMP: an echo reply passes on its request's entry; an ICMP
// error about a tracked flow passes like a reply (path MTU discovery), one
// about an unknown flow is decided as ICMP, and denied.
func TestPolicyICMP(t *testing.T) {
	w := newPolTest(t)
	rs := polRuleSet(true, true,
		pk(compile.Egress, compile.ProtoAny, polIDA, compile.ClassAny, 0, 0),
		pk(compile.Ingress, compile.ProtoAny, polIDB, polClassA, 0, 0))
	rs.Endpoints["10.244.1.2"] = compile.EndpointPolicy{LocalID: polIDA, IngressIsolated: true, EgressIsolated: true}
	rs.Endpoints["10.244.1.3"] = compile.EndpointPolicy{LocalID: polIDB, IngressIsolated: true, EgressIsolated: true}
	w.install(t, rs)
	redirect, shot, ok := uint32(tcActRedirect), uint32(tcActShot), uint32(tcActOK)

	echo := w.fromA(natPkt{dst: w.b.ip, proto: icmp, icmpType: 8, icmpID: 0x77}).frame()
	reply := w.fromB(natPkt{dst: w.a.ip, proto: icmp, icmpType: 0, icmpID: 0x77}).frame()
	otherReply := w.fromB(natPkt{dst: w.a.ip, proto: icmp, icmpType: 0, icmpID: 0x78}).frame()
	w.run(t, w.from, w.b.ifindex, reply, shot, TernMetricMETRIC_DROP_POLICY_EGRESS)
	w.run(t, w.from, w.a.ifindex, echo, redirect, TernMetricMETRIC_REDIRECT_PEER)
	w.run(t, w.from, w.b.ifindex, reply, redirect, TernMetricMETRIC_REDIRECT_PEER)
	w.run(t, w.from, w.b.ifindex, otherReply, shot, TernMetricMETRIC_DROP_POLICY_EGRESS)

	// A's UDP to 8.8.8.8 is tracked; a router's "fragmentation needed"
	// quoting it reaches A, one quoting another flow does not.
	out := natPkt{src: w.a.ip, dst: polWorld, proto: udpP, sport: 44444, dport: 53, payload: []byte("q")}
	w.run(t, w.from, w.a.ifindex, w.fromA(out).frame(), ok, TernMetricMETRIC_PASS_HOST)
	icmpErr := func(quoted natPkt) []byte {
		q := w.fromA(quoted).frame()[ethHdrLen:]
		b := []byte{3, 4, 0, 0, 0, 0, 0x05, 0xdc} // dest unreachable, frag needed, MTU 1500
		b = append(b, q[:28]...)
		binary.BigEndian.PutUint16(b[2:], natCsum(b))
		return w.into(w.a, natPkt{src: polRouter, proto: icmp, l4: b}).frame()
	}
	w.run(t, w.to, w.a.ifindex, icmpErr(out), ok, TernMetricMETRIC_PASS_TO_POD)
	stranger := out
	stranger.sport = 44445
	w.run(t, w.to, w.a.ifindex, icmpErr(stranger), shot, TernMetricMETRIC_DROP_POLICY_INGRESS)
}

// TestPolicyICMPForgedError: an ICMP error passes as "related" only when
// the packet it quotes was sent by the error's destination (netfilter's
// rule). A forged error quoting someone else's tracked flow is decided as
// plain ICMP: an ingress-isolated pod does not receive it from the world,
// and an egress-isolated pod cannot send one (with any payload after the
// quote) to a destination its policy denies.
func TestPolicyICMPForgedError(t *testing.T) {
	w := newPolTest(t)
	// A: isolated both ways, egress allows UDP 53 only, ingress nothing.
	// B: policy state (tracked) but not isolated.
	rs := polRuleSet(true, false, pk(compile.Egress, udpP, polIDA, compile.ClassAny, 53, 16))
	rs.Endpoints["10.244.1.2"] = compile.EndpointPolicy{LocalID: polIDA, IngressIsolated: true, EgressIsolated: true}
	w.install(t, rs)
	shot, ok := uint32(tcActShot), uint32(tcActOK)

	// Tracked flows: B:5555 -> 8.8.8.8:53 and A:44444 -> 8.8.8.8:53.
	bFlow := natPkt{src: w.b.ip, dst: polWorld, proto: udpP, sport: 5555, dport: 53, payload: []byte("q")}
	aFlow := natPkt{src: w.a.ip, dst: polWorld, proto: udpP, sport: 44444, dport: 53, payload: []byte("q")}
	w.run(t, w.from, w.b.ifindex, w.fromB(bFlow).frame(), ok, TernMetricMETRIC_PASS_HOST)
	w.run(t, w.from, w.a.ifindex, w.fromA(aFlow).frame(), ok, TernMetricMETRIC_PASS_HOST)

	// icmpErr is an ICMP error of type/code quoting the first 28 bytes of
	// quoted's IPv4 packet, followed by extra bytes.
	icmpErr := func(typ, code byte, quoted natPkt, extra []byte) []byte {
		q := quoted
		q.srcMAC, q.dstMAC = w.a.mac, w.a.hostMAC
		b := []byte{typ, code, 0, 0, 0, 0, 0x05, 0xdc}
		b = append(b, q.frame()[ethHdrLen:ethHdrLen+28]...)
		b = append(b, extra...)
		binary.BigEndian.PutUint16(b[2:], natCsum(b))
		return b
	}

	// Ingress. Genuine: a router's "fragmentation needed" about A's own
	// packet reaches A.
	genuine := w.into(w.a, natPkt{src: polRouter, proto: icmp, l4: icmpErr(3, 4, aFlow, nil)}).frame()
	w.run(t, w.to, w.a.ifindex, genuine, ok, TernMetricMETRIC_PASS_TO_POD)
	// Forged: the same error about B's packet, sent to A.
	forged := w.into(w.a, natPkt{src: polRouter, proto: icmp, l4: icmpErr(3, 4, bFlow, nil)}).frame()
	w.run(t, w.to, w.a.ifindex, forged, shot, TernMetricMETRIC_DROP_POLICY_INGRESS)

	// Egress. Genuine: A answers a datagram 8.8.8.8:53 sent it (the reply
	// direction of A's flow) with "port unreachable" to 8.8.8.8.
	answer := natPkt{src: polWorld, dst: w.a.ip, proto: udpP, sport: 53, dport: 44444, payload: []byte("a")}
	portUnreach := w.fromA(natPkt{dst: polWorld, proto: icmp, l4: icmpErr(3, 3, answer, nil)}).frame()
	w.run(t, w.from, w.a.ifindex, portUnreach, ok, TernMetricMETRIC_PASS_HOST)
	// Forged: A sends 203.0.113.9 (its egress denies ICMP there) an
	// "error" about B's flow, carrying data of its own after the quote.
	exfil := w.fromA(natPkt{dst: polBlock, proto: icmp, l4: icmpErr(3, 3, bFlow, []byte("secret data"))}).frame()
	w.run(t, w.from, w.a.ifindex, exfil, shot, TernMetricMETRIC_DROP_POLICY_EGRESS)
}

// TestPolicyFragments: the first fragment of an allowed datagram leaves
// its ports, so the later ones (no L4 header) pass; later fragments of an
// unknown datagram to an isolated pod do not, to a pod that is not
// isolated they do.
func TestPolicyFragments(t *testing.T) {
	w := newPolTest(t)
	w.install(t, polRuleSet(false, true, pk(compile.Ingress, udpP, polIDB, polClassA, 53, 16)))
	first := natPkt{dst: w.b.ip, proto: udpP, sport: 1234, dport: 53, frag: 0x2000, payload: bytes.Repeat([]byte{1}, 64)}
	later := natPkt{dst: w.b.ip, proto: udpP, frag: 0x0009, l4: bytes.Repeat([]byte{2}, 40)} // offset 72 bytes, last
	w.run(t, w.from, w.a.ifindex, w.fromA(later).frame(), tcActShot, TernMetricMETRIC_DROP_POLICY_INGRESS)
	w.run(t, w.from, w.a.ifindex, w.fromA(first).frame(), tcActRedirect, TernMetricMETRIC_REDIRECT_PEER)
	w.run(t, w.from, w.a.ifindex, w.fromA(later).frame(), tcActRedirect, TernMetricMETRIC_REDIRECT_PEER)

	denied := first
	denied.dport = 54
	w.install(t, polRuleSet(false, true, pk(compile.Ingress, udpP, polIDB, polClassA, 53, 16)))
	w.run(t, w.from, w.a.ifindex, w.fromA(denied).frame(), tcActShot, TernMetricMETRIC_DROP_POLICY_INGRESS)
	w.run(t, w.from, w.a.ifindex, w.fromA(later).frame(), tcActShot, TernMetricMETRIC_DROP_POLICY_INGRESS)

	w.install(t, polRuleSet(false, false))
	w.run(t, w.from, w.a.ifindex, w.fromA(later).frame(), tcActRedirect, TernMetricMETRIC_REDIRECT_PEER)
}

// TestPolicyAfterAntiSpoofing: a forged source is dropped as spoofed before
// policy is consulted, even when policy would allow it.
func TestPolicyAfterAntiSpoofing(t *testing.T) {
	w := newPolTest(t)
	w.install(t, polRuleSet(false, true, pk(compile.Ingress, compile.ProtoAny, polIDB, compile.ClassAny, 0, 0)))
	forged := natPkt{src: netip.MustParseAddr("10.244.1.99"), srcMAC: w.a.mac, dstMAC: w.a.hostMAC, dst: w.b.ip, proto: udpP, sport: 1, dport: 2}
	w.run(t, w.from, w.a.ifindex, forged.frame(), tcActShot, TernMetricMETRIC_DROP_SPOOFED)
	// B's address from A's veth: spoofed, although policy has state for B.
	asB := natPkt{src: w.b.ip, srcMAC: w.b.mac, dstMAC: w.a.hostMAC, dst: w.a.ip, proto: udpP, sport: 1, dport: 2}
	w.run(t, w.from, w.a.ifindex, asB.frame(), tcActShot, TernMetricMETRIC_DROP_SPOOFED)
	if ct := w.ctEntries(t); len(ct) != 0 {
		t.Errorf("spoofed packets left conntrack entries: %+v", ct)
	}
}

// TestPolicyLayoutMatchesBTF checks the C policy types and maps against
// compile's binary layouts (which Go writes the maps with) and constants.
func TestPolicyLayoutMatchesBTF(t *testing.T) {
	spec, err := LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	member := func(st *btf.Struct, name string) (off, size uint32) {
		t.Helper()
		for _, m := range st.Members {
			if m.Name == name {
				s, err := btf.Sizeof(m.Type)
				if err != nil {
					t.Fatal(err)
				}
				return m.Offset.Bytes(), uint32(s)
			}
		}
		t.Fatalf("struct %s has no member %s", st.Name, name)
		return 0, 0
	}
	structOf := func(name string) *btf.Struct {
		t.Helper()
		var st *btf.Struct
		if err := spec.Types.TypeByName(name, &st); err != nil {
			t.Fatalf("struct %s: %v", name, err)
		}
		return st
	}

	// struct policy_key: mark each field of a compile.PolicyKey with
	// distinct bytes and find them at the C member's offset.
	key := compile.PolicyKey{Dir: compile.Egress, Proto: 0x84, LocalID: 0x11223344, RemoteClass: 0x55667788, Port: 0x99aa, PortBits: 16}
	kb, err := key.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	pkSt := structOf("policy_key")
	if pkSt.Size != compile.PolicyKeySize || len(kb) != compile.PolicyKeySize {
		t.Errorf("policy_key: C %d bytes, compile %d (%d marshalled)", pkSt.Size, compile.PolicyKeySize, len(kb))
	}
	u32 := binary.NativeEndian.AppendUint32
	for _, f := range []struct {
		name string
		want []byte
	}{
		{"prefixlen", u32(nil, key.PrefixLen())},
		{"dir", []byte{byte(key.Dir)}},
		{"proto", []byte{key.Proto}},
		{"local_id", u32(nil, key.LocalID)},
		{"remote_class", u32(nil, key.RemoteClass)},
		{"dport", binary.BigEndian.AppendUint16(nil, key.Port)},
	} {
		off, size := member(pkSt, f.name)
		if int(size) != len(f.want) || int(off+size) > len(kb) || !bytes.Equal(kb[off:off+size], f.want) {
			t.Errorf("policy_key.%s at %d (%d bytes): compile writes %x there, want %x", f.name, off, size, kb[min(int(off), len(kb)):min(int(off+size), len(kb))], f.want)
		}
	}
	if got := reflect.TypeFor[TernPolicyKey]().Size(); got != compile.PolicyKeySize {
		t.Errorf("Go TernPolicyKey is %d bytes, want %d", got, compile.PolicyKeySize)
	}

	// struct ep_policy: compile.EndpointPolicy's encoding.
	ev, err := compile.EndpointPolicy{LocalID: 0x01020304, IngressIsolated: true, EgressIsolated: true}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	epSt := structOf("ep_policy")
	if off, size := member(epSt, "local_id"); epSt.Size != compile.EndpointValueSize || !bytes.Equal(ev[off:off+size], u32(nil, 0x01020304)) {
		t.Errorf("ep_policy: %d bytes, local_id at %d: compile has %x", epSt.Size, off, ev)
	}
	if off, size := member(epSt, "flags"); !bytes.Equal(ev[off:off+size], u32(nil, uint32(TernEpPolicyFlagsEP_POLICY_F_INGRESS|TernEpPolicyFlagsEP_POLICY_F_EGRESS))) {
		t.Errorf("ep_policy.flags: compile writes %x, C flags are %d|%d", ev[off:off+size], TernEpPolicyFlagsEP_POLICY_F_INGRESS, TernEpPolicyFlagsEP_POLICY_F_EGRESS)
	}
	if uint32(TernEpPolicyFlagsEP_POLICY_F_INGRESS) != compile.EndpointIngressBit || uint32(TernEpPolicyFlagsEP_POLICY_F_EGRESS) != compile.EndpointEgressBit {
		t.Errorf("ep_policy flags %d/%d, compile %d/%d", TernEpPolicyFlagsEP_POLICY_F_INGRESS, TernEpPolicyFlagsEP_POLICY_F_EGRESS, compile.EndpointIngressBit, compile.EndpointEgressBit)
	}

	// ipcache key: struct lpm_v4_key, as compile.IPCacheKey.
	ik, err := compile.IPCacheKey{PrefixLen: 24, Addr: [4]byte{203, 0, 113, 0}}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	lkSt := structOf("lpm_v4_key")
	if off, size := member(lkSt, "addr"); lkSt.Size != compile.IPCacheKeySize || !bytes.Equal(ik[off:off+size], []byte{203, 0, 113, 0}) {
		t.Errorf("lpm_v4_key: %d bytes, addr at %d; compile writes %x", lkSt.Size, off, ik)
	}
	if off, _ := member(lkSt, "prefixlen"); !bytes.Equal(ik[off:off+4], u32(nil, 24)) {
		t.Errorf("lpm_v4_key.prefixlen at %d; compile writes %x", off, ik)
	}

	// struct policy_value.
	pv, _ := compile.PolicyValue{Verdict: compile.VerdictAllow}.MarshalBinary()
	pvSt := structOf("policy_value")
	if off, _ := member(pvSt, "verdict"); pvSt.Size != compile.PolicyValueSize || pv[off] != byte(TernPolicyVerdictPOLICY_VERDICT_ALLOW) {
		t.Errorf("policy_value: %d bytes, verdict at %d; compile writes %x, C allow is %d", pvSt.Size, off, pv, TernPolicyVerdictPOLICY_VERDICT_ALLOW)
	}

	// Reserved values.
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"POLICY_CLASS_WORLD", uint64(TernPolicyClassPOLICY_CLASS_WORLD), uint64(compile.ClassWorld)},
		{"POLICY_CLASS_HOST", uint64(TernPolicyClassPOLICY_CLASS_HOST), uint64(compile.ClassHost)},
		{"POLICY_CLASS_ANY", uint64(TernPolicyClassPOLICY_CLASS_ANY), uint64(compile.ClassAny)},
		{"POLICY_DIR_INGRESS", uint64(TernPolicyDirPOLICY_DIR_INGRESS), uint64(compile.Ingress)},
		{"POLICY_DIR_EGRESS", uint64(TernPolicyDirPOLICY_DIR_EGRESS), uint64(compile.Egress)},
		{"POLICY_VERDICT_ALLOW", uint64(TernPolicyVerdictPOLICY_VERDICT_ALLOW), uint64(compile.VerdictAllow)},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, compile has %d", c.name, c.got, c.want)
		}
	}

	// The maps: types, sizes, what the brief and the compiler need.
	for _, want := range []struct {
		name              string
		typ               ebpf.MapType
		key, value, flags uint32
		minEntries        uint32
	}{
		{TernMapTernEpPolicy, ebpf.Hash, compile.EndpointKeySize, compile.EndpointValueSize, 0, 65536},
		{TernMapTernIpcache, ebpf.LPMTrie, compile.IPCacheKeySize, compile.IPCacheValueSize, unix.BPF_F_NO_PREALLOC, 65536},
		{TernMapTernPolicy, ebpf.LPMTrie, compile.PolicyKeySize, compile.PolicyValueSize, unix.BPF_F_NO_PREALLOC, 262144},
		{TernMapTernPolicyCt, ebpf.LRUHash, uint32(unsafe.Sizeof(TernPolicyCtKey{})), uint32(unsafe.Sizeof(TernPolicyCtEntry{})), 0, 65536},
		{TernMapTernPolicyFrag, ebpf.LRUHash, uint32(unsafe.Sizeof(TernPolicyFragKey{})), uint32(unsafe.Sizeof(TernPolicyFragPorts{})), 0, 1024},
	} {
		ms, ok := spec.Maps[want.name]
		if !ok {
			t.Errorf("map %s missing", want.name)
			continue
		}
		if ms.Type != want.typ || ms.KeySize != want.key || ms.ValueSize != want.value || ms.Flags != want.flags || ms.MaxEntries < want.minEntries {
			t.Errorf("map %s: %s key %d value %d flags %#x max %d; want %s key %d value %d flags %#x max >= %d",
				want.name, ms.Type, ms.KeySize, ms.ValueSize, ms.Flags, ms.MaxEntries,
				want.typ, want.key, want.value, want.flags, want.minEntries)
		}
		if ms.Pinning != ebpf.PinByName {
			t.Errorf("map %s is not pinned by name", want.name)
		}
	}
	for _, s := range []struct {
		c      string
		goType reflect.Type
	}{
		{"ep_policy", reflect.TypeFor[TernEpPolicy]()},
		{"policy_ct_key", reflect.TypeFor[TernPolicyCtKey]()},
		{"policy_ct_entry", reflect.TypeFor[TernPolicyCtEntry]()},
		{"policy_frag_key", reflect.TypeFor[TernPolicyFragKey]()},
		{"policy_frag_ports", reflect.TypeFor[TernPolicyFragPorts]()},
		{"policy_value", reflect.TypeFor[TernPolicyValue]()},
		{"policy_key", reflect.TypeFor[TernPolicyKey]()},
	} {
		if st := structOf(s.c); uintptr(st.Size) != s.goType.Size() {
			t.Errorf("struct %s: C %d bytes, Go %s %d", s.c, st.Size, s.goType, s.goType.Size())
		}
	}
}

// policyTopo builds a topology: local pods and remote pods by IP
// ({namespace, name}), and host addresses.
func policyTopo(local, remote map[string][2]string, hosts ...string) *policy.Topology {
	topo := &policy.Topology{Endpoints: map[string]policy.Endpoint{}}
	for ip, p := range local {
		topo.Endpoints[ip] = policy.Endpoint{Namespace: p[0], Name: p[1], Local: true}
	}
	for ip, p := range remote {
		topo.Endpoints[ip] = policy.Endpoint{Namespace: p[0], Name: p[1]}
	}
	for _, h := range hosts {
		topo.Hosts = append(topo.Hosts, net.ParseIP(h).To4())
	}
	return topo
}

func policyPacket(src, dst netip.Addr, proto uint8, port uint16) policy.Packet {
	return policy.Packet{SrcIP: src.AsSlice(), DstIP: dst.AsSlice(), Proto: proto, DstPort: port}
}

// TestPolicySNATReplies: a pod isolated both ways, whose egress allows TCP
// 80 to the world. Its masqueraded connection leaves through tern_from_pod
// (egress decided there), and the reply, which tern_from_uplink translates
// and redirects into the pod (never passing tern_to_pod), arrives although
// the pod's ingress allows nothing (new connections from outside reach the
// pod through the host stack and tern_to_pod, see TestPolicyConntrack).
func TestPolicySNATReplies(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	rs := &compile.RuleSet{
		Endpoints: map[string]compile.EndpointPolicy{w.a.ip.String(): {LocalID: 1, IngressIsolated: true, EgressIsolated: true}},
		Policy: []compile.PolicyEntry{{Key: compile.PolicyKey{Dir: compile.Egress, Proto: unix.IPPROTO_TCP, LocalID: 1,
			RemoteClass: compile.ClassWorld, Port: 80, PortBits: 16}, Verdict: compile.VerdictAllow}},
	}
	writeRuleSet(t, w.maps, rs)

	if v, _ := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 40000, dport: 443, tcpFlags: natTCPSyn}); v != natActShot {
		t.Errorf("TCP 443 out: verdict %d, want dropped by egress policy", v)
	}
	v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 40000, dport: 80, tcpFlags: natTCPSyn})
	if v != natActRedirect {
		t.Fatalf("TCP 80 out: verdict %d, want masqueraded out of the uplink; metrics %v", v, w.metrics(t))
	}
	o := natParse(t, out)
	v, _ = w.fromUplinkRun(t, natPkt{src: natServer, proto: unix.IPPROTO_TCP, sport: 80, dport: o.sport, tcpFlags: natTCPSyn | natTCPAck})
	if v != natActRedirect {
		t.Errorf("reply: verdict %d, want redirected into the pod; metrics %v", v, w.metrics(t))
	}
	if m := w.metrics(t); m[TernMetricMETRIC_REV_SNAT] != 1 || m[TernMetricMETRIC_DROP_POLICY_EGRESS] != 1 || m[TernMetricMETRIC_DROP_POLICY_INGRESS] != 0 {
		t.Errorf("metrics %v: want one reverse-NATed reply, one egress drop, no ingress drop", m)
	}
	// The pod's next segment rides on the conntrack entry of its flow.
	if v, _ := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 40000, dport: 80, tcpFlags: natTCPAck}); v != natActRedirect {
		t.Errorf("TCP 80 ACK out: verdict %d", v)
	}
}

// TestPolicyEstablishedBeforePolicy: a TCP connection and a UDP flow set up
// while neither pod had policy state go on, both ways, once a policy that
// denies new such flows isolates both pods (the node's first policy); a new
// flow is denied. Without tracking before any policy, B's next segment
// would be decided as a new flow and dropped.
func TestPolicyEstablishedBeforePolicy(t *testing.T) {
	w := newPolTest(t)
	resetMaps(t, w.objs, w.a, w.b) // endpoints only: no policy state
	redirect, shot := uint32(tcActRedirect), uint32(tcActShot)
	peer := TernMetricMETRIC_REDIRECT_PEER
	aToB := func(proto, flags uint8) []byte {
		return w.fromA(natPkt{dst: w.b.ip, proto: proto, sport: 40001, dport: 80, tcpFlags: flags}).frame()
	}
	bToA := func(proto, flags uint8) []byte {
		return w.fromB(natPkt{dst: w.a.ip, proto: proto, sport: 80, dport: 40001, tcpFlags: flags}).frame()
	}
	w.run(t, w.from, w.a.ifindex, aToB(tcp, natTCPSyn), redirect, peer)
	w.run(t, w.from, w.b.ifindex, bToA(tcp, natTCPSyn|natTCPAck), redirect, peer)
	w.run(t, w.from, w.a.ifindex, aToB(tcp, natTCPAck), redirect, peer)
	w.run(t, w.from, w.a.ifindex, aToB(udpP, 0), redirect, peer)

	// The first policy: both pods isolated both ways, nothing allowed.
	rs := polRuleSet(true, true)
	rs.Endpoints["10.244.1.2"] = compile.EndpointPolicy{LocalID: polIDA, IngressIsolated: true, EgressIsolated: true}
	rs.Endpoints["10.244.1.3"] = compile.EndpointPolicy{LocalID: polIDB, IngressIsolated: true, EgressIsolated: true}
	writeRuleSet(t, w.objs.maps, rs)

	w.run(t, w.from, w.b.ifindex, bToA(tcp, natTCPAck), redirect, peer)
	w.run(t, w.from, w.a.ifindex, aToB(tcp, natTCPAck), redirect, peer)
	w.run(t, w.from, w.b.ifindex, bToA(udpP, 0), redirect, peer)
	w.run(t, w.from, w.a.ifindex, aToB(udpP, 0), redirect, peer)
	newFlow := w.fromA(natPkt{dst: w.b.ip, proto: tcp, sport: 40002, dport: 80, tcpFlags: natTCPSyn}).frame()
	w.run(t, w.from, w.a.ifindex, newFlow, shot, TernMetricMETRIC_DROP_POLICY_EGRESS)
}

// TestPolicyConntrackUDPSpray: TCP flows have their own conntrack map, so
// a pod opening many more UDP flows than the map holds cannot evict another
// pod's TCP connection (which an isolating policy would then cut). The
// maps are shrunk to 256 entries to keep the spray short.
func TestPolicyConntrackUDPSpray(t *testing.T) {
	const size = 256
	w := newPolTestWith(t, func(spec *ebpf.CollectionSpec) {
		for _, name := range []string{TernMapTernPolicyCt, TernMapTernPolicyCtOther} {
			if m := spec.Maps[name]; m != nil {
				m.MaxEntries = size
			}
		}
	})
	resetMaps(t, w.objs, w.a, w.b)
	redirect, shot := uint32(tcActRedirect), uint32(tcActShot)
	peer := TernMetricMETRIC_REDIRECT_PEER
	// B's connection to A, established.
	w.run(t, w.from, w.b.ifindex, w.fromB(natPkt{dst: w.a.ip, proto: tcp, sport: 50000, dport: 80, tcpFlags: natTCPSyn}).frame(), redirect, peer)
	w.run(t, w.from, w.a.ifindex, w.fromA(natPkt{dst: w.b.ip, proto: tcp, sport: 80, dport: 50000, tcpFlags: natTCPSyn | natTCPAck}).frame(), redirect, peer)
	// A sprays 8 x size UDP flows to the world, two packets each (the
	// second marks the entry referenced, as the LRU's own flows are).
	spray := w.fromA(natPkt{dst: polWorld, proto: udpP, sport: 1, dport: 53})
	for i := range 8 * size {
		spray.sport = uint16(1024 + i)
		for range 2 {
			if _, _, err := runFromPod(w.ns, w.from, w.a.ifindex, spray.frame()); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n := len(w.ctEntries(t)); n < size/2 {
		t.Fatalf("conntrack holds %d entries after the spray: the spray did not fill the UDP map", n)
	}
	tcpKey := TernPolicyCtKey{LoAddr: endpointKey(w.a.ip), HiAddr: endpointKey(w.b.ip), LoPort: natPort(80), HiPort: natPort(50000), Proto: tcp}
	if _, found := w.ctEntries(t)[tcpKey]; !found {
		t.Errorf("B's TCP connection is no longer tracked after A's UDP spray")
	}
	// A policy isolating A for ingress: B's connection goes on.
	rs := polRuleSet(false, false)
	rs.Endpoints["10.244.1.2"] = compile.EndpointPolicy{LocalID: polIDA, IngressIsolated: true}
	writeRuleSet(t, w.objs.maps, rs)
	w.run(t, w.from, w.b.ifindex, w.fromB(natPkt{dst: w.a.ip, proto: tcp, sport: 50000, dport: 80, tcpFlags: natTCPAck}).frame(), redirect, peer)
	newFlow := w.fromB(natPkt{dst: w.a.ip, proto: tcp, sport: 50001, dport: 80, tcpFlags: natTCPSyn}).frame()
	w.run(t, w.from, w.b.ifindex, newFlow, shot, TernMetricMETRIC_DROP_POLICY_INGRESS)
}

// TestPolicyRSTWindow: an RST ends a tracked TCP flow only when its
// sequence number is within POLICY_CT_RST_WINDOW (1 MiB) of its sender's
// last one (a right acknowledgment does not make up for a wrong sequence),
// or, for an RST answering a SYN, its acknowledgment matches the SYN's: a forged RST is dropped, counted, and leaves the flow established.
func TestPolicyRSTWindow(t *testing.T) {
	w := newPolTest(t)
	ing, egr := compile.Ingress, compile.Egress
	rs := polRuleSet(true, true, pk(egr, tcp, polIDA, polClassB, 80, 16), pk(ing, tcp, polIDB, polClassA, 80, 16))
	redirect, shot := uint32(tcActRedirect), uint32(tcActShot)
	peer, dropRST := TernMetricMETRIC_REDIRECT_PEER, TernMetricMETRIC_DROP_POLICY_RST
	rstFlag := uint16(TernPolicyCtFlagsPOLICY_CT_F_RST)
	aToB := func(sport uint16, flags uint8, seq, ack uint32) []byte {
		return w.fromA(natPkt{dst: w.b.ip, proto: tcp, sport: sport, dport: 80, tcpFlags: flags, tcpSeq: seq, tcpAck: ack}).frame()
	}
	bToA := func(dport uint16, flags uint8, seq, ack uint32) []byte {
		return w.fromB(natPkt{dst: w.a.ip, proto: tcp, sport: 80, dport: dport, tcpFlags: flags, tcpSeq: seq, tcpAck: ack}).frame()
	}
	key := func(sport uint16) TernPolicyCtKey {
		return TernPolicyCtKey{LoAddr: endpointKey(w.a.ip), HiAddr: endpointKey(w.b.ip), LoPort: natPort(sport), HiPort: natPort(80), Proto: tcp}
	}
	established := func(sport uint16) {
		t.Helper()
		w.run(t, w.from, w.a.ifindex, aToB(sport, natTCPSyn, 0x10000000, 0), redirect, peer)
		w.run(t, w.from, w.b.ifindex, bToA(sport, natTCPSyn|natTCPAck, 0x80000000, 0x10000001), redirect, peer)
		w.run(t, w.from, w.a.ifindex, aToB(sport, natTCPAck, 0x10000001, 0x80000001), redirect, peer)
	}
	w.install(t, rs)

	// Out of window from either end: dropped, the flow stays open.
	established(40001)
	w.run(t, w.from, w.a.ifindex, aToB(40001, natTCPRst, 0x10000001+4<<20, 0), shot, dropRST)
	w.run(t, w.from, w.b.ifindex, bToA(40001, natTCPRst|natTCPAck, 0x80000001-4<<20, 0x10000001), shot, dropRST)
	if e := w.ctEntries(t)[key(40001)]; e.Flags&rstFlag != 0 {
		t.Errorf("flags after forged RSTs %#x: RST set", e.Flags)
	}
	w.run(t, w.from, w.b.ifindex, bToA(40001, natTCPAck, 0x80000001, 0x10000001), redirect, peer)

	// In window (a little ahead of the last segment seen): passes, ends
	// the flow.
	w.run(t, w.from, w.b.ifindex, bToA(40001, natTCPRst, 0x80000001+300000, 0), redirect, peer)
	if e := w.ctEntries(t)[key(40001)]; e.Flags&rstFlag == 0 {
		t.Errorf("flags after an in-window RST %#x: RST not set", e.Flags)
	}

	// An RST answering a SYN (the responder never sent anything): passes
	// when it acknowledges the SYN, is dropped when its ACK is elsewhere.
	// (An RST without ACK from a responder that never sent anything
	// answers a segment that carried an ACK, whose number the entry does
	// not keep: it passes, see the mid-stream case below.)
	w.run(t, w.from, w.a.ifindex, aToB(40002, natTCPSyn, 0x20000000, 0), redirect, peer)
	w.run(t, w.from, w.b.ifindex, bToA(40002, natTCPRst|natTCPAck, 0, 0x20000000+64<<20), shot, dropRST)
	w.run(t, w.from, w.b.ifindex, bToA(40002, natTCPRst|natTCPAck, 0, 0x20000001), redirect, peer)
	if e := w.ctEntries(t)[key(40002)]; e.Flags&rstFlag == 0 {
		t.Errorf("flags after the RST answering the SYN %#x: RST not set", e.Flags)
	}

	// A flow first seen mid-stream (a Service backend removed, the
	// client's next segment balanced to another backend that knows
	// nothing of it) is refused by an RST without ACK from a peer that
	// never sent anything: it must reach the client, or the client waits
	// on a flow that is gone (a black hole instead of a reset).
	w.run(t, w.from, w.a.ifindex, aToB(40003, natTCPAck, 0x30000000, 0x50000000), redirect, peer)
	w.run(t, w.from, w.b.ifindex, bToA(40003, natTCPRst, 0x50000000, 0), redirect, peer)
}

// TestPolicyConntrackPodShare: a local pod opens at most
// policy_ct_pod_flows new flows of each kind per minute (64 here): beyond,
// its new flows are dropped and counted, while its tracked flows, its TCP
// flows (a share of their own) and another pod's flows go on; the next
// period it may open flows again.
func TestPolicyConntrackPodShare(t *testing.T) {
	const limit = 64
	w := newPolTestWith(t, func(spec *ebpf.CollectionSpec) {
		if err := spec.Variables["policy_ct_pod_flows"].Set(uint32(limit)); err != nil {
			t.Fatal(err)
		}
	})
	resetMaps(t, w.objs, w.a, w.b)
	ok, shot := uint32(tcActOK), uint32(tcActShot)
	host, quota := TernMetricMETRIC_PASS_HOST, TernMetricMETRIC_DROP_POLICY_CT_QUOTA
	udpFrom := func(p pod, sport uint16) []byte {
		return natPkt{src: p.ip, dst: polWorld, srcMAC: p.mac, dstMAC: p.hostMAC, proto: udpP, sport: sport, dport: 53}.frame()
	}
	for i := range limit {
		w.run(t, w.from, w.a.ifindex, udpFrom(w.a, uint16(1024+i)), ok, host)
	}
	w.run(t, w.from, w.a.ifindex, udpFrom(w.a, 2000), shot, quota)
	w.run(t, w.from, w.a.ifindex, udpFrom(w.a, 1024), ok, host) // tracked: not a new flow
	w.run(t, w.from, w.b.ifindex, udpFrom(w.b, 2000), ok, host) // B's own share
	syn := w.fromA(natPkt{dst: polWorld, proto: tcp, sport: 3000, dport: 443, tcpFlags: natTCPSyn}).frame()
	w.run(t, w.from, w.a.ifindex, syn, ok, host) // TCP: a share of its own
	if n := len(w.ctEntries(t)); n != limit+2 {
		t.Errorf("conntrack holds %d entries, want %d", n, limit+2)
	}

	// The next period.
	var q TernPolicyCtQuota
	qm := w.objs.maps[TernMapTernPolicyCtQuota]
	if err := qm.Lookup(endpointKey(w.a.ip), &q); err != nil {
		t.Fatal(err)
	}
	if q.Other != limit || q.Tcp != 1 {
		t.Errorf("A's quota %+v, want %d other, 1 tcp", q, limit)
	}
	q.PeriodStart = natMonoNow(t) - uint64(61*time.Second)
	if err := qm.Put(endpointKey(w.a.ip), q); err != nil {
		t.Fatal(err)
	}
	w.run(t, w.from, w.a.ifindex, udpFrom(w.a, 2000), ok, host)
}
