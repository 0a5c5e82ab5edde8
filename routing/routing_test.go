package routing

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/internal/testutil"
)

// fakeTable records what Sync hands the datapath, in order.
type fakeTable struct {
	calls   []string
	remotes []datapath.Remote
}

func (f *fakeTable) SyncRemotes(r []datapath.Remote) error {
	f.calls = append(f.calls, "sync")
	f.remotes = r
	return nil
}

func (f *fakeTable) AttachTunnel(ifname string, _ int) error {
	f.calls = append(f.calls, "attach "+ifname)
	return nil
}

func (f *fakeTable) DetachTunnel(ifname string) error {
	f.calls = append(f.calls, "detach "+ifname)
	return nil
}

func cidr(s string) net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return *n
}

func nodes(n2IP string, withN3 bool) []Node {
	out := []Node{
		{Name: "n1", IP: net.ParseIP("192.168.90.1"), PodCIDRs: []net.IPNet{cidr("10.90.1.0/24")}},
		{Name: "n2", IP: net.ParseIP(n2IP), PodCIDRs: []net.IPNet{cidr("10.90.2.0/24"), cidr("10.90.102.0/24")}},
	}
	if withN3 {
		out = append(out, Node{Name: "n3", IP: net.ParseIP("192.168.90.3"), PodCIDRs: []net.IPNet{cidr("10.90.3.0/24")}})
	}
	return out
}

