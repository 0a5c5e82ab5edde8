package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// SNAT tests: tern_from_pod and tern_from_uplink run through
// BPF_PROG_TEST_RUN on crafted frames, inside a namespace that looks like a
// node to bpf_fib_lookup: pod host veths, an uplink veth with the node IP
// and a default route via a gateway on it, ip_forward on. The two objects
// are loaded unpinned and share their maps as the loader makes them do.
//
// Every name here starts with nat so that it cannot clash with the other
// program tests of this package.

const (
	natActOK       = 0xffffffff // TERN_PASS: TC_ACT_UNSPEC, TCX_NEXT (not TC_ACT_OK)
	natActShot     = 2          // TC_ACT_SHOT
	natActRedirect = 7          // TC_ACT_REDIRECT (bpf_redirect_peer / _neigh)

	natPortLo = 61000 // the objects' default NAT port range
	natPortHi = 65535
)

var (
	natNodeIP   = netip.MustParseAddr("192.0.2.1") // on the uplink
	natGateway  = netip.MustParseAddr("192.0.2.2") // default route
	natServer   = netip.MustParseAddr("203.0.113.10")
	natServer2  = netip.MustParseAddr("203.0.113.11")
	natCluster  = netip.MustParsePrefix("10.244.0.0/16")
	natNoMasq   = netip.MustParsePrefix("198.51.100.0/24")
	natOtherPod = netip.MustParseAddr("10.244.2.5") // in the cluster, another node
)

// natSkb is the head of struct __sk_buff up to ifindex: ctx_in for
// BPF_PROG_TEST_RUN, which honours ifindex (looked up in the calling
// thread's namespace) and wants the other fields here zero.
type natSkb struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

// natEP is a pod: its host veth (where tern_from_pod runs) and its address.
type natEP struct {
	ip      netip.Addr
	ifindex int
	mac     net.HardwareAddr // pod side
	hostMAC net.HardwareAddr
	masq    bool
}

func (e natEP) value() TernEndpoint {
	v := TernEndpoint{Ifindex: uint32(e.ifindex)}
	copy(v.PodMac[:], e.mac)
	copy(v.HostMac[:], e.hostMAC)
	if e.masq {
		v.Flags = uint32(TernEndpointFlagsENDPOINT_F_MASQ)
	}
	return v
}

// natWorld is the node namespace with the loaded programs.
type natWorld struct {
	ns         ns.NetNS
	a, b, c    natEP // a and b masquerade, c does not (ipMasq off)
	uplink     int
	uplinkMAC  net.HardwareAddr
	fromPod    *ebpf.Program
	fromUplink *ebpf.Program
	toUplink   *ebpf.Program
	toPod      *ebpf.Program
	gc         *ebpf.Program
	maps       map[string]*ebpf.Map
}

// natOptions change the objects before load.
type natOptions struct {
	portMin, portMax uint32
	// plainHash turns these LRU maps into plain hashes of maxEntries, so a
	// test can fill them: an LRU map evicts instead of refusing.
	plainHash  []string
	maxEntries uint32
	// natEntries, when set, sizes both NAT maps (keeping their type).
	natEntries uint32
	// gcInterval, when set, is the NAT garbage collector's period (s).
	gcInterval uint32
}

func newNATWorld(t testing.TB, opt natOptions) *natWorld {
	t.Helper()
	testutil.RequirePrivileged(t)
	w := &natWorld{ns: testutil.NewNetNS(t, "snatt")}
	err := w.ns.Do(func(ns.NetNS) error {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
			return err
		}
		for i, ep := range []*natEP{&w.a, &w.b, &w.c} {
			host, peer := fmt.Sprintf("nh%d", i), fmt.Sprintf("np%d", i)
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host}, PeerName: peer}); err != nil {
				return fmt.Errorf("add veth %s: %w", host, err)
			}
			hl, err := netlink.LinkByName(host)
			if err != nil {
				return err
			}
			pl, err := netlink.LinkByName(peer)
			if err != nil {
				return err
			}
			for _, l := range []netlink.Link{hl, pl} {
				if err := netlink.LinkSetUp(l); err != nil {
					return err
				}
			}
			*ep = natEP{
				ip:      netip.AddrFrom4([4]byte{10, 244, 1, byte(2 + i)}),
				ifindex: hl.Attrs().Index,
				mac:     pl.Attrs().HardwareAddr,
				hostMAC: hl.Attrs().HardwareAddr,
				masq:    i < 2,
			}
		}
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "nup"}, PeerName: "nupp"}); err != nil {
			return fmt.Errorf("add uplink veth: %w", err)
		}
		up, err := netlink.LinkByName("nup")
		if err != nil {
			return err
		}
		upp, err := netlink.LinkByName("nupp")
		if err != nil {
			return err
		}
		for _, l := range []netlink.Link{up, upp} {
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		w.uplink, w.uplinkMAC = up.Attrs().Index, up.Attrs().HardwareAddr
		addr, _ := netlink.ParseAddr(natNodeIP.String() + "/24")
		if err := netlink.AddrAdd(up, addr); err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{Gw: natGateway.AsSlice(), LinkIndex: w.uplink})
	})
	if err != nil {
		t.Fatal(err)
	}
	w.load(t, opt)
	w.reset(t)
	return w
}

