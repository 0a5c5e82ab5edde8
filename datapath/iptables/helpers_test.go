package iptables

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/datapath"
)

// The helpers below build a small world of network namespaces: a "node"
// that the datapath runs in, "pods" connected to it by veth pairs whose
// host ends live in the node, and an "external" host. Namespaces are
// anonymous (ns.TempNetNS): they never show in `ip netns list`, and the
// kernel destroys them, with their links and iptables tables, when the
// test closes them. Nothing here touches the root namespace.

// newNS returns a fresh network namespace, closed when the test ends.
func newNS(t *testing.T) ns.NetNS {
	t.Helper()
	n, err := ns.TempNetNS()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("close netns: %v", err)
		}
	})
	return n
}

// do runs f inside netns n on a locked OS thread, failing the test on error.
func do(t *testing.T, n ns.NetNS, f func() error) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// doErr runs f inside netns n and returns its error.
func doErr(n ns.NetNS, f func() error) error {
	return n.Do(func(ns.NetNS) error { return f() })
}

// run executes a command inside netns n (the child inherits the namespace
// of the locked thread that forks it) and returns its combined output.
func run(n ns.NetNS, name string, args ...string) (string, error) {
	var out []byte
	err := n.Do(func(ns.NetNS) error {
		var err error
		out, err = exec.Command(name, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
		}
		return nil
	})
	return string(out), err
}

// mustRun is run that fails the test on error.
func mustRun(t *testing.T, n ns.NetNS, name string, args ...string) string {
	t.Helper()
	out, err := run(n, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// ping sends count echo requests from netns n to dst, waiting a second for
// each reply, and reports whether any came back.
func ping(n ns.NetNS, dst net.IP, count int) error {
	_, err := run(n, "ping", "-n", "-q", "-c", strconv.Itoa(count), "-W", "1", dst.String())
	return err
}

// linkUp brings the named link up inside the current namespace.
func linkUp(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	return netlink.LinkSetUp(l)
}

// addVeth creates a veth pair in node, named hostName there, with its peer
// moved into other and named peerName. It returns the node-side link.
func addVeth(t *testing.T, node, other ns.NetNS, hostName, peerName string) netlink.Link {
	t.Helper()
	var host netlink.Link
	do(t, node, func() error {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = hostName
		veth := &netlink.Veth{LinkAttrs: attrs, PeerName: peerName, PeerNamespace: netlink.NsFd(int(other.Fd()))}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s/%s: %w", hostName, peerName, err)
		}
		var err error
		host, err = netlink.LinkByName(hostName)
		return err
	})
	return host
}

// configureIface gives the named link in the current namespace an address
// and brings it and lo up, plus a default route via gw when gw is not nil.
func configureIface(name string, addr *net.IPNet, gw net.IP) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: addr}); err != nil {
		return fmt.Errorf("add %s to %s: %w", addr, name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("bring %s up: %w", name, err)
	}
	if err := linkUp("lo"); err != nil {
		return err
	}
	if gw == nil {
		return nil
	}
	route := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}}
	if err := netlink.RouteAdd(route); err != nil {
		return fmt.Errorf("add default route via %s: %w", gw, err)
	}
	return nil
}

// fakePod is a pod namespace wired the way the CNI layer does it.
type fakePod struct {
	ns ns.NetNS
	ep *datapath.Endpoint
}

// newPod creates a pod namespace with eth0 at addr (default route via gw)
// and its host veth hostVeth in node, and returns it with the endpoint the
// CNI layer would hand the datapath.
func newPod(t *testing.T, node ns.NetNS, hostVeth string, addr *net.IPNet, gw net.IP) *fakePod {
	t.Helper()
	podNS := newNS(t)
	host := addVeth(t, node, podNS, hostVeth, "eth0")
	var podMAC net.HardwareAddr
	do(t, podNS, func() error {
		if err := configureIface("eth0", addr, gw); err != nil {
			return err
		}
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		podMAC = l.Attrs().HardwareAddr
		return nil
	})
	return &fakePod{ns: podNS, ep: &datapath.Endpoint{
		PodMAC:      podMAC,
		ContainerID: "c-" + hostVeth,
		IfName:      "eth0",
		HostVeth:    hostVeth,
		HostIfindex: host.Attrs().Index,
		HostMAC:     host.Attrs().HardwareAddr,
		IP:          *addr,
		Gateway:     gw,
	}}
}

// cidr parses s, keeping the host bits (10.0.0.2/24 stays 10.0.0.2).
func cidr(t *testing.T, s string) *net.IPNet {
	t.Helper()
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		t.Fatal(err)
	}
	n.IP = ip.To4()
	return n
}

// savedRule is one rule line of iptables-save -c.
type savedRule struct {
	table   string
	chain   string
	packets uint64
	line    string // "-A CHAIN ..." without the counters
}

var counterRE = regexp.MustCompile(`^\[(\d+):(\d+)\] (-A (\S+) .*)$`)

// iptablesSave parses iptables-save -c run inside node.
func iptablesSave(t *testing.T, node ns.NetNS) []savedRule {
	t.Helper()
	out := mustRun(t, node, "iptables-save", "-c")
	var rules []savedRule
	table := ""
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "*") {
			table = l[1:]
			continue
		}
		m := counterRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		pk, _ := strconv.ParseUint(m[1], 10, 64)
		rules = append(rules, savedRule{table: table, chain: m[4], packets: pk, line: m[3]})
	}
	return rules
}

// rulesIn returns the rules of table/chain.
func rulesIn(rules []savedRule, table, chain string) []savedRule {
	var out []savedRule
	for _, r := range rules {
		if r.table == table && r.chain == chain {
			out = append(out, r)
		}
	}
	return out
}

// jumpsIn returns the rules of table/chain that jump to target.
func jumpsIn(rules []savedRule, table, chain, target string) []savedRule {
	var out []savedRule
	for _, r := range rulesIn(rules, table, chain) {
		if strings.HasSuffix(r.line, " -j "+target) {
			out = append(out, r)
		}
	}
	return out
}

// packetsOf returns the packet counter of the rule of table whose line is
// exactly line, failing the test if there is not exactly one.
func packetsOf(t *testing.T, rules []savedRule, table, line string) uint64 {
	t.Helper()
	var found []savedRule
	for _, r := range rules {
		if r.table == table && r.line == line {
			found = append(found, r)
		}
	}
	if len(found) != 1 {
		t.Fatalf("want exactly one %q rule in %s, have %d", line, table, len(found))
	}
	return found[0].packets
}