// node makes a namespace with uplink "up0" (192.168.90.1/24, MTU 1500).
func node(t *testing.T) ns.NetNS {
	t.Helper()
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "rt")
	for _, c := range [][]string{
		{"ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p"}, // no dummy devices in this kernel
		{"ip", "addr", "add", "192.168.90.1/24", "dev", "up0"},
		{"ip", "link", "set", "up0", "up"},
		{"ip", "link", "set", "up0p", "up"},
	} {
		if _, err := testutil.ExecIn(n, c[0], c[1:]...); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// routeEvents runs fn in n and returns the route changes it made, as
// "new <dst>" and "del <dst>".
func routeEvents(t *testing.T, n ns.NetNS, fn func() error) []string {
	t.Helper()
	var events []string
	err := n.Do(func(ns.NetNS) error {
		ch, done := make(chan netlink.RouteUpdate, 64), make(chan struct{})
		if err := netlink.RouteSubscribe(ch, done); err != nil {
			return err
		}
		defer close(done)
		if err := fn(); err != nil {
			return err
		}
		for {
			select {
			case u := <-ch:
				if u.Protocol != RouteProtocol || u.Dst == nil {
					continue
				}
				verb := "new"
				if u.Type == 25 { // RTM_DELROUTE
					verb = "del"
				}
				events = append(events, verb+" "+u.Dst.String())
			case <-time.After(300 * time.Millisecond):
				slices.Sort(events)
				return nil
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return events
}

func ipRoutes(t *testing.T, n ns.NetNS) string {
	t.Helper()
	out, err := testutil.ExecIn(n, "ip", "-4", "-d", "route", "show", "proto", fmt.Sprint(int(RouteProtocol)))
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestSyncNative: a route per remote pod CIDR via its node, none for this
// node's own; a second Sync with the same nodes changes nothing (no route
// deleted and re-added, not even briefly); a node's new IP replaces
// its routes in place (no delete); a node that leaves takes its route, and
// only its route, with it.
func TestSyncNative(t *testing.T) {
	n := node(t)
	tbl := &fakeTable{}
	r, err := New(Config{LocalIP: net.ParseIP("192.168.90.1"), Table: tbl})
	if err != nil {
		t.Fatal(err)
	}
	got := routeEvents(t, n, func() error { return r.Sync(nodes("192.168.90.2", true)) })
	if want := []string{"new 10.90.102.0/24", "new 10.90.2.0/24", "new 10.90.3.0/24"}; !slices.Equal(got, want) {
		t.Errorf("first sync: route events %v, want %v", got, want)
	}
	if out := ipRoutes(t, n); !strings.Contains(out, "10.90.2.0/24 via 192.168.90.2 dev up0") || !strings.Contains(out, "10.90.3.0/24 via 192.168.90.3 dev up0") {
		t.Errorf("routes:\n%s", out)
	}
	if len(tbl.remotes) != 3 || tbl.remotes[0].TunnelIfindex != 0 {
		t.Errorf("table got %+v, want 3 native entries", tbl.remotes)
	}
	if got := routeEvents(t, n, func() error { return r.Sync(nodes("192.168.90.2", true)) }); len(got) != 0 {
		t.Errorf("unchanged sync: route events %v, want none", got)
	}
	got = routeEvents(t, n, func() error { return r.Sync(nodes("192.168.90.22", true)) })
	if want := []string{"new 10.90.102.0/24", "new 10.90.2.0/24"}; !slices.Equal(got, want) {
		t.Errorf("node moved: route events %v, want %v (replaced in place)", got, want)
	}
	got = routeEvents(t, n, func() error { return r.Sync(nodes("192.168.90.22", false)) })
	if want := []string{"del 10.90.3.0/24"}; !slices.Equal(got, want) {
		t.Errorf("node left: route events %v, want %v", got, want)
	}
	if err := n.Do(func(ns.NetNS) error { return r.Teardown() }); err != nil {
		t.Fatal(err)
	}
	if out := ipRoutes(t, n); strings.TrimSpace(out) != "" {
		t.Errorf("after teardown:\n%s", out)
	}
}

// TestSyncVXLAN: the external VXLAN device (port 8472, MTU uplink - 50,
// MAC from the node IP), its program attached before the table gets
// entries pointing at it, encapsulating routes and permanent neighbours per
// remote node; a leaving node's neighbour goes; teardown removes the
// device.
func TestSyncVXLAN(t *testing.T) {
	n := node(t)
	tbl := &fakeTable{}
	r, err := New(Config{Mode: ModeVXLAN, LocalIP: net.ParseIP("192.168.90.1"), Uplink: "up0", Table: tbl})
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Do(func(ns.NetNS) error { return r.Sync(nodes("192.168.90.2", true)) }); err != nil {
		t.Fatal(err)
	}
	var dev *netlink.Vxlan
	var neighs []netlink.Neigh
	err = n.Do(func(ns.NetNS) error {
		lk, err := netlink.LinkByName(DefaultDevice)
		if err != nil {
			return err
		}
		dev = lk.(*netlink.Vxlan)
		neighs, err = netlink.NeighList(lk.Attrs().Index, netlink.FAMILY_V4)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if !dev.FlowBased || dev.Port != DefaultPort || dev.MTU != 1450 || dev.HardwareAddr.String() != "0e:7e:c0:a8:5a:01" {
		t.Errorf("device: external %v port %d MTU %d MAC %s", dev.FlowBased, dev.Port, dev.MTU, dev.HardwareAddr)
	}
	if want := []string{"attach " + DefaultDevice, "sync"}; !slices.Equal(tbl.calls, want) {
		t.Errorf("table calls %v, want %v", tbl.calls, want)
	}
	for _, rm := range tbl.remotes {
		if rm.TunnelIfindex != dev.Index {
			t.Errorf("table entry %+v: want tunnel ifindex %d", rm, dev.Index)
		}
	}
	out := ipRoutes(t, n)
	for _, want := range []string{
		"10.90.2.0/24  encap ip id 1 src 0.0.0.0 dst 192.168.90.2 ttl 64",
		"10.90.3.0/24  encap ip id 1 src 0.0.0.0 dst 192.168.90.3 ttl 64",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("routes lack %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "via 192.168.90.3 dev "+DefaultDevice+" scope global src 192.168.90.1 onlink") || !strings.Contains(out, "onlink") {
		t.Errorf("routes not via the device, from the node's IP, onlink:\n%s", out)
	}
	var perm []string
	for _, nb := range neighs {
		if nb.State&netlink.NUD_PERMANENT != 0 {
			perm = append(perm, nb.IP.String()+"="+nb.HardwareAddr.String())
		}
	}
	slices.Sort(perm)
	if want := []string{"192.168.90.2=0e:7e:c0:a8:5a:02", "192.168.90.3=0e:7e:c0:a8:5a:03"}; !slices.Equal(perm, want) {
		t.Errorf("neighbours %v, want %v", perm, want)
	}
	if err := n.Do(func(ns.NetNS) error { return r.Sync(nodes("192.168.90.2", false)) }); err != nil {
		t.Fatal(err)
	}
	if out, _ := testutil.ExecIn(n, "ip", "neigh", "show", "dev", DefaultDevice); strings.Contains(out, "192.168.90.3") {
		t.Errorf("neighbour of the node that left is still there:\n%s", out)
	}
	if err := n.Do(func(ns.NetNS) error { return r.Teardown() }); err != nil {
		t.Fatal(err)
	}
	if out, _ := testutil.ExecIn(n, "ip", "link", "show", DefaultDevice); out != "" {
		t.Errorf("device left after teardown:\n%s", out)
	}
	if tbl.calls[len(tbl.calls)-1] != "detach "+DefaultDevice || len(tbl.remotes) != 0 {
		t.Errorf("teardown: table calls %v, remotes %v", tbl.calls, tbl.remotes)
	}
}

// TestPlanRefuses: what cannot be routed is an error, before anything is
// changed.
func TestPlanRefuses(t *testing.T) {
	if _, err := New(Config{Mode: "geneve"}); err == nil {
		t.Error("mode geneve accepted")
	}
	if _, err := New(Config{Mode: ModeVXLAN}); err == nil {
		t.Error("vxlan without an uplink accepted")
	}
	r, _ := New(Config{})
	for name, ns := range map[string][]Node{
		"two owners": {{Name: "a", IP: net.ParseIP("10.0.0.1"), PodCIDRs: []net.IPNet{cidr("10.1.0.0/24")}},
			{Name: "b", IP: net.ParseIP("10.0.0.2"), PodCIDRs: []net.IPNet{cidr("10.1.0.0/24")}}},
		"IPv6 node": {{Name: "a", IP: net.ParseIP("fd00::1")}},
		"IPv6 CIDR": {{Name: "a", IP: net.ParseIP("10.0.0.1"), PodCIDRs: []net.IPNet{cidr("fd00::/64")}}},
	} {
		if _, _, err := r.plan(ns); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