func (w *natWorld) load(t testing.TB, opt natOptions) {
	t.Helper()
	pod, err := LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	uplink, err := LoadTernUplink()
	if err != nil {
		t.Fatal(err)
	}
	for _, spec := range []*ebpf.CollectionSpec{pod, uplink} {
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
		if opt.natEntries != 0 {
			spec.Maps[TernMapTernNat].MaxEntries = opt.natEntries
			spec.Maps[TernMapTernNatRev].MaxEntries = opt.natEntries
		}
		if opt.gcInterval != 0 {
			if v, ok := spec.Variables[TernVarNatGcInterval]; ok {
				if err := v.Set(opt.gcInterval); err != nil {
					t.Fatal(err)
				}
			}
		}
		for _, name := range opt.plainHash {
			spec.Maps[name].Type = ebpf.Hash
			spec.Maps[name].MaxEntries = opt.maxEntries
		}
		if opt.portMin != 0 {
			if err := spec.Variables[TernVarNatPortMin].Set(opt.portMin); err != nil {
				t.Fatal(err)
			}
			if err := spec.Variables[TernVarNatPortMax].Set(opt.portMax); err != nil {
				t.Fatal(err)
			}
		}
	}
	podColl, err := ebpf.NewCollection(pod)
	if err != nil {
		t.Fatalf("load %+v", err)
	}
	t.Cleanup(podColl.Close)
	// The named maps are shared, as pinning by name shares them on a
	// node; data sections (.rodata) stay each object's own.
	repl := map[string]*ebpf.Map{}
	for name := range uplink.Maps {
		if m, ok := podColl.Maps[name]; ok && name[0] != '.' {
			repl[name] = m
		}
	}
	upColl, err := ebpf.NewCollectionWithOptions(uplink, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		t.Fatalf("load %+v", err)
	}
	t.Cleanup(upColl.Close)
	w.fromPod = podColl.Programs[TernProgTernFromPod]
	w.fromUplink = upColl.Programs[TernUplinkProgTernFromUplink]
	w.toUplink = upColl.Programs[TernUplinkProgTernToUplink]
	w.toPod = podColl.Programs[TernProgTernToPod]
	w.gc = podColl.Programs[TernProgTernNatGc]
	w.maps = podColl.Maps
}

// reset empties the NAT maps and metrics and writes the node's config:
// the three endpoints, the node IP and uplink, the no-masquerade CIDRs.
func (w *natWorld) reset(t testing.TB) {
	t.Helper()
	for _, name := range []string{TernMapTernNat, TernMapTernNatRev, TernMapTernEndpoints, TernMapTernNomasq} {
		m := w.maps[name]
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
	zero := make([]TernMetricValue, ebpf.MustPossibleCPU())
	for i := range TernMetricMETRIC_MAX {
		if err := w.maps[TernMapTernMetrics].Put(uint32(i), zero); err != nil {
			t.Fatal(err)
		}
	}
	for _, ep := range []natEP{w.a, w.b, w.c} {
		if err := w.maps[TernMapTernEndpoints].Put(natAddr(ep.ip), ep.value()); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []netip.Prefix{natCluster, natNoMasq} {
		k := TernLpmV4Key{Prefixlen: uint32(p.Bits()), Addr: natAddr(p.Addr())}
		if err := w.maps[TernMapTernNomasq].Put(k, uint8(1)); err != nil {
			t.Fatal(err)
		}
	}
	w.setConfig(t, TernNodeConfig{NodeIp: natAddr(natNodeIP), UplinkIfindex: uint32(w.uplink)})
}

func (w *natWorld) setConfig(t testing.TB, c TernNodeConfig) {
	t.Helper()
	if err := w.maps[TernMapTernConfig].Put(uint32(0), c); err != nil {
		t.Fatal(err)
	}
}

// run runs prog on frame as received on ifindex, from inside the world.
func (w *natWorld) run(t testing.TB, prog *ebpf.Program, ifindex int, frame []byte) (uint32, []byte) {
	t.Helper()
	var (
		verdict uint32
		out     = make([]byte, len(frame)+256)
		ctxOut  = make([]byte, 512)
	)
	err := w.ns.Do(func(ns.NetNS) error {
		opts := &ebpf.RunOptions{Data: frame, DataOut: out, Context: natSkb{Ifindex: uint32(ifindex)}, ContextOut: ctxOut}
		var err error
		verdict, err = prog.Run(opts)
		out = opts.DataOut
		return err
	})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	return verdict, out
}

// fromPod runs tern_from_pod on a frame ep sends.
func (w *natWorld) fromPodRun(t *testing.T, ep natEP, p natPkt) (uint32, []byte) {
	t.Helper()
	p.srcMAC, p.dstMAC = ep.mac, ep.hostMAC
	if !p.src.IsValid() {
		p.src = ep.ip
	}
	return w.run(t, w.fromPod, ep.ifindex, p.frame())
}

// fromUplinkRun runs tern_from_uplink on a frame the gateway sends the node.
func (w *natWorld) fromUplinkRun(t *testing.T, p natPkt) (uint32, []byte) {
	t.Helper()
	p.srcMAC, p.dstMAC = net.HardwareAddr{2, 0, 0, 0, 0, 2}, w.uplinkMAC
	if !p.dst.IsValid() {
		p.dst = natNodeIP
	}
	return w.run(t, w.fromUplink, w.uplink, p.frame())
}

func (w *natWorld) metrics(t testing.TB) map[TernMetric]uint64 {
	t.Helper()
	out := map[TernMetric]uint64{}
	for i := range TernMetricMETRIC_MAX {
		var per []TernMetricValue
		if err := w.maps[TernMapTernMetrics].Lookup(uint32(i), &per); err != nil {
			t.Fatal(err)
		}
		for _, v := range per {
			if v.Packets != 0 {
				out[i] += v.Packets
			}
		}
	}
	return out
}

// wantMetrics checks that exactly the metrics in want moved, by that much.
func (w *natWorld) wantMetrics(t *testing.T, want map[TernMetric]uint64) {
	t.Helper()
	got := w.metrics(t)
	for m := range TernMetricMETRIC_MAX {
		if got[m] != want[m] {
			t.Errorf("metric %d: %d packets, want %d (all: %v)", m, got[m], want[m], got)
		}
	}
}

func (w *natWorld) count(t testing.TB, name string) int {
	t.Helper()
	var (
		k, v []byte
		n    int
	)
	it := w.maps[name].Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// --- addresses and ports as the maps hold them (network order bytes read
// as native integers) ---

func natAddr(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func natPort(p uint16) uint16 {
	return binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, p))
}

func natTuple(src netip.Addr, sport uint16, dst netip.Addr, dport uint16, proto uint8) TernNatTuple {
	return TernNatTuple{Saddr: natAddr(src), Daddr: natAddr(dst), Sport: natPort(sport), Dport: natPort(dport), Proto: proto}
}

// --- packets ---

// natPkt describes an Ethernet/IPv4 frame; frame() fills in lengths and
// valid checksums (RFC 1071, TCP/UDP over the pseudo header).
type natPkt struct {
	srcMAC, dstMAC net.HardwareAddr
	src, dst       netip.Addr
	ttl            uint8 // 0 means 64
	proto          uint8
	frag           uint16 // flags and fragment offset; 0 means DF
	noDF           bool   // with frag 0: no flags at all
	sport, dport   uint16 // TCP, UDP
	tcpFlags       uint8
	tcpSeq, tcpAck uint32 // TCP sequence (0 means 1000) and acknowledgment numbers
	icmpType       uint8
	icmpID         uint16
	udpNoCsum      bool   // UDP checksum 0 ("none")
	l4             []byte // raw L4 bytes, used as they are when set
	payload        []byte
}

const (
	natTCPSyn = 0x02
	natTCPAck = 0x10
	natTCPFin = 0x01
	natTCPRst = 0x04
)

func (p natPkt) frame() []byte {
	l4 := p.l4
	if l4 == nil {
		l4 = p.segment()
	}
	ip := make([]byte, 20, 20+len(l4))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
	binary.BigEndian.PutUint16(ip[4:], 0x2345)
	frag := p.frag
	if frag == 0 && !p.noDF {
		frag = 0x4000
	}
	binary.BigEndian.PutUint16(ip[6:], frag)
	ip[8] = p.ttl
	if ip[8] == 0 {
		ip[8] = 64
	}
	ip[9] = p.proto
	s, d := p.src.As4(), p.dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], natCsum(ip))
	ip = append(ip, l4...)
	f := append(append(append([]byte{}, p.dstMAC...), p.srcMAC...), 0x08, 0x00)
	return append(f, ip...)
}

