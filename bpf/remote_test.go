package bpf

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Multi-node tests (lib/remote.h): tern_from_pod sending to a pod of
// another node, tern_from_uplink receiving from one (native routing), and
// tern_from_tunnel, run through BPF_PROG_TEST_RUN in the SNAT tests' node
// namespace (natWorld). Node 192.0.2.3, on the uplink's subnet, owns the
// pod CIDR 10.244.2.0/24 (natOtherPod is in it); the namespace has the
// native route to it, as package routing installs it.
var (
	remoteNode = netip.MustParseAddr("192.0.2.3")
	remoteCIDR = netip.MustParsePrefix("10.244.2.0/24")
)

type remoteWorld struct {
	*natWorld
	fromTunnel *ebpf.Program
	tunnel     int // a VXLAN device's ifindex (external mode)
}

func newRemoteWorld(t testing.TB) *remoteWorld {
	t.Helper()
	w := &remoteWorld{natWorld: newNATWorld(t, natOptions{})}
	spec, err := LoadTernTunnel()
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
	w.fromTunnel = coll.Programs[TernTunnelProgTernFromTunnel]
	err = w.ns.Do(func(ns.NetNS) error {
		dst := net.IPNet{IP: remoteCIDR.Addr().AsSlice(), Mask: net.CIDRMask(remoteCIDR.Bits(), 32)}
		if err := netlink.RouteAdd(&netlink.Route{Dst: &dst, Gw: remoteNode.AsSlice(), LinkIndex: w.uplink}); err != nil {
			return err
		}
		if err := netlink.LinkAdd(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "rvx"}, FlowBased: true, Port: 8472}); err != nil {
			return err
		}
		lk, err := netlink.LinkByName("rvx")
		if err != nil {
			return err
		}
		w.tunnel = lk.Attrs().Index
		return netlink.LinkSetUp(lk)
	})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// setRemote makes remoteCIDR belong to remoteNode, natively routed or
// through the tunnel.
func (w *remoteWorld) setRemote(t testing.TB, tunnel bool) {
	t.Helper()
	v := TernRemoteNode{NodeIp: natAddr(remoteNode)}
	if tunnel {
		v.TunnelIfindex = uint32(w.tunnel)
	}
	k := TernLpmV4Key{Prefixlen: uint32(remoteCIDR.Bits()), Addr: natAddr(remoteCIDR.Addr())}
	if err := w.maps[TernMapTernRemote].Put(k, v); err != nil {
		t.Fatal(err)
	}
}

func (w *remoteWorld) clearRemote(t *testing.T) {
	t.Helper()
	k := TernLpmV4Key{Prefixlen: uint32(remoteCIDR.Bits()), Addr: natAddr(remoteCIDR.Addr())}
	_ = w.maps[TernMapTernRemote].Delete(k)
}

