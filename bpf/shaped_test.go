package bpf

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Shaped endpoints (lib/shaped.h: pods with bandwidth limits) on crafted
// packets: what such a pod sends is passed to the stack after
// anti-spoofing and policy (not redirected, not masqueraded at
// tern_from_pod), what it receives is passed to the stack (not
// bpf_redirect_peer), and its masquerade happens at the uplink's egress
// (tern_to_uplink), with the reply translated back by tern_from_uplink and
// passed to the stack. Unflagged endpoints keep the fast path.

// shape sets or clears ENDPOINT_F_SHAPED on ep's map entry.
func (w *natWorld) shape(t *testing.T, ep natEP, on bool) {
	t.Helper()
	v := ep.value()
	if on {
		v.Flags |= uint32(TernEndpointFlagsENDPOINT_F_SHAPED)
	}
	if err := w.maps[TernMapTernEndpoints].Put(natAddr(ep.ip), v); err != nil {
		t.Fatal(err)
	}
}

// toUplinkRun runs tern_to_uplink on a frame the stack sends out of the
// uplink (already routed: TTL decremented, MACs of the uplink's hop).
func (w *natWorld) toUplinkRun(t *testing.T, p natPkt) (uint32, []byte) {
	t.Helper()
	p.srcMAC, p.dstMAC = w.uplinkMAC, net.HardwareAddr{2, 0, 0, 0, 0, 2}
	if p.ttl == 0 {
		p.ttl = 63
	}
	return w.run(t, w.toUplink, w.uplink, p.frame())
}

func TestShapedSource(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	tcp := uint8(unix.IPPROTO_TCP)
	for _, tc := range []struct {
		name string
		pkt  natPkt
	}{
		{"masqueraded destination", natPkt{dst: natServer, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn}},
		{"pod of this node", natPkt{dst: w.b.ip, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn}},
		{"unmasqueraded destination", natPkt{dst: natOtherPod, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Unflagged: the fast path (snat_out's redirect_neigh, or
			// bpf_redirect_peer), or the stack for the unmasqueraded one.
			w.reset(t)
			v, _ := w.fromPodRun(t, w.a, tc.pkt)
			if tc.pkt.dst == natOtherPod {
				if v != natActOK {
					t.Errorf("unflagged: verdict %d, want %d", v, natActOK)
				}
			} else if v != natActRedirect {
				t.Errorf("unflagged: verdict %d, want %d (redirect)", v, natActRedirect)
			}

			w.reset(t)
			w.shape(t, w.a, true)
			in := tc.pkt
			in.srcMAC, in.dstMAC, in.src = w.a.mac, w.a.hostMAC, w.a.ip
			v, out := w.fromPodRun(t, w.a, tc.pkt)
			if v != natActOK {
				t.Fatalf("shaped: verdict %d, want %d (pass to the veth's ingress filter and the stack); metrics %v", v, natActOK, w.metrics(t))
			}
			if !bytes.Equal(out[:len(in.frame())], in.frame()) {
				t.Errorf("shaped: the packet was changed on its way to the stack")
			}
			if n := w.count(t, TernMapTernNat); n != 0 {
				t.Errorf("shaped: %d NAT entries at tern_from_pod, want none (masquerade is the uplink's)", n)
			}
			w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_PASS_SHAPED: 1})
		})
	}

	t.Run("spoofed source still dropped", func(t *testing.T) {
		w.reset(t)
		w.shape(t, w.a, true)
		v, _ := w.fromPodRun(t, w.a, natPkt{src: w.b.ip, dst: natServer, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn})
		if v != natActShot {
			t.Errorf("verdict %d, want %d", v, natActShot)
		}
		w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_DROP_SPOOFED: 1})
	})
}

func TestShapedDestination(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	udp := uint8(unix.IPPROTO_UDP)

	// From another pod of the node: bpf_redirect_peer unless b is shaped.
	w.reset(t)
	toB := natPkt{dst: w.b.ip, proto: udp, sport: 5000, dport: 53}
	if v, _ := w.fromPodRun(t, w.a, toB); v != natActRedirect {
		t.Errorf("unflagged b: verdict %d, want %d (redirect_peer)", v, natActRedirect)
	}
	w.reset(t)
	w.shape(t, w.b, true)
	v, out := w.fromPodRun(t, w.a, toB)
	if v != natActOK {
		t.Fatalf("shaped b: verdict %d, want %d (to the stack, through b's veth); metrics %v", v, natActOK, w.metrics(t))
	}
	if o := natParse(t, out); o.ttl != 64 || !bytes.Equal(o.dstMAC, w.a.hostMAC) {
		t.Errorf("shaped b: ttl %d dst MAC %s, want the packet as sent (the stack routes it)", o.ttl, o.dstMAC)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_PASS_SHAPED: 1})
}

