package bpf

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// NodePort acceleration (xdp_uplink.c) on crafted frames, in the NAT test
// world with the load balancer's maps (lb_test.go): the XDP program shares
// the maps with tern_from_pod and tern_from_uplink as it does on a node.

const (
	xdpPass    = 2 // XDP_PASS
	xdpMarkLen = 4 // the LB_XDP_MARK word of metadata in front of a translated frame
	xdpMark    = 0x7e4e0d47
)

func loadXDP(t *testing.T, w *natWorld) *ebpf.Program {
	t.Helper()
	spec, err := LoadTernXDP()
	if err != nil {
		t.Fatal(err)
	}
	repl := map[string]*ebpf.Map{}
	for name, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
		if shared, ok := w.maps[name]; ok && name[0] != '.' {
			repl[name] = shared
		}
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		t.Fatalf("load %+v", err)
	}
	t.Cleanup(coll.Close)
	return coll.Programs[TernXDPProgTernXdpUplink]
}

// xdpRun runs the XDP program on frame and checks the verdict and the
// metrics that moved. It returns the frame as passed on and whether it
// carried the translation mark in its metadata.
func xdpRun(t *testing.T, w *natWorld, prog *ebpf.Program, frame []byte, metrics ...TernMetric) ([]byte, bool) {
	t.Helper()
	before := w.metrics(t)
	out := make([]byte, len(frame)+256)
	var verdict uint32
	err := w.ns.Do(func(ns.NetNS) error {
		opts := &ebpf.RunOptions{Data: frame, DataOut: out}
		var err error
		verdict, err = prog.Run(opts)
		out = opts.DataOut
		return err
	})
	if err != nil {
		t.Fatalf("run: %v", err)
	}
	if verdict != xdpPass {
		t.Errorf("verdict %d, want XDP_PASS", verdict)
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
	// The test run returns the metadata in front of the frame.
	switch len(out) {
	case len(frame):
		return out, false
	case len(frame) + xdpMarkLen:
		if binary.NativeEndian.Uint32(out) != xdpMark {
			t.Errorf("metadata %x, want the mark %#x", out[:xdpMarkLen], xdpMark)
		}
		return out[xdpMarkLen:], true
	}
	t.Fatalf("%d bytes out of %d in", len(out), len(frame))
	return nil, false
}

func (w *natWorld) uplinkFrame(p natPkt) []byte {
	p.srcMAC, p.dstMAC = []byte{2, 0, 0, 0, 0, 2}, w.uplinkMAC
	return p.frame()
}

// A NodePort packet from outside to a backend on the node is translated in
// XDP (destination address and port, IPv4 and L4 checksums), marked, and
// its flow pinned where tc finds it: a later packet of the flow that XDP
// leaves to tc goes to the same backend, and the backend's answer is
// translated back to the node port by tern_from_pod, for TCP and UDP (with
// and without a UDP checksum).
func TestXDPNodePortTranslates(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	xdp := loadXDP(t, w)
	client := natServer
	for _, tc := range []struct {
		name   string
		proto  uint8
		noCsum bool
	}{
		{"tcp", unix.IPPROTO_TCP, false},
		{"udp", unix.IPPROTO_UDP, false},
		{"udp without checksum", unix.IPPROTO_UDP, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lbReset(t, w)
			// Two backends: the flow's pick must be the one tc follows.
			lbService(t, w, natNodeIP, 30080, tc.proto, 8, TernLbSvc{}, lbBackend{w.b.ip, 8080}, lbBackend{w.c.ip, 8080})
			in := natPkt{src: client, dst: natNodeIP, proto: tc.proto, sport: 45000, dport: 30080, tcpFlags: natTCPSyn, udpNoCsum: tc.noCsum, payload: []byte("hello")}
			out, marked := xdpRun(t, w, xdp, w.uplinkFrame(in), TernMetricMETRIC_LB_XDP_DNAT)
			if !marked {
				t.Errorf("translated frame without the mark")
			}
			p := natParse(t, out) // checks both checksums
			if p.src != client || p.sport != 45000 || (p.dst != w.b.ip && p.dst != w.c.ip) || p.dport != 8080 || string(p.payload) != "hello" {
				t.Fatalf("translated to %s:%d from %s:%d payload %q", p.dst, p.dport, p.src, p.sport, p.payload)
			}
			if tc.noCsum && p.l4csum != 0 {
				t.Errorf("UDP checksum %#x, want 0 (none) kept", p.l4csum)
			}
			if p.ttl != 64 {
				t.Errorf("TTL %d: XDP must leave it to tc's delivery", p.ttl)
			}
			backend := w.b
			if p.dst == w.c.ip {
				backend = w.c
			}
			// The next packet, untranslated (XDP detached): tc finds
			// the pinned flow, same backend, whatever the slots say.
			lbService(t, w, natNodeIP, 30080, tc.proto, 8, TernLbSvc{}, lbBackend{w.a.ip, 8080})
			in.tcpFlags = natTCPAck
			out = lbRun(t, w, w.fromUplink, w.uplink, w.uplinkFrame(in), natActRedirect, TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER)
			if q := natParse(t, out); q.dst != backend.ip || q.dport != 8080 {
				t.Errorf("tc sent the flow's next packet to %s:%d, want XDP's pick %s:8080", q.dst, q.dport, backend.ip)
			}
			// The backend's answer: from the node port, out of the uplink.
			out = lbRun(t, w, w.fromPod, backend.ifindex, w.podFrame(backend, natPkt{dst: client, proto: tc.proto, sport: 8080, dport: 45000, tcpFlags: natTCPSyn | natTCPAck}),
				natActRedirect, TernMetricMETRIC_LB_REV_NAT)
			if q := natParse(t, out); q.src != natNodeIP || q.sport != 30080 || q.dst != client || q.dport != 45000 {
				t.Errorf("answer from %s:%d to %s:%d", q.src, q.sport, q.dst, q.dport)
			}
			// And XDP keeps translating the pinned flow to its backend.
			out, _ = xdpRun(t, w, xdp, w.uplinkFrame(in), TernMetricMETRIC_LB_XDP_DNAT)
			if q := natParse(t, out); q.dst != backend.ip {
				t.Errorf("XDP moved the flow to %s", q.dst)
			}
		})
	}
}