func (p natPkt) segment() []byte {
	var b []byte
	switch p.proto {
	case unix.IPPROTO_TCP:
		b = binary.BigEndian.AppendUint16(nil, p.sport)
		b = binary.BigEndian.AppendUint16(b, p.dport)
		seq := p.tcpSeq
		if seq == 0 {
			seq = 1000
		}
		b = binary.BigEndian.AppendUint32(b, seq)
		b = binary.BigEndian.AppendUint32(b, p.tcpAck)
		b = append(b, 5<<4, p.tcpFlags)
		b = binary.BigEndian.AppendUint16(b, 65535) // window
		b = append(b, 0, 0, 0, 0)                   // checksum, urgent
		b = append(b, p.payload...)
		binary.BigEndian.PutUint16(b[16:], natCsum(natPseudo(p.src, p.dst, p.proto, len(b)), b))
	case unix.IPPROTO_UDP:
		b = binary.BigEndian.AppendUint16(nil, p.sport)
		b = binary.BigEndian.AppendUint16(b, p.dport)
		b = binary.BigEndian.AppendUint16(b, uint16(8+len(p.payload)))
		b = append(b, 0, 0)
		b = append(b, p.payload...)
		if !p.udpNoCsum {
			c := natCsum(natPseudo(p.src, p.dst, p.proto, len(b)), b)
			if c == 0 {
				c = 0xffff
			}
			binary.BigEndian.PutUint16(b[6:], c)
		}
	case unix.IPPROTO_ICMP:
		b = []byte{p.icmpType, 0, 0, 0}
		b = binary.BigEndian.AppendUint16(b, p.icmpID)
		b = binary.BigEndian.AppendUint16(b, 1) // sequence
		b = append(b, p.payload...)
		binary.BigEndian.PutUint16(b[2:], natCsum(b))
	default:
		b = append(b, p.payload...)
	}
	return b
}

func natPseudo(src, dst netip.Addr, proto uint8, n int) []byte {
	s, d := src.As4(), dst.As4()
	b := append(append([]byte{}, s[:]...), d[:]...)
	b = append(b, 0, proto)
	return binary.BigEndian.AppendUint16(b, uint16(n))
}

