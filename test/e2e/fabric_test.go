package e2e

import (
	"fmt"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// fabric is the network between simulated nodes: a network namespace that
// forwards, with a bridge per /24 subnet and its address .254 on each (the
// nodes' gateway there). Nodes on one bridge are adjacent; the fabric
// routes between bridges. Nothing in it knows a pod address, so pods of
// different nodes only meet through Tern's routes or tunnel. It is the
// fabric namespace itself for the tests that send from it.
type fabric struct {
	ns.NetNS
	subnets map[string]string // bridge name -> subnet prefix ("192.0.2.")
	links   int               // uplinks made so far: names their peers
}

// fabricGateway is the fabric's host number on every subnet.
const fabricGateway = "254"

// newFabric makes the fabric namespace with a bridge per entry of subnets
// (bridge name -> subnet prefix, e.g. "brA": "192.0.2.").
func newFabric(t *testing.T, subnets map[string]string) *fabric {
	t.Helper()
	f := &fabric{NetNS: testutil.NewNetNS(t, "fab"), subnets: subnets}
	cmds := [][]string{{"sysctl", "-qw", "net.ipv4.ip_forward=1"}}
	for br, prefix := range subnets {
		cmds = append(cmds,
			[]string{"ip", "link", "add", br, "type", "bridge"},
			[]string{"ip", "addr", "add", prefix + fabricGateway + "/24", "dev", br},
			[]string{"ip", "link", "set", br, "up"})
	}
	for _, cmd := range cmds {
		if _, err := testutil.ExecIn(f, cmd[0], cmd[1:]...); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// link gives node an uplink into the fabric: a veth named uplink in the
// node, its peer on bridge br, the address host of br's subnet and a
// default route via the fabric. It returns the node's address.
func (f *fabric) link(t *testing.T, node *testutil.Node, uplink, br string, host int) string {
	t.Helper()
	prefix, ok := f.subnets[br]
	if !ok {
		t.Fatalf("fabric has no bridge %s", br)
	}
	f.links++
	ip, peer := fmt.Sprintf("%s%d", prefix, host), fmt.Sprintf("up%d", f.links)
	if _, err := node.Exec(t, "ip", "link", "add", uplink, "type", "veth", "peer", "name", peer, "netns", testutil.NSName(f)); err != nil {
		t.Fatalf("uplink veth: %v", err)
	}
	// The node namespace's removal takes the pair too; deleting it first
	// frees the fabric's end even while something still holds the node's.
	t.Cleanup(func() { _, _ = node.Exec(t, "ip", "link", "del", uplink) })
	for _, cmd := range [][]string{
		{"ip", "addr", "add", ip + "/24", "dev", uplink},
		{"ip", "link", "set", uplink, "up"},
		{"ip", "route", "add", "default", "via", prefix + fabricGateway},
	} {
		if _, err := node.Exec(t, cmd[0], cmd[1:]...); err != nil {
			t.Fatal(err)
		}
	}
	for _, cmd := range [][]string{{"ip", "link", "set", peer, "master", br}, {"ip", "link", "set", peer, "up"}} {
		if _, err := testutil.ExecIn(f, cmd[0], cmd[1:]...); err != nil {
			t.Fatal(err)
		}
	}
	return ip
}