// TestRemote: the multi-node branches, one packet each.
func TestRemote(t *testing.T) {
	w := newRemoteWorld(t)
	udpTo := func(src, dst netip.Addr, ttl uint8) natPkt {
		return natPkt{src: src, dst: dst, ttl: ttl, proto: unix.IPPROTO_UDP, sport: 4000, dport: 53, payload: []byte("remote")}
	}
	for _, c := range []struct {
		name        string
		remote      string // "", "native", "vxlan": the tern_remote entry for remoteCIDR
		run         func(t *testing.T) (uint32, []byte)
		wantVerdict uint32
		wantMetric  TernMetric
		check       func(t *testing.T, out []byte)
	}{{
		// A pod's UDP to a pod of node 192.0.2.3, native: FIB lookup,
		// TTL decremented, bpf_redirect_neigh (TC_ACT_REDIRECT), no
		// masquerade (source unchanged).
		name: "pod to remote pod, native", remote: "native",
		run:         func(t *testing.T) (uint32, []byte) { return w.fromPodRun(t, w.a, udpTo(netip.Addr{}, natOtherPod, 0)) },
		wantVerdict: natActRedirect, wantMetric: TernMetricMETRIC_REMOTE_NATIVE,
		check: func(t *testing.T, out []byte) {
			if out[14+8] != 63 {
				t.Errorf("TTL %d, want 63", out[14+8])
			}
			if !bytes.Equal(out[14+12:14+16], w.a.ip.AsSlice()) {
				t.Errorf("source %v, want the pod's own %s", net.IP(out[14+12:14+16]), w.a.ip)
			}
		},
	}, {
		// The same packet in VXLAN mode: tunnel key set, redirected to
		// the VXLAN device.
		name: "pod to remote pod, vxlan", remote: "vxlan",
		run:         func(t *testing.T) (uint32, []byte) { return w.fromPodRun(t, w.a, udpTo(netip.Addr{}, natOtherPod, 0)) },
		wantVerdict: natActRedirect, wantMetric: TernMetricMETRIC_REMOTE_VXLAN,
		check: func(t *testing.T, out []byte) {
			if out[14+8] != 63 {
				t.Errorf("TTL %d, want 63", out[14+8])
			}
		},
	}, {
		// TTL 1: the stack answers with time exceeded.
		name: "pod to remote pod, TTL 1", remote: "vxlan",
		run:         func(t *testing.T) (uint32, []byte) { return w.fromPodRun(t, w.a, udpTo(netip.Addr{}, natOtherPod, 1)) },
		wantVerdict: natActOK, wantMetric: TernMetricMETRIC_PASS_TTL,
	}, {
		// Without the entry, the cluster address is left to the stack
		// (not masqueraded: inside the cluster CIDR), as before.
		name: "pod to unknown cluster address", remote: "",
		run:         func(t *testing.T) (uint32, []byte) { return w.fromPodRun(t, w.a, udpTo(netip.Addr{}, natOtherPod, 0)) },
		wantVerdict: natActOK, wantMetric: TernMetricMETRIC_PASS_HOST,
	}, {
		// A remote pod's packet arriving on the uplink for local pod b:
		// redirect_peer with b's MACs and TTL - 1.
		name: "remote pod to local pod on the uplink, native", remote: "native",
		run: func(t *testing.T) (uint32, []byte) {
			return w.fromUplinkRun(t, udpTo(natOtherPod, w.b.ip, 0))
		},
		wantVerdict: natActRedirect, wantMetric: TernMetricMETRIC_FROM_REMOTE,
		check: func(t *testing.T, out []byte) {
			if !bytes.Equal(out[0:6], w.b.mac) || !bytes.Equal(out[6:12], w.b.hostMAC) {
				t.Errorf("MACs %v > %v, want %v > %v", net.HardwareAddr(out[6:12]), net.HardwareAddr(out[0:6]), w.b.hostMAC, w.b.mac)
			}
			if out[14+8] != 63 {
				t.Errorf("TTL %d, want 63", out[14+8])
			}
		},
	}, {
		// The same packet answering a flow the host stack DNATed to that
		// remote pod (kube-proxy; tern_to_uplink recorded it in
		// tern_stack_ct as b:53 -> the remote pod:4000 left): to the
		// stack, whose conntrack reverses the DNAT, not into b.
		name: "remote backend's answer to a stack-DNATed flow, native", remote: "native",
		run: func(t *testing.T) (uint32, []byte) {
			noteStackFlow(t, w.maps, w.b.ip, 53, natOtherPod, 4000, unix.IPPROTO_UDP, 0)
			return w.fromUplinkRun(t, udpTo(natOtherPod, w.b.ip, 0))
		},
		wantVerdict: natActOK, wantMetric: TernMetricMETRIC_REMOTE_STACK_REPLY,
		check: func(t *testing.T, out []byte) {
			if out[14+8] != 64 {
				t.Errorf("TTL %d, want 64 (untouched: the stack forwards it)", out[14+8])
			}
		},
	}, {
		// A VXLAN node's pod address arriving unencapsulated: forged.
		name: "vxlan node's pod on the uplink", remote: "vxlan",
		run: func(t *testing.T) (uint32, []byte) {
			return w.fromUplinkRun(t, udpTo(natOtherPod, w.b.ip, 0))
		},
		wantVerdict: natActShot, wantMetric: TernMetricMETRIC_DROP_TUNNEL_FORGED,
	}, {
		// On the VXLAN device, a packet without tunnel metadata (not
		// decapsulated by an external device: no outer source to check)
		// is never from the owner.
		name: "tunnel without key", remote: "vxlan",
		run: func(t *testing.T) (uint32, []byte) {
			p := udpTo(natOtherPod, w.b.ip, 0)
			p.srcMAC, p.dstMAC = net.HardwareAddr{2, 0, 0, 0, 0, 3}, net.HardwareAddr{2, 0, 0, 0, 0, 4}
			return w.run(t, w.fromTunnel, w.tunnel, p.frame())
		},
		wantVerdict: natActShot, wantMetric: TernMetricMETRIC_DROP_TUNNEL_FORGED,
	}, {
		// An inner source in no known pod CIDR is dropped before the key
		// is even read.
		name: "tunnel from unknown pod CIDR", remote: "",
		run: func(t *testing.T) (uint32, []byte) {
			p := udpTo(natServer, w.b.ip, 0)
			p.srcMAC, p.dstMAC = net.HardwareAddr{2, 0, 0, 0, 0, 3}, net.HardwareAddr{2, 0, 0, 0, 0, 4}
			return w.run(t, w.fromTunnel, w.tunnel, p.frame())
		},
		wantVerdict: natActShot, wantMetric: TernMetricMETRIC_DROP_TUNNEL_FORGED,
	}} {
		t.Run(c.name, func(t *testing.T) {
			w.reset(t)
			w.clearRemote(t)
			if c.remote != "" {
				w.setRemote(t, c.remote == "vxlan")
			}
			verdict, out := c.run(t)
			if verdict != c.wantVerdict {
				t.Errorf("verdict %#x, want %#x", verdict, c.wantVerdict)
			}
			w.wantMetrics(t, map[TernMetric]uint64{c.wantMetric: 1})
			if c.check != nil {
				c.check(t, out)
			}
		})
	}
}