// What XDP does not translate passes unchanged, byte for byte, and unmarked,
// to tern_from_uplink, which does what it did without XDP.
func TestXDPNodePortPassesTheRest(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	xdp := loadXDP(t, w)
	lbReset(t, w)
	client := natServer
	lbService(t, w, natNodeIP, 30080, unix.IPPROTO_TCP, 8, TernLbSvc{}, lbBackend{w.b.ip, 8080})
	lbService(t, w, natNodeIP, 30081, unix.IPPROTO_TCP, 9, TernLbSvc{}, lbBackend{natOtherPod, 8080})
	lbService(t, w, natNodeIP, 30082, unix.IPPROTO_TCP, 10, TernLbSvc{})
	lbService(t, w, natNodeIP, 30083, unix.IPPROTO_SCTP, 11, TernLbSvc{}, lbBackend{w.b.ip, 30083})
	nodePort := natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 45000, dport: 30080, tcpFlags: natTCPSyn}
	for _, tc := range []struct {
		name string
		pkt  natPkt
		// tc's verdict and metrics on the same frame
		tcVerdict uint32
		tcMetrics []TernMetric
	}{
		{"not a frontend", natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 45000, dport: 22, tcpFlags: natTCPSyn},
			natActOK, []TernMetric{TernMetricMETRIC_PASS_UPLINK}},
		{"ICMP to the node", natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_ICMP, icmpType: 8, icmpID: 7},
			natActOK, []TernMetric{TernMetricMETRIC_PASS_UPLINK}},
		{"frontend without endpoints", natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 45000, dport: 30082, tcpFlags: natTCPSyn},
			natActShot, []TernMetric{TernMetricMETRIC_DROP_LB}},
		{"backend on another node", natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 45000, dport: 30081, tcpFlags: natTCPSyn},
			natActShot, []TernMetric{TernMetricMETRIC_DROP_LB}},
		{"TTL about to expire", func() natPkt { p := nodePort; p.ttl = 1; return p }(),
			natActOK, []TernMetric{TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_PASS_TTL}},
		{"non-first fragment", func() natPkt { p := nodePort; p.frag = 0x2000 | 10; p.l4 = []byte("fragment"); return p }(),
			natActOK, []TernMetric{TernMetricMETRIC_PASS_UPLINK}},
		{"SCTP", natPkt{src: client, dst: natNodeIP, proto: unix.IPPROTO_SCTP, l4: sctpHeader(45000, 30083)},
			natActRedirect, []TernMetric{TernMetricMETRIC_LB_DNAT, TernMetricMETRIC_REDIRECT_PEER}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearMap(t, w.maps[TernMapTernLbCt])
			frame := w.uplinkFrame(tc.pkt)
			out, marked := xdpRun(t, w, xdp, frame)
			if marked || !bytes.Equal(out, frame) {
				t.Errorf("XDP changed the frame (marked %v)", marked)
			}
			// Nothing pinned either: tc decides these flows alone.
			var k, v []byte
			if it := w.maps[TernMapTernLbCt].Iterate(); it.Next(&k, &v) {
				t.Errorf("XDP pinned a flow it left to tc")
			}
			lbRun(t, w, w.fromUplink, w.uplink, frame, tc.tcVerdict, tc.tcMetrics...)
		})
	}
	// Not IPv4 at all.
	arp := append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 2, 0x08, 0x06}, make([]byte, 28)...)
	if out, marked := xdpRun(t, w, xdp, arp); marked || !bytes.Equal(out, arp) {
		t.Errorf("XDP changed an ARP frame")
	}
	// Without a node config (the datapath not set up yet): nothing.
	w.setConfig(t, TernNodeConfig{})
	frame := w.uplinkFrame(nodePort)
	if out, marked := xdpRun(t, w, xdp, frame); marked || !bytes.Equal(out, frame) {
		t.Errorf("XDP translated without a node config")
	}
}

