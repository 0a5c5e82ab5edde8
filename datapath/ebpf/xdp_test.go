package ebpf

import (
	"net"
	"testing"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/loader"
)

// TestNodePortAcceleration: EnsureNode puts the XDP program on the uplink
// when services "ebpf" asks for it ("xdp", "auto"), moves it with the
// uplink, takes it off for "none" and when the node is released; where the
// uplink has no native XDP (a bridge), "auto" falls back to tc alone and
// "xdp" fails.
func TestNodePortAcceleration(t *testing.T) {
	n := newSNATNode(t)
	n.do(t, func() error {
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "snbr0"}}); err != nil {
			return err
		}
		lk, err := netlinksafe.LinkByName("snbr0")
		if err != nil {
			return err
		}
		addr, _ := netlink.ParseAddr("203.0.113.1/24")
		if err := netlink.AddrAdd(lk, addr); err != nil {
			return err
		}
		return netlink.LinkSetUp(lk)
	})
	dp := func(uplink string, accel Acceleration) *Datapath {
		var up Uplink
		n.do(t, func() error {
			var err error
			up, err = ResolveUplink(uplink)
			return err
		})
		_, cluster, _ := net.ParseCIDR("10.244.0.0/16")
		d := New(Config{BPFFSDir: n.bpffs, StateDir: n.state, Uplink: up, IPMasq: true, ClusterCIDR: cluster,
			LoadBalancer: true, Acceleration: accel})
		t.Cleanup(d.Close)
		return d
	}
	xdpOn := func(ifname string) bool {
		var on bool
		n.do(t, func() error {
			lk, err := netlinksafe.LinkByName(ifname)
			if err != nil {
				return err
			}
			on = lk.Attrs().Xdp != nil && lk.Attrs().Xdp.Attached
			return nil
		})
		return on
	}
	ensure := func(d *Datapath) error {
		var err error
		n.do(t, func() error { err = d.EnsureNode(); return nil })
		return err
	}
	check := func(step string, up, alt, br bool) {
		t.Helper()
		if got := [3]bool{xdpOn(n.up), xdpOn(n.alt), xdpOn("snbr0")}; got != [3]bool{up, alt, br} {
			t.Errorf("%s: XDP on %s, %s, snbr0: %v, want %v", step, n.up, n.alt, got, [3]bool{up, alt, br})
		}
	}

	if err := ensure(dp(n.up, AccelerationXDP)); err != nil {
		t.Fatal(err)
	}
	check("xdp", true, false, false)
	if err := ensure(dp(n.up, AccelerationXDP)); err != nil { // idempotent
		t.Fatal(err)
	}
	moved := dp(n.alt, AccelerationAuto)
	if err := ensure(moved); err != nil {
		t.Fatal(err)
	}
	check("auto, uplink moved", false, true, false)
	if got, _ := moved.loader.Attachments(loader.HookUplinkXDP); len(got) != 1 || got[0] != n.alt {
		t.Errorf("XDP attachments on record: %v, want [%s]", got, n.alt)
	}
	if err := ensure(dp(n.alt, AccelerationNone)); err != nil {
		t.Fatal(err)
	}
	check("none", false, false, false)

	// No native XDP on a bridge.
	if err := ensure(dp("snbr0", AccelerationAuto)); err != nil {
		t.Errorf("auto on a bridge: %v, want tc alone", err)
	}
	check("auto on a bridge", false, false, false)
	if err := ensure(dp("snbr0", AccelerationXDP)); err == nil {
		t.Error("xdp on a bridge: EnsureNode passed")
	}

	// The node released: nothing left.
	last := dp(n.up, AccelerationXDP)
	if err := ensure(last); err != nil {
		t.Fatal(err)
	}
	check("xdp again", true, false, false)
	n.do(t, func() error { return last.ReleaseNode(0) })
	check("released", false, false, false)
}