// natCsum is the Internet checksum over the concatenation of parts (each
// of even length but the last).
func natCsum(parts ...[]byte) uint16 {
	var sum uint32
	for _, b := range parts {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// natParsed is what the tests read back from a frame.
type natParsed struct {
	src, dst     netip.Addr
	ttl          uint8
	sport, dport uint16
	icmpID       uint16
	l4csum       uint16
	dstMAC       net.HardwareAddr
	srcMAC       net.HardwareAddr
	payload      []byte
}

// natParse parses frame and verifies its IPv4 header checksum and its L4
// checksum (TCP, UDP unless 0, ICMP), independently of the program.
func natParse(t *testing.T, frame []byte) natParsed {
	t.Helper()
	ip := frame[14:]
	hl := int(ip[0]&0x0f) * 4
	tot := int(binary.BigEndian.Uint16(ip[2:]))
	if tot > len(ip) {
		t.Fatalf("IPv4 total length %d > %d bytes of frame", tot, len(ip))
	}
	ip = ip[:tot]
	if natCsum(ip[:hl]) != 0 {
		t.Errorf("IPv4 header checksum %#04x is wrong", binary.BigEndian.Uint16(ip[10:]))
	}
	p := natParsed{
		src:    netip.AddrFrom4([4]byte(ip[12:16])),
		dst:    netip.AddrFrom4([4]byte(ip[16:20])),
		ttl:    ip[8],
		dstMAC: net.HardwareAddr(frame[0:6]),
		srcMAC: net.HardwareAddr(frame[6:12]),
	}
	l4 := ip[hl:]
	switch ip[9] {
	case unix.IPPROTO_TCP, unix.IPPROTO_UDP:
		p.sport, p.dport = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		off, hdr := 16, 20
		if ip[9] == unix.IPPROTO_UDP {
			off, hdr = 6, 8
		}
		p.l4csum = binary.BigEndian.Uint16(l4[off:])
		p.payload = l4[hdr:]
		if ip[9] == unix.IPPROTO_UDP && p.l4csum == 0 {
			break // no checksum
		}
		if natCsum(natPseudo(p.src, p.dst, ip[9], len(l4)), l4) != 0 {
			t.Errorf("L4 checksum %#04x is wrong", p.l4csum)
		}
	case unix.IPPROTO_ICMP:
		p.icmpID = binary.BigEndian.Uint16(l4[4:])
		p.l4csum = binary.BigEndian.Uint16(l4[2:])
		p.payload = l4[8:]
		if natCsum(l4) != 0 {
			t.Errorf("ICMP checksum %#04x is wrong", p.l4csum)
		}
	}
	return p
}

func natMonoNow(t *testing.T) uint64 {
	t.Helper()
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return uint64(ts.Nano())
}

// TestSNATRoundTrip: a pod's TCP, UDP (with and without checksum) and ICMP
// echo to a server leave with the node IP and a NAT port, checksums valid,
// and the server's reply comes back to the pod's address and port.
func TestSNATRoundTrip(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	payload := []byte("tern snat payload, odd length.")
	cases := []struct {
		name string
		out  natPkt // built by natPkt.frame: pod a -> natServer
		back func(natParsed) natPkt
	}{
		{
			name: "TCP SYN a:40000 -> server:80",
			out:  natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 40000, dport: 80, tcpFlags: natTCPSyn, payload: payload},
			back: func(o natParsed) natPkt {
				return natPkt{src: natServer, proto: unix.IPPROTO_TCP, sport: 80, dport: o.sport, tcpFlags: natTCPSyn | natTCPAck, payload: payload}
			},
		},
		{
			name: "UDP with checksum a:5353 -> server:53",
			out:  natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 5353, dport: 53, payload: payload},
			back: func(o natParsed) natPkt {
				return natPkt{src: natServer, proto: unix.IPPROTO_UDP, sport: 53, dport: o.sport, payload: payload}
			},
		},
		{
			name: "UDP with checksum 0 a:5354 -> server:53",
			out:  natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 5354, dport: 53, payload: payload, udpNoCsum: true},
			back: func(o natParsed) natPkt {
				return natPkt{src: natServer, proto: unix.IPPROTO_UDP, sport: 53, dport: o.sport, payload: payload, udpNoCsum: true}
			},
		},
		{
			name: "ICMP echo id 0x4242 a -> server",
			out:  natPkt{dst: natServer, proto: unix.IPPROTO_ICMP, icmpType: 8, icmpID: 0x4242, payload: payload},
			back: func(o natParsed) natPkt {
				return natPkt{src: natServer, proto: unix.IPPROTO_ICMP, icmpType: 0, icmpID: o.icmpID, payload: payload}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w.reset(t)
			before := natMonoNow(t)
			verdict, out := w.fromPodRun(t, w.a, tc.out)
			if verdict != natActRedirect {
				t.Fatalf("tern_from_pod verdict %d, want %d (redirect out of the uplink); metrics %v", verdict, natActRedirect, w.metrics(t))
			}
			o := natParse(t, out)
			natPortOf := o.sport
			if tc.out.proto == unix.IPPROTO_ICMP {
				natPortOf = o.icmpID
			}
			if o.src != natNodeIP || o.dst != natServer {
				t.Errorf("left as %s -> %s, want %s -> %s", o.src, o.dst, natNodeIP, natServer)
			}
			if natPortOf < natPortLo || natPortOf > natPortHi {
				t.Errorf("NAT port %d outside %d-%d", natPortOf, natPortLo, natPortHi)
			}
			if o.dport != tc.out.dport || o.ttl != 63 || !bytes.Equal(o.payload, payload) {
				t.Errorf("dport %d ttl %d payload %q: want %d, 63, unchanged", o.dport, o.ttl, o.payload, tc.out.dport)
			}
			if tc.out.udpNoCsum && o.l4csum != 0 {
				t.Errorf("UDP checksum 0 became %#04x", o.l4csum)
			}

			// Map state: both halves, pointing at each other.
			origPort, remotePort := tc.out.sport, tc.out.dport
			if tc.out.proto == unix.IPPROTO_ICMP {
				origPort, remotePort = tc.out.icmpID, 0
			}
			var fwd, rev TernNatEntry
			if err := w.maps[TernMapTernNat].Lookup(natTuple(w.a.ip, origPort, natServer, remotePort, tc.out.proto), &fwd); err != nil {
				t.Fatalf("forward entry: %v", err)
			}
			if fwd.Addr != natAddr(natNodeIP) || fwd.Port != natPort(natPortOf) || fwd.LastSeen < before {
				t.Errorf("forward entry %+v, want node IP, port %d, last_seen >= %d", fwd, natPortOf, before)
			}
			if err := w.maps[TernMapTernNatRev].Lookup(natTuple(natServer, remotePort, natNodeIP, natPortOf, tc.out.proto), &rev); err != nil {
				t.Fatalf("reverse entry: %v", err)
			}
			if rev.Addr != natAddr(w.a.ip) || rev.Port != natPort(origPort) {
				t.Errorf("reverse entry %+v, want pod a port %d", rev, origPort)
			}

			// The same flow again: the same translation, no new entries.
			if v, again := w.fromPodRun(t, w.a, tc.out); v != natActRedirect || !bytes.Equal(again, out) {
				t.Errorf("second packet: verdict %d, translated differently from the first", v)
			}
			if n, r := w.count(t, TernMapTernNat), w.count(t, TernMapTernNatRev); n != 1 || r != 1 {
				t.Errorf("%d forward and %d reverse entries, want 1 each", n, r)
			}

			// The reply, on the uplink.
			verdict, in := w.fromUplinkRun(t, tc.back(o))
			if verdict != natActRedirect {
				t.Fatalf("tern_from_uplink verdict %d, want %d; metrics %v", verdict, natActRedirect, w.metrics(t))
			}
			r := natParse(t, in)
			backPort := r.dport
			if tc.out.proto == unix.IPPROTO_ICMP {
				backPort = r.icmpID
			}
			if r.src != natServer || r.dst != w.a.ip || backPort != origPort {
				t.Errorf("reply delivered as %s -> %s port %d, want %s -> %s port %d", r.src, r.dst, backPort, natServer, w.a.ip, origPort)
			}
			if !bytes.Equal(r.dstMAC, w.a.mac) || !bytes.Equal(r.srcMAC, w.a.hostMAC) || r.ttl != 63 {
				t.Errorf("reply MACs %s <- %s ttl %d, want pod a's %s <- %s, 63", r.dstMAC, r.srcMAC, r.ttl, w.a.mac, w.a.hostMAC)
			}
			if tc.out.udpNoCsum && r.l4csum != 0 {
				t.Errorf("reply: UDP checksum 0 became %#04x", r.l4csum)
			}
			w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_SNAT: 2, TernMetricMETRIC_REV_SNAT: 1})
		})
	}
}