// tern_lb_empty set (no frontend on the node, lib/lb.h lb_no_frontends):
// XDP skips the frontend lookup and passes the frame unmarked and
// untouched, as it passes one for no frontend. The flag is set over a
// frontend here only to show it is read (the datapath sets it only when
// tern_lb_svc is empty: datapath/ebpf TestLBEmptyFlag); cleared, the
// frontend is translated again.
func TestXDPNoFrontendsFlag(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	xdp := loadXDP(t, w)
	lbReset(t, w)
	setEmpty := func(v uint32) {
		t.Helper()
		if err := w.maps[TernMapTernLbEmpty].Put(uint32(0), v); err != nil {
			t.Fatal(err)
		}
	}
	lbService(t, w, natNodeIP, 30080, unix.IPPROTO_TCP, 8, TernLbSvc{}, lbBackend{w.b.ip, 8080})
	in := natPkt{src: natServer, dst: natNodeIP, proto: unix.IPPROTO_TCP, sport: 45000, dport: 30080, tcpFlags: natTCPSyn}
	setEmpty(1)
	frame := w.uplinkFrame(in)
	if out, marked := xdpRun(t, w, xdp, frame); marked || !bytes.Equal(out, frame) {
		t.Errorf("with the flag set: XDP changed the frame (marked %v)", marked)
	}
	setEmpty(0)
	if out, marked := xdpRun(t, w, xdp, frame, TernMetricMETRIC_LB_XDP_DNAT); !marked || natParse(t, out).dst != w.b.ip {
		t.Errorf("flag clear: not translated to the backend (marked %v)", marked)
	}
}