// TestShapedMasquerade: a shaped pod's flow to a server is masqueraded at
// the uplink's egress, after the stack routed it, and the reply comes back
// translated and handed to the stack; an unflagged pod's packet at the
// uplink's egress (never one tern_from_pod left untranslated) is not
// touched there.
func TestShapedMasquerade(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	tcp, icmp := uint8(unix.IPPROTO_TCP), uint8(unix.IPPROTO_ICMP)
	for _, tc := range []struct {
		name     string
		out      natPkt
		back     func(natParsed) natPkt
		origPort func(natPkt) uint16
	}{
		{
			"TCP", natPkt{src: w.a.ip, dst: natServer, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn, payload: []byte("odd")},
			func(o natParsed) natPkt {
				return natPkt{src: natServer, proto: tcp, sport: 80, dport: o.sport, tcpFlags: natTCPSyn | natTCPAck}
			},
			func(p natPkt) uint16 { return p.sport },
		},
		{
			"ICMP echo", natPkt{src: w.a.ip, dst: natServer, proto: icmp, icmpType: 8, icmpID: 0x4242},
			func(o natParsed) natPkt {
				return natPkt{src: natServer, proto: icmp, icmpType: 0, icmpID: o.icmpID}
			},
			func(p natPkt) uint16 { return p.icmpID },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w.reset(t)
			v, out := w.toUplinkRun(t, tc.out)
			if v != natActOK || !bytes.Equal(out[:len(natPktRouted(w, tc.out))], natPktRouted(w, tc.out)) {
				t.Errorf("unflagged: verdict %d or packet changed at the uplink's egress", v)
			}
			w.wantMetrics(t, nil)

			w.shape(t, w.a, true)
			v, out = w.toUplinkRun(t, tc.out)
			if v != natActOK {
				t.Fatalf("shaped: verdict %d, want %d; metrics %v", v, natActOK, w.metrics(t))
			}
			o := natParse(t, out)
			port := o.sport
			if tc.out.proto == icmp {
				port = o.icmpID
			}
			if o.src != natNodeIP || o.dst != natServer || port < natPortLo || port > natPortHi || o.ttl != 63 {
				t.Errorf("left as %s:%d -> %s ttl %d, want %s:NAT port -> %s ttl 63", o.src, port, o.dst, o.ttl, natNodeIP, natServer)
			}
			v, back := w.fromUplinkRun(t, tc.back(o))
			if v != natActOK {
				t.Fatalf("reply: verdict %d, want %d (to the stack, not redirect_peer); metrics %v", v, natActOK, w.metrics(t))
			}
			r := natParse(t, back)
			bport := r.dport
			if tc.out.proto == icmp {
				bport = r.icmpID
			}
			if r.src != natServer || r.dst != w.a.ip || bport != tc.origPort(tc.out) || r.ttl != 64 {
				t.Errorf("reply handed to the stack as %s -> %s:%d ttl %d, want %s -> %s:%d ttl 64",
					r.src, r.dst, bport, r.ttl, natServer, w.a.ip, tc.origPort(tc.out))
			}
			w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_SNAT: 1, TernMetricMETRIC_PASS_SHAPED: 1})
		})
	}

	t.Run("not masqueraded: cluster destination, ipMasq off", func(t *testing.T) {
		w.reset(t)
		w.shape(t, w.a, true)
		w.shape(t, w.c, true)
		for _, p := range []natPkt{
			{src: w.a.ip, dst: natOtherPod, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn},
			{src: w.c.ip, dst: natServer, proto: tcp, sport: 40000, dport: 80, tcpFlags: natTCPSyn},
		} {
			if v, out := w.toUplinkRun(t, p); v != natActOK || !bytes.Equal(out[:len(natPktRouted(w, p))], natPktRouted(w, p)) {
				t.Errorf("%s -> %s: verdict %d or packet changed", p.src, p.dst, v)
			}
		}
		w.wantMetrics(t, nil)
	})

	t.Run("ICMP error from a shaped pod: dropped, never leaves with its address", func(t *testing.T) {
		w.reset(t)
		w.shape(t, w.a, true)
		unreach := natPkt{src: w.a.ip, dst: natServer, proto: icmp, icmpType: 3, payload: make([]byte, 28)}
		if v, _ := w.toUplinkRun(t, unreach); v != natActShot {
			t.Errorf("verdict %d, want %d", v, natActShot)
		}
		w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_DROP_NAT_ICMP: 1})
	})
}

// natPktRouted is p's frame as toUplinkRun sends it.
func natPktRouted(w *natWorld, p natPkt) []byte {
	p.srcMAC, p.dstMAC = w.uplinkMAC, net.HardwareAddr{2, 0, 0, 0, 0, 2}
	if p.ttl == 0 {
		p.ttl = 63
	}
	return p.frame()
}

// TestShapedOffUplink: a shaped pod's packet that must be masqueraded but
// that the node routes out of another interface than the uplink is dropped
// at tern_from_pod, as snat_out drops the others' (the uplink's egress,
// where shaped pods are masqueraded, would never see it: it would leave
// with the pod's address). Without masquerade it passes.
func TestShapedOffUplink(t *testing.T) {
	w := newNATWorld(t, natOptions{})
	elsewhere := netip.MustParseAddr("198.18.0.5")
	err := w.ns.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "noth"}, PeerName: "nothp"}); err != nil {
			return err
		}
		for _, name := range []string{"noth", "nothp"} {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
		}
		l, err := netlink.LinkByName("noth")
		if err != nil {
			return err
		}
		_, dst, _ := net.ParseCIDR("198.18.0.0/24")
		return netlink.RouteAdd(&netlink.Route{Dst: dst, LinkIndex: l.Attrs().Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	pkt := natPkt{dst: elsewhere, proto: unix.IPPROTO_TCP, sport: 40000, dport: 80, tcpFlags: natTCPSyn}

	w.reset(t)
	if v, _ := w.fromPodRun(t, w.a, pkt); v != natActShot {
		t.Errorf("unflagged a: verdict %d, want %d", v, natActShot)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_DROP_NAT_NO_ROUTE: 1})

	w.reset(t)
	w.shape(t, w.a, true)
	if v, _ := w.fromPodRun(t, w.a, pkt); v != natActShot {
		t.Errorf("shaped a: verdict %d, want %d (dropped, not left to the stack)", v, natActShot)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_DROP_NAT_NO_ROUTE: 1})

	w.reset(t)
	w.shape(t, w.c, true)
	if v, _ := w.fromPodRun(t, w.c, pkt); v != natActOK {
		t.Errorf("shaped c without ipMasq: verdict %d, want %d", v, natActOK)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_PASS_SHAPED: 1})
}