// TestSNATNotApplied: destinations in the cluster CIDR or a
// nonMasqueradeCIDR, pods whose network has ipMasq off, and a node without
// uplink config all leave the packet alone for the host stack.
func TestSNATNotApplied(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	udp := func(dst netip.Addr) natPkt {
		return natPkt{dst: dst, proto: unix.IPPROTO_UDP, sport: 1000, dport: 53, payload: []byte("q")}
	}
	cases := []struct {
		name   string
		ep     func() natEP
		pkt    natPkt
		config *TernNodeConfig
	}{
		{name: "a to a pod of another node (cluster CIDR)", ep: func() natEP { return w.a }, pkt: udp(natOtherPod)},
		{name: "a to a nonMasqueradeCIDR", ep: func() natEP { return w.a }, pkt: udp(netip.MustParseAddr("198.51.100.7"))},
		{name: "a to the node IP", ep: func() natEP { return w.a }, pkt: udp(natNodeIP)},
		{name: "a to multicast", ep: func() natEP { return w.a }, pkt: udp(netip.MustParseAddr("239.1.2.3"))},
		{name: "c (ipMasq off) to the server", ep: func() natEP { return w.c }, pkt: udp(natServer)},
		{name: "a to the server, no node config", ep: func() natEP { return w.a }, pkt: udp(natServer), config: &TernNodeConfig{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w.reset(t)
			if tc.config != nil {
				w.setConfig(t, *tc.config)
			}
			ep := tc.ep()
			p := tc.pkt
			p.src, p.srcMAC, p.dstMAC = ep.ip, ep.mac, ep.hostMAC
			frame := p.frame()
			verdict, out := w.run(t, w.fromPod, ep.ifindex, frame)
			if verdict != natActOK || !bytes.Equal(out, frame) {
				t.Errorf("verdict %d, packet changed: %v; want %d and the packet as sent", verdict, !bytes.Equal(out, frame), natActOK)
			}
			if n := w.count(t, TernMapTernNat) + w.count(t, TernMapTernNatRev); n != 0 {
				t.Errorf("%d NAT entries created", n)
			}
			w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_PASS_HOST: 1})
		})
	}
}

// TestSNATPortCollision: two pods use the same source port to the same
// server: their flows get different NAT ports, and each reply finds its pod.
// With a two-port range the allocator must probe past the first candidate;
// a third flow to that server finds no port and is dropped and counted,
// while a flow to another server may reuse a port. Nothing of the existing
// flows changes.
func TestSNATPortCollision(t *testing.T) {
	for _, c := range []struct {
		name string
		opt  natOptions
	}{
		{"default range 61000-65535", natOptions{}},
		{"range 61000-61001", natOptions{portMin: 61000, portMax: 61001}},
	} {
		opt := c.opt
		t.Run(c.name, func(t *testing.T) {
			w := newNATWorld(t, opt)
			flow := func(sport uint16, dst netip.Addr) natPkt {
				return natPkt{dst: dst, proto: unix.IPPROTO_TCP, sport: sport, dport: 443, tcpFlags: natTCPSyn}
			}
			ports := map[string]uint16{}
			for _, ep := range []natEP{w.a, w.b} {
				v, out := w.fromPodRun(t, ep, flow(40000, natServer))
				if v != natActRedirect {
					t.Fatalf("%s:40000: verdict %d, want redirect; metrics %v", ep.ip, v, w.metrics(t))
				}
				ports[ep.ip.String()] = natParse(t, out).sport
			}
			pa, pb := ports[w.a.ip.String()], ports[w.b.ip.String()]
			if pa == pb {
				t.Fatalf("both pods got NAT port %d", pa)
			}
			for _, c := range []struct {
				ep   natEP
				port uint16
			}{{w.a, pa}, {w.b, pb}} {
				v, in := w.fromUplinkRun(t, natPkt{src: natServer, proto: unix.IPPROTO_TCP, sport: 443, dport: c.port, tcpFlags: natTCPSyn | natTCPAck})
				r := natParse(t, in)
				if v != natActRedirect || r.dst != c.ep.ip || r.dport != 40000 || !bytes.Equal(r.dstMAC, c.ep.mac) {
					t.Errorf("reply to port %d: verdict %d, delivered to %s:%d (%s), want %s:40000", c.port, v, r.dst, r.dport, r.dstMAC, c.ep.ip)
				}
			}
			if opt.portMax == 0 {
				return
			}

			// Range exhausted for (server, 443, TCP).
			frame := flow(40001, natServer)
			v, _ := w.fromPodRun(t, w.a, frame)
			if v != natActShot {
				t.Errorf("third flow to the same server: verdict %d, want drop", v)
			}
			if got := w.metrics(t)[TernMetricMETRIC_DROP_NAT_NO_PORT]; got != 1 {
				t.Errorf("drop_nat_no_port %d, want 1", got)
			}
			// Another server: ports are per remote, so there is room.
			if v, out := w.fromPodRun(t, w.a, flow(40001, natServer2)); v != natActRedirect || natParse(t, out).src != natNodeIP {
				t.Errorf("flow to another server: verdict %d, want redirect", v)
			}
			// The first two flows are untouched.
			for _, c := range []struct {
				ep   natEP
				port uint16
			}{{w.a, pa}, {w.b, pb}} {
				v, out := w.fromPodRun(t, c.ep, natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 40000, dport: 443, tcpFlags: natTCPAck})
				if got := natParse(t, out).sport; v != natActRedirect || got != c.port {
					t.Errorf("%s's flow after exhaustion: verdict %d port %d, want its port %d", c.ep.ip, v, got, c.port)
				}
			}
		})
	}
}