// TestStackOwnedHint: a flow's policy conntrack entry remembers that the
// host stack has no part in it (POLICY_CT_F_NO_STACK, set when stack_owned
// found no tern_stack_ct flow), and the flow's later packets skip that
// lookup, both ways across nodes: a pod's packet to a remote pod
// (tern_from_pod) and a remote pod's packet to a local one
// (tern_from_uplink). A tern_stack_ct entry written under the mark (not as
// stack_note_delivered writes it: it clears the mark) is not seen: the
// proof that the lookup is skipped. Written as stack_note_delivered
// writes it, the flow's packets go to the stack again. A flow the stack
// delivered first never gets the mark.
func TestStackOwnedHint(t *testing.T) {
	w := newRemoteWorld(t)
	udpP := uint8(unix.IPPROTO_UDP)
	noStack := uint16(TernPolicyCtFlagsPOLICY_CT_F_NO_STACK)
	policyFlags := func(t *testing.T, a netip.Addr, ap uint16, b netip.Addr, bp uint16) uint16 {
		t.Helper()
		k, _ := stackKey(a, ap, b, bp, udpP)
		var e TernPolicyCtEntry
		if err := w.maps[TernMapTernPolicyCtOther].Lookup(k, &e); err != nil {
			t.Fatalf("no policy conntrack entry for %v:%d <-> %v:%d: %v", a, ap, b, bp, err)
		}
		return e.Flags
	}
	want := func(t *testing.T, what string, got, want uint32) {
		t.Helper()
		if got != want {
			t.Errorf("%s: verdict %#x, want %#x", what, got, want)
		}
	}

	for _, c := range []struct {
		name   string
		run    func(t *testing.T) uint32
		a      netip.Addr // the flow's ends, as stackKey takes them
		ap, bp uint16
		b      netip.Addr
	}{{
		name: "pod to remote pod (tern_from_pod)",
		run: func(t *testing.T) uint32 {
			v, _ := w.fromPodRun(t, w.a, natPkt{dst: natOtherPod, proto: udpP, sport: 41000, dport: 53, payload: []byte("hint")})
			return v
		},
		a: w.a.ip, ap: 41000, b: natOtherPod, bp: 53,
	}, {
		name: "remote pod to pod (tern_from_uplink)",
		run: func(t *testing.T) uint32 {
			v, _ := w.fromUplinkRun(t, natPkt{src: natOtherPod, dst: w.b.ip, proto: udpP, sport: 41001, dport: 53, payload: []byte("hint")})
			return v
		},
		a: natOtherPod, ap: 41001, b: w.b.ip, bp: 53,
	}} {
		t.Run(c.name, func(t *testing.T) {
			w.reset(t)
			w.setRemote(t, false)
			want(t, "first packet", c.run(t), natActRedirect)
			if f := policyFlags(t, c.a, c.ap, c.b, c.bp); f&noStack == 0 {
				t.Fatalf("policy conntrack flags %#x after the first packet, want NO_STACK", f)
			}
			putStackFlow(t, w.maps, c.a, c.ap, c.b, c.bp, udpP, 0)
			want(t, "under the mark, a tern_stack_ct entry written past stack_note_delivered", c.run(t), natActRedirect)
			noteStackFlow(t, w.maps, c.a, c.ap, c.b, c.bp, udpP, 0)
			want(t, "after stack_note_delivered", c.run(t), natActOK)
			if f := policyFlags(t, c.a, c.ap, c.b, c.bp); f&noStack != 0 {
				t.Errorf("policy conntrack flags %#x after a packet to the stack, want no NO_STACK", f)
			}
		})
	}

	t.Run("a flow the stack delivered first", func(t *testing.T) {
		w.reset(t)
		w.setRemote(t, false)
		// The stack DNATed a:41002 -> ClusterIP to the remote pod
		// (tern_to_uplink recorded it); its answers come back to a.
		noteStackFlow(t, w.maps, w.a.ip, 41002, natOtherPod, 53, udpP, 0)
		answer := func(t *testing.T) uint32 {
			v, _ := w.fromUplinkRun(t, natPkt{src: natOtherPod, dst: w.a.ip, proto: udpP, sport: 53, dport: 41002, payload: []byte("hint")})
			return v
		}
		for i := range 2 {
			want(t, fmt.Sprintf("answer %d", i+1), answer(t), natActOK)
		}
		if f := policyFlags(t, w.a.ip, 41002, natOtherPod, 53); f&noStack != 0 {
			t.Errorf("policy conntrack flags %#x, want no NO_STACK", f)
		}
	})
}

