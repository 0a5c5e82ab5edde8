package ebpf

import (
	"net"
	"testing"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestEnsureGatewayAddr: ADD looks for the gateway's /32 on lo before it
// asks the kernel to add it (the add waits for the RTNL). The look-up must
// find what the add would find: the same address with the same prefix. A
// covering prefix on lo (a /24 holding the gateway) or another address is
// not it, and the /32 is added; a /32 already there (Tern's or anyone's) is
// left as it is, once.
func TestEnsureGatewayAddr(t *testing.T) {
	testutil.RequirePrivileged(t)
	n := testutil.NewNetNS(t, "gwad")
	gw := net.IPv4(10, 77, 3, 1).To4()
	do := func(f func() error) {
		t.Helper()
		if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
			t.Fatal(err)
		}
	}
	hostAddrs := func() (n32 int, labels []string) {
		t.Helper()
		do(func() error {
			lo, err := netlinksafe.LinkByName("lo")
			if err != nil {
				return err
			}
			addrs, err := netlinksafe.AddrList(lo, netlink.FAMILY_V4)
			for _, a := range addrs {
				if ones, _ := a.Mask.Size(); a.IP.Equal(gw) && ones == 32 {
					n32++
					labels = append(labels, a.Label)
				}
			}
			return err
		})
		return n32, labels
	}
	addOnLo := func(cidr string, label string) {
		t.Helper()
		do(func() error {
			lo, err := netlinksafe.LinkByName("lo")
			if err != nil {
				return err
			}
			a, err := netlink.ParseAddr(cidr)
			if err != nil {
				return err
			}
			a.Label = label
			return netlink.AddrAdd(lo, a)
		})
	}

	// A /24 that holds the gateway is not the gateway's /32.
	addOnLo("10.77.3.1/24", "lo")
	do(func() error { return ensureGatewayAddr(gw) })
	if n32, labels := hostAddrs(); n32 != 1 || labels[0] != gatewayLabel {
		t.Fatalf("after ensure next to a /24: %d /32 addresses %v, want one labelled %q", n32, labels, gatewayLabel)
	}
	do(func() error { return checkGatewayAddr(gw) })

	// Present: nothing added, nothing changed, no error.
	do(func() error { return ensureGatewayAddr(gw) })
	if n32, _ := hostAddrs(); n32 != 1 {
		t.Fatalf("after a second ensure: %d /32 addresses, want 1", n32)
	}

	// Another /32 on lo (a neighbour's gateway) is not this one.
	do(func() error { return removeGatewayAddrs() })
	addOnLo("10.77.4.1/32", "lo:other")
	do(func() error { return ensureGatewayAddr(gw) })
	if n32, labels := hostAddrs(); n32 != 1 || labels[0] != gatewayLabel {
		t.Fatalf("after ensure next to another /32: %d /32 addresses %v, want one labelled %q", n32, labels, gatewayLabel)
	}
}