// TestSNATMapFull: NAT maps that refuse entries (plain hashes of two
// entries stand in for full maps: an LRU map evicts instead) drop the new
// flow and count it; the flows that have entries go on, and a refused
// forward entry gives its reverse entry (its port) back.
func TestSNATMapFull(t *testing.T) {
	for _, full := range []string{TernMapTernNatRev, TernMapTernNat} {
		t.Run(full, func(t *testing.T) {
			w := newNATWorld(t, natOptions{plainHash: []string{full}, maxEntries: 2})
			flow := func(dst netip.Addr) natPkt {
				return natPkt{dst: dst, proto: unix.IPPROTO_UDP, sport: 7000, dport: 53, payload: []byte("q")}
			}
			servers := []netip.Addr{natServer, natServer2, netip.MustParseAddr("203.0.113.12")}
			ports := map[netip.Addr]uint16{}
			for _, s := range servers[:2] {
				v, out := w.fromPodRun(t, w.a, flow(s))
				if v != natActRedirect {
					t.Fatalf("flow to %s: verdict %d; metrics %v", s, v, w.metrics(t))
				}
				ports[s] = natParse(t, out).sport
			}
			if v, _ := w.fromPodRun(t, w.a, flow(servers[2])); v != natActShot {
				t.Errorf("flow to %s with %s full: verdict %d, want drop", servers[2], full, v)
			}
			if got := w.metrics(t)[TernMetricMETRIC_DROP_NAT_MAP_FULL]; got != 1 {
				t.Errorf("drop_nat_map_full %d, want 1", got)
			}
			if n, r := w.count(t, TernMapTernNat), w.count(t, TernMapTernNatRev); n != 2 || r != 2 {
				t.Errorf("%d forward, %d reverse entries; want 2 and 2 (no half-made flow)", n, r)
			}
			for _, s := range servers[:2] {
				v, out := w.fromPodRun(t, w.a, flow(s))
				if got := natParse(t, out).sport; v != natActRedirect || got != ports[s] {
					t.Errorf("flow to %s afterwards: verdict %d port %d, want %d", s, v, got, ports[s])
				}
			}
		})
	}
}

// TestSNATTimeouts: with a single NAT port, a second flow to the same
// server gets the port only once the first is idle past its timeout
// (entries' last_seen is moved back to simulate the wait). A TCP
// connection closed by RST frees its port after the short close timeout,
// an established one does not. The old flow then loses its entry, and the
// reply goes to the new owner.
func TestSNATTimeouts(t *testing.T) {
	cases := []struct {
		name    string
		proto   uint8
		closeBy uint8 // TCP flags of a last packet from the pod
		idle    time.Duration
		reclaim bool
	}{
		{"UDP idle 30s (timeout 60s)", unix.IPPROTO_UDP, 0, 30 * time.Second, false},
		{"UDP idle 61s", unix.IPPROTO_UDP, 0, 61 * time.Second, true},
		{"TCP established idle 11s (timeout 6h)", unix.IPPROTO_TCP, 0, 11 * time.Second, false},
		{"TCP after RST idle 11s (close timeout 10s)", unix.IPPROTO_TCP, natTCPRst, 11 * time.Second, true},
		{"TCP after FIN one way idle 11s", unix.IPPROTO_TCP, natTCPFin | natTCPAck, 11 * time.Second, false},
	}
	w := newNATWorld(t, natOptions{portMin: 62000, portMax: 62000})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w.reset(t)
			pkt := func(sport uint16, flags uint8) natPkt {
				return natPkt{dst: natServer, proto: tc.proto, sport: sport, dport: 80, tcpFlags: flags, payload: []byte("x")}
			}
			if v, _ := w.fromPodRun(t, w.a, pkt(1111, natTCPSyn)); v != natActRedirect {
				t.Fatalf("first flow: verdict %d", v)
			}
			// A reply, so TCP counts as established.
			if v, _ := w.fromUplinkRun(t, natPkt{src: natServer, proto: tc.proto, sport: 80, dport: 62000, tcpFlags: natTCPSyn | natTCPAck}); v != natActRedirect {
				t.Fatalf("reply: verdict %d", v)
			}
			if tc.closeBy != 0 {
				if v, _ := w.fromPodRun(t, w.a, pkt(1111, tc.closeBy)); v != natActRedirect {
					t.Fatalf("closing packet: verdict %d", v)
				}
			}
			if v, _ := w.fromPodRun(t, w.b, pkt(2222, natTCPSyn)); v != natActShot {
				t.Fatalf("second flow while the first is fresh: verdict %d, want drop", v)
			}

			// Age both halves of the first flow.
			past := natMonoNow(t) - uint64(tc.idle)
			fk := natTuple(w.a.ip, 1111, natServer, 80, tc.proto)
			rk := natTuple(natServer, 80, natNodeIP, 62000, tc.proto)
			for _, e := range []struct {
				m string
				k TernNatTuple
			}{{TernMapTernNat, fk}, {TernMapTernNatRev, rk}} {
				var v TernNatEntry
				if err := w.maps[e.m].Lookup(e.k, &v); err != nil {
					t.Fatalf("%s: %v", e.m, err)
				}
				v.LastSeen = past
				if err := w.maps[e.m].Put(e.k, v); err != nil {
					t.Fatal(err)
				}
			}

			v, out := w.fromPodRun(t, w.b, pkt(2222, natTCPSyn))
			if !tc.reclaim {
				if v != natActShot {
					t.Errorf("second flow after %s idle: verdict %d, want drop (the first still owns the port)", tc.idle, v)
				}
				return
			}
			if v != natActRedirect || natParse(t, out).sport != 62000 {
				t.Fatalf("second flow after %s idle: verdict %d, want the freed port 62000", tc.idle, v)
			}
			var e TernNatEntry
			if err := w.maps[TernMapTernNat].Lookup(fk, &e); !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Errorf("the first flow's forward entry survived the reclaim: %+v %v", e, err)
			}
			if err := w.maps[TernMapTernNatRev].Lookup(rk, &e); err != nil || e.Addr != natAddr(w.b.ip) || e.Port != natPort(2222) {
				t.Errorf("reverse entry after the reclaim: %+v %v, want pod b port 2222", e, err)
			}
			v, in := w.fromUplinkRun(t, natPkt{src: natServer, proto: tc.proto, sport: 80, dport: 62000, tcpFlags: natTCPAck})
			if r := natParse(t, in); v != natActRedirect || r.dst != w.b.ip || r.dport != 2222 {
				t.Errorf("reply after the reclaim went to %s:%d (verdict %d), want pod b:2222", r.dst, r.dport, v)
			}
		})
	}
}