// TestRemoteFIBCache: tern_from_pod asks the FIB where a remote node's pods
// are once per REMOTE_FIB_TTL_NS and keeps the answer in the node's
// tern_remote entry (lib/remote.h): a packet with the answer fresh follows
// it without a lookup (a route changed meanwhile is not seen), an expired
// answer is looked up again (the new route is followed), package routing's
// rewrite of the entry (zeros) drops it, a packet larger than the cached
// MTU asks the FIB (FRAG_NEEDED: to the stack, for path MTU discovery), and
// a failed lookup caches nothing.
func TestRemoteFIBCache(t *testing.T) {
	w := newRemoteWorld(t)
	w.reset(t)
	w.clearRemote(t)
	w.setRemote(t, false)
	key := TernLpmV4Key{Prefixlen: uint32(remoteCIDR.Bits()), Addr: natAddr(remoteCIDR.Addr())}
	entry := func() TernRemoteNode {
		t.Helper()
		var v TernRemoteNode
		if err := w.maps[TernMapTernRemote].Lookup(key, &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	gateway := netip.MustParseAddr("192.0.2.4") // another host on the uplink's subnet
	dst := net.IPNet{IP: remoteCIDR.Addr().AsSlice(), Mask: net.CIDRMask(remoteCIDR.Bits(), 32)}
	route := func(via netip.Addr) {
		t.Helper()
		err := w.ns.Do(func(ns.NetNS) error {
			return netlink.RouteReplace(&netlink.Route{Dst: &dst, Gw: via.AsSlice(), LinkIndex: w.uplink})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var mtu int
	if err := w.ns.Do(func(ns.NetNS) error {
		lk, err := netlink.LinkByIndex(w.uplink)
		if err == nil {
			mtu = lk.Attrs().MTU
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	send := func(payload int) uint32 {
		t.Helper()
		p := natPkt{dst: natOtherPod, proto: unix.IPPROTO_UDP, sport: 4000, dport: 53, payload: make([]byte, payload)}
		v, _ := w.fromPodRun(t, w.a, p)
		return v
	}
	wantCached := func(step string, nh netip.Addr) {
		t.Helper()
		e := entry()
		if e.FibUntil == 0 || e.FibIfindex != uint32(w.uplink) || e.FibNh != natAddr(nh) || e.FibMtu != uint32(mtu) {
			t.Errorf("%s: entry %+v, want the answer cached: uplink %d, next hop %s, MTU %d", step, e, w.uplink, nh, mtu)
		}
	}

	if e := entry(); e.FibUntil != 0 {
		t.Fatalf("a new entry has an answer cached: %+v", e)
	}
	if v := send(32); v != natActRedirect {
		t.Fatalf("first packet: verdict %#x, want redirect", v)
	}
	wantCached("first packet", remoteNode)
	first := entry()

	// The route moves; the answer is fresh: the next packet does not ask.
	route(gateway)
	if v := send(32); v != natActRedirect {
		t.Fatalf("cached: verdict %#x, want redirect", v)
	}
	if e := entry(); e != first {
		t.Errorf("a packet with the answer fresh looked the FIB up again: %+v, was %+v", e, first)
	}

	// Expired: asked again, the new route is followed.
	stale := first
	stale.FibUntil = 1
	if err := w.maps[TernMapTernRemote].Put(key, stale); err != nil {
		t.Fatal(err)
	}
	if v := send(32); v != natActRedirect {
		t.Fatalf("expired: verdict %#x, want redirect", v)
	}
	wantCached("after expiry", gateway)

	// Larger than the cached MTU allows: the FIB decides (FRAG_NEEDED:
	// the stack answers the pod), the cache stays as it is.
	before := entry()
	w.reset(t)
	if v := send(mtu + 100); v != natActOK {
		t.Errorf("oversized packet: verdict %#x, want the stack's (FRAG_NEEDED)", v)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_PASS_HOST: 1})
	if e := entry(); e != before {
		t.Errorf("the oversized packet changed the cache: %+v, was %+v", e, before)
	}

	// Package routing writes the entry again (zeros): nothing cached; a
	// failed lookup (the pod CIDR made unreachable) leaves it so.
	w.setRemote(t, false)
	err := w.ns.Do(func(ns.NetNS) error {
		return netlink.RouteReplace(&netlink.Route{Dst: &dst, Type: unix.RTN_UNREACHABLE})
	})
	if err != nil {
		t.Fatal(err)
	}
	w.reset(t)
	if v := send(32); v != natActOK {
		t.Errorf("unreachable: verdict %#x, want the stack's", v)
	}
	if e := entry(); e.FibUntil != 0 {
		t.Errorf("a failed lookup was cached: %+v", e)
	}
	route(remoteNode)
	if v := send(32); v != natActRedirect {
		t.Fatalf("route back: verdict %#x, want redirect", v)
	}
	wantCached("route back", remoteNode)
}