// TestSNATICMPError: an ICMP "fragmentation needed" a router sends the node
// about a masqueraded TCP packet reaches the pod with the outer destination
// and the embedded source translated back, every checksum valid, so path
// MTU discovery works through the NAT.
func TestSNATICMPError(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 45000, dport: 443, tcpFlags: natTCPAck, payload: bytes.Repeat([]byte("d"), 100)})
	if v != natActRedirect {
		t.Fatalf("tern_from_pod verdict %d", v)
	}
	natPort := natParse(t, out).sport
	// The ICMP error quotes the IPv4 header and the first 8 bytes of what
	// left the node.
	quoted := append([]byte{}, out[14:14+28]...)
	icmp := []byte{3, 4, 0, 0, 0, 0, 0x05, 0x00} // type 3 code 4, next-hop MTU 1280
	icmp = append(icmp, quoted...)
	binary.BigEndian.PutUint16(icmp[2:], natCsum(icmp))
	router := netip.MustParseAddr("192.0.2.254")
	v, in := w.fromUplinkRun(t, natPkt{src: router, proto: unix.IPPROTO_ICMP, l4: icmp})
	if v != natActRedirect {
		t.Fatalf("tern_from_uplink verdict %d, want redirect to the pod; metrics %v", v, w.metrics(t))
	}
	r := natParse(t, in) // checks outer IPv4 and ICMP checksums
	if r.src != router || r.dst != w.a.ip || !bytes.Equal(r.dstMAC, w.a.mac) {
		t.Errorf("delivered %s -> %s (%s), want %s -> pod a", r.src, r.dst, r.dstMAC, router)
	}
	inner := in[14+20+8:]
	if natCsum(inner[:20]) != 0 {
		t.Errorf("embedded IPv4 header checksum is wrong")
	}
	if src := netip.AddrFrom4([4]byte(inner[12:16])); src != w.a.ip {
		t.Errorf("embedded source %s, want pod a %s", src, w.a.ip)
	}
	if sp, dp := binary.BigEndian.Uint16(inner[20:]), binary.BigEndian.Uint16(inner[22:]); sp != 45000 || dp != 443 {
		t.Errorf("embedded ports %d -> %d, want 45000 -> 443 (NAT port was %d)", sp, dp, natPort)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_SNAT: 1, TernMetricMETRIC_REV_SNAT: 1})
}

// TestSNATICMPErrorForged: the reverse translation of ICMP errors already
// requires the quoted source to be the node IP, the error's destination
// (netfilter's rule, which the policy's "related" check now follows too):
// an error quoting a packet from another source, with the remote address
// and ports of a live masqueraded flow, is left to the stack untranslated.
func TestSNATICMPErrorForged(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 5353, dport: 53, payload: []byte("q")})
	if v != natActRedirect {
		t.Fatalf("tern_from_pod verdict %d", v)
	}
	quoted := append([]byte{}, out[14:14+28]...)
	forger := netip.MustParseAddr("192.0.2.99").As4()
	copy(quoted[12:16], forger[:]) // quoted source: not the node IP
	binary.BigEndian.PutUint16(quoted[10:], 0)
	binary.BigEndian.PutUint16(quoted[10:], natCsum(quoted[:20]))
	icmp := []byte{3, 3, 0, 0, 0, 0, 0, 0}
	icmp = append(icmp, quoted...)
	binary.BigEndian.PutUint16(icmp[2:], natCsum(icmp))
	p := natPkt{src: natServer, dst: natNodeIP, proto: unix.IPPROTO_ICMP, l4: icmp}
	p.srcMAC, p.dstMAC = net.HardwareAddr{2, 0, 0, 0, 0, 2}, w.uplinkMAC
	in := p.frame()
	if v, got := w.run(t, w.fromUplink, w.uplink, in); v != natActOK || !bytes.Equal(got, in) {
		t.Errorf("forged error: verdict %d, changed %v; want it passed to the stack untouched", v, !bytes.Equal(got, in))
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_SNAT: 1, TernMetricMETRIC_PASS_UPLINK: 1})
}

// TestSNATReplyTTL: a reply (or an ICMP error) of a masqueraded flow that
// arrives with TTL 1 would expire on the hop into the pod. It is dropped
// untranslated: handed to the stack translated, the stack's "time
// exceeded" would quote the pod's address to the outside. TTL 2 still
// reaches the pod.
func TestSNATReplyTTL(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	v, out := w.fromPodRun(t, w.a, natPkt{dst: natServer, proto: unix.IPPROTO_UDP, sport: 5353, dport: 53, payload: []byte("q")})
	if v != natActRedirect {
		t.Fatalf("tern_from_pod verdict %d", v)
	}
	natPort := natParse(t, out).sport
	quoted := append([]byte{}, out[14:14+28]...)
	icmpErr := []byte{3, 3, 0, 0, 0, 0, 0, 0} // port unreachable
	icmpErr = append(icmpErr, quoted...)
	binary.BigEndian.PutUint16(icmpErr[2:], natCsum(icmpErr))

	for _, tc := range []struct {
		name string
		pkt  natPkt
	}{
		{"UDP reply server:53 -> node:NAT port", natPkt{src: natServer, proto: unix.IPPROTO_UDP, sport: 53, dport: natPort, payload: []byte("a")}},
		{"ICMP port unreachable about the masqueraded datagram", natPkt{src: natServer, proto: unix.IPPROTO_ICMP, l4: icmpErr}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, ttl := range []uint8{1, 2} {
				before := w.metrics(t)
				p := tc.pkt
				p.ttl = ttl
				p.srcMAC, p.dstMAC = net.HardwareAddr{2, 0, 0, 0, 0, 2}, w.uplinkMAC
				p.dst = natNodeIP
				in := p.frame()
				v, got := w.run(t, w.fromUplink, w.uplink, in)
				after := w.metrics(t)
				if ttl == 1 {
					if v != natActShot || !bytes.Equal(got, in) {
						t.Errorf("TTL 1: verdict %d, packet changed %v; want dropped untranslated", v, !bytes.Equal(got, in))
					}
					if after[TernMetricMETRIC_DROP_REV_TTL] != before[TernMetricMETRIC_DROP_REV_TTL]+1 {
						t.Errorf("TTL 1: drop_rev_ttl not counted: %v", after)
					}
					continue
				}
				if r := natParse(t, got); v != natActRedirect || r.dst != w.a.ip || r.ttl != 1 {
					t.Errorf("TTL 2: verdict %d, delivered to %s with TTL %d; want redirect to pod a, TTL 1", v, r.dst, r.ttl)
				}
			}
		})
	}
}

// TestSNATInbound: a connection from outside straight to a pod's address
// (routed pod CIDR) passes the uplink to the host stack and is remembered,
// so the pod's answer keeps its address instead of being masqueraded.
func TestSNATInbound(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	syn := natPkt{src: natServer, dst: w.a.ip, proto: unix.IPPROTO_TCP, sport: 5555, dport: 8080, tcpFlags: natTCPSyn}
	frame := func() []byte {
		p := syn
		p.srcMAC, p.dstMAC = net.HardwareAddr{2, 0, 0, 0, 0, 2}, w.uplinkMAC
		return p.frame()
	}()
	if v, out := w.run(t, w.fromUplink, w.uplink, frame); v != natActOK || !bytes.Equal(out, frame) {
		t.Fatalf("inbound SYN: verdict %d (changed %v), want it passed on as it is", v, !bytes.Equal(out, frame))
	}
	var e TernNatEntry
	if err := w.maps[TernMapTernNat].Lookup(natTuple(w.a.ip, 8080, natServer, 5555, unix.IPPROTO_TCP), &e); err != nil ||
		e.Flags&uint16(TernNatFlagsNAT_F_INBOUND) == 0 {
		t.Fatalf("inbound flow not recorded: %+v %v", e, err)
	}
	answer := natPkt{dst: natServer, proto: unix.IPPROTO_TCP, sport: 8080, dport: 5555, tcpFlags: natTCPSyn | natTCPAck}
	answer.src, answer.srcMAC, answer.dstMAC = w.a.ip, w.a.mac, w.a.hostMAC
	af := answer.frame()
	if v, out := w.run(t, w.fromPod, w.a.ifindex, af); v != natActOK || !bytes.Equal(out, af) {
		t.Errorf("pod's SYN-ACK: verdict %d (changed %v), want it passed unmasqueraded", v, !bytes.Equal(out, af))
	}
	if n := w.count(t, TernMapTernNatRev); n != 0 {
		t.Errorf("%d reverse entries: the answer was given a NAT port", n)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_PASS_UPLINK: 1, TernMetricMETRIC_PASS_HOST: 1})
}

// TestSNATEdges: what the pod program must not masquerade, and what the
// uplink program must leave alone.
func TestSNATEdges(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	cases := []struct {
		name    string
		uplink  bool // run tern_from_uplink (else tern_from_pod from pod a)
		pkt     natPkt
		verdict uint32
		metric  TernMetric
	}{
		{name: "TTL 1 to the server: the stack answers time exceeded", pkt: natPkt{dst: natServer, ttl: 1, proto: unix.IPPROTO_UDP, sport: 1, dport: 2},
			verdict: natActOK, metric: TernMetricMETRIC_PASS_TTL},
		{name: "non-first UDP fragment to the server", pkt: natPkt{dst: natServer, frag: 0x0010, proto: unix.IPPROTO_UDP, payload: []byte("tail")},
			verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_UNSUPPORTED},
		{name: "GRE to the server", pkt: natPkt{dst: natServer, proto: 47, payload: []byte{0, 0, 8, 0}},
			verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_UNSUPPORTED},
		{name: "ICMP echo reply to the server, no inbound echo request recorded", pkt: natPkt{dst: natServer, proto: unix.IPPROTO_ICMP, icmpType: 0, icmpID: 9},
			verdict: natActShot, metric: TernMetricMETRIC_DROP_NAT_ICMP},
		{name: "pod a to its own address (hairpin)", pkt: natPkt{dst: netip.MustParseAddr("10.244.1.2"), proto: unix.IPPROTO_UDP, sport: 1, dport: 2},
			verdict: natActRedirect, metric: TernMetricMETRIC_REDIRECT_PEER},
		{name: "uplink: UDP to the node IP, no NAT entry (the node's own)", uplink: true, pkt: natPkt{src: natServer, proto: unix.IPPROTO_UDP, sport: 53, dport: 61000},
			verdict: natActOK, metric: TernMetricMETRIC_PASS_UPLINK},
		{name: "uplink: TCP to another address", uplink: true, pkt: natPkt{src: natServer, dst: natServer2, proto: unix.IPPROTO_TCP, sport: 1, dport: 2},
			verdict: natActOK, metric: TernMetricMETRIC_PASS_UPLINK},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			w.reset(t)
			var (
				v        uint32
				out, in  []byte
				prog     = w.fromPod
				ifindex  = w.a.ifindex
				sentMACs = [2]net.HardwareAddr{w.a.mac, w.a.hostMAC}
			)
			p := tc.pkt
			if tc.uplink {
				prog, ifindex = w.fromUplink, w.uplink
				sentMACs = [2]net.HardwareAddr{{2, 0, 0, 0, 0, 2}, w.uplinkMAC}
				if !p.dst.IsValid() {
					p.dst = natNodeIP
				}
			} else {
				p.src = w.a.ip
			}
			p.srcMAC, p.dstMAC = sentMACs[0], sentMACs[1]
			in = p.frame()
			v, out = w.run(t, prog, ifindex, in)
			if v != tc.verdict {
				t.Errorf("verdict %d, want %d", v, tc.verdict)
			}
			if tc.verdict == natActOK && !bytes.Equal(out, in) {
				t.Errorf("packet changed on its way to the stack")
			}
			if n := w.count(t, TernMapTernNat) + w.count(t, TernMapTernNatRev); n != 0 {
				t.Errorf("%d NAT entries created", n)
			}
			w.wantMetrics(t, map[TernMetric]uint64{tc.metric: 1})
		})
	}
}
