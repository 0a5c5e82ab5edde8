package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/routing"
)

// The multi-node tests simulate nodes as namespaces on a fabric namespace:
//
//	native: node1 192.168.77.1, node2 .2, node3 .3 on one bridge (fab .254)
//	vxlan:  node1 192.168.78.1, node2 .2 on bridge A; node3 192.168.79.3 on
//	        bridge B; the fabric namespace routes between them (.254 on each)
//
// Node i's pods get 10.77.(80+i).0/24 (clusterCIDR 10.77.0.0/16), and the
// nodes learn each other through the routing package, as the node agent
// will configure them: nothing in the fabric knows a pod address, so pods
// of different nodes only meet through Tern's routes or tunnel.
const mnUplink = "up0"

type mnNode struct {
	*testutil.Node
	name    string
	ip      string // InternalIP
	podCIDR string
	conf    []byte
	dp      *ebpfdp.Datapath // eBPF datapath only: the routing table's owner
}

type multiNode struct {
	fab   *fabric
	dp    string
	mode  string
	nodes []*mnNode
}

func (w *multiNode) String() string { return w.dp + "/" + w.mode }

func newMultiNode(t *testing.T, dp, mode string) *multiNode {
	t.Helper()
	subnets := map[string]string{"brA": "192.168.77."}
	if mode == routing.ModeVXLAN {
		subnets = map[string]string{"brA": "192.168.78.", "brB": "192.168.79."}
	}
	w := &multiNode{fab: newFabric(t, subnets), dp: dp, mode: mode}
	for i := 1; i <= 3; i++ {
		br := "brA"
		if mode == routing.ModeVXLAN && i == 3 {
			br = "brB"
		}
		n := &mnNode{Node: testutil.NewNode(t), name: fmt.Sprintf("node%d", i), podCIDR: fmt.Sprintf("10.77.%d.0/24", 80+i)}
		n.ip = w.fab.link(t, n.Node, mnUplink, br, i)
		extra := map[string]any{"uplink": mnUplink, "routing": mode}
		if mode == routing.ModeVXLAN {
			extra["mtu"] = nil // the plugin sizes it: uplink MTU - 50
		}
		n.conf = conflist(t, n.Node, testutil.UniqueName("mn"), netConf{Datapath: dp, Subnet: n.podCIDR, Extra: extra})
		if dp == "ebpf" {
			n.dp = ebpfdp.New(ebpfdp.Config{BPFFSDir: n.BPFFSDir, StateDir: n.StateDir, Network: "routing"})
			t.Cleanup(n.dp.Close)
		}
		w.nodes = append(w.nodes, n)
	}
	// Before the namespaces go: remove what routing made (the netns
	// removal would too, this checks Teardown works).
	t.Cleanup(func() {
		for _, n := range w.nodes {
			if err := n.reconciler(t, w.mode).teardown(n); err != nil {
				t.Errorf("%s: teardown: %v", n.name, err)
			}
		}
	})
	return w
}

type nodeReconciler struct {
	r *routing.Reconciler
}

func (n *mnNode) reconciler(t *testing.T, mode string) nodeReconciler {
	t.Helper()
	cfg := routing.Config{Mode: mode, LocalIP: net.ParseIP(n.ip), Uplink: mnUplink}
	if n.dp != nil {
		cfg.Table = n.dp
	}
	r, err := routing.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return nodeReconciler{r}
}

func (nr nodeReconciler) teardown(n *mnNode) error {
	return n.NS.Do(func(ns.NetNS) error { return nr.r.Teardown() })
}

// clusterNodes is the node list the agent would read from Node objects.
func (w *multiNode) clusterNodes(except ...string) []routing.Node {
	var out []routing.Node
	for _, n := range w.nodes {
		if strings.Contains(strings.Join(except, ","), n.name) {
			continue
		}
		_, cidr, _ := net.ParseCIDR(n.podCIDR)
		out = append(out, routing.Node{Name: n.name, IP: net.ParseIP(n.ip), PodCIDRs: []net.IPNet{*cidr}})
	}
	return out
}

// sync gives every node the node list.
func (w *multiNode) sync(t *testing.T, nodes []routing.Node) {
	t.Helper()
	for _, n := range w.nodes {
		nr := n.reconciler(t, w.mode)
		if err := n.NS.Do(func(ns.NetNS) error { return nr.r.Sync(nodes) }); err != nil {
			t.Fatalf("%s: sync: %v", n.name, err)
		}
	}
}

// ownRoutes lists the destinations of a node's routing routes.
func (n *mnNode) ownRoutes(t *testing.T) []string {
	t.Helper()
	out, err := n.Exec(t, "ip", "-4", "route", "show", "proto", strconv.Itoa(int(routing.RouteProtocol)))
	if err != nil {
		t.Fatal(err)
	}
	var dsts []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			dsts = append(dsts, f[0])
		}
	}
	return dsts
}

func (n *mnNode) metrics(t *testing.T) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	if n.dp == nil {
		return out
	}
	m, err := n.dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range m {
		out[k] = v.Packets
	}
	return out
}

func podMTU(t *testing.T, p *pod) int {
	t.Helper()
	var mtu int
	err := p.NS.Do(func(ns.NetNS) error {
		lk, err := netlink.LinkByName("eth0")
		if err == nil {
			mtu = lk.Attrs().MTU
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return mtu
}

// pingDF sends pings of size bytes (IP total length) with DF set.
func pingDF(from ns.NetNS, ip string, size int) error {
	out, err := testutil.ExecIn(from, "ping", "-n", "-c", "2", "-W", "1", "-i", "0.2", "-w", "4",
		"-M", "do", "-s", strconv.Itoa(size-28), ip)
	if err != nil {
		return fmt.Errorf("ping -M do -s %d %s: %w\n%s", size-28, ip, err, out)
	}
	return nil
}

// TestMultiNode: pods on three nodes reach each other in both routing
// modes on both datapaths: ping, TCP (a transfer of 4 MiB), UDP, and a
// full-size packet with DF; the receiver sees the sending pod's own
// address. The eBPF datapath's counters show the fast paths carried the
// traffic. A node removed from the list takes its routes (and table
// entries) with it, and its pods become unreachable; added back, they are
// reachable again.
func TestMultiNode(t *testing.T) {
	for _, dp := range []string{"ebpf", "iptables"} {
		for _, mode := range []string{routing.ModeNative, routing.ModeVXLAN} {
			t.Run(dp+"/"+mode, func(t *testing.T) { testMultiNode(t, dp, mode) })
		}
	}
}

func testMultiNode(t *testing.T, dp, mode string) {
	w := newMultiNode(t, dp, mode)
	var pods []*pod
	for _, n := range w.nodes {
		p := addPod(t, n.Node, n.conf, "mnpod")
		greeter(t, p.NS, 8080)
		udpEchoServer(t, p.NS, 8081)
		pods = append(pods, p)
	}
	wantMTU := 1500
	if mode == routing.ModeVXLAN {
		wantMTU = 1500 - routing.VXLANOverhead
	}
	for _, p := range pods {
		if got := podMTU(t, p); got != wantMTU {
			t.Errorf("pod %s MTU %d, want %d", p.Name, got, wantMTU)
		}
	}
	// No routes yet: no way between the nodes' pods.
	if err := testutil.Ping(pods[0].NS, pods[1].IP, 1); err == nil {
		t.Fatalf("pod on node1 reaches node2's pod before routing is configured")
	}
	w.sync(t, w.clusterNodes())
	for _, n := range w.nodes {
		if got := n.ownRoutes(t); len(got) != 2 {
			t.Errorf("%s: routes %v, want the 2 other nodes' pod CIDRs", n.name, got)
		}
	}
	before := make([]map[string]uint64, len(w.nodes))
	for i, n := range w.nodes {
		before[i] = n.metrics(t)
	}
	for i, from := range pods {
		for j, to := range pods {
			if i == j {
				continue
			}
			step := fmt.Sprintf("%s: node%d -> node%d", w, i+1, j+1)
			if err := testutil.Ping(from.NS, to.IP, 2); err != nil {
				t.Errorf("%s: %v", step, err)
			}
			seen, err := greet(from.NS, net.JoinHostPort(to.IP, "8080"))
			if err != nil {
				t.Errorf("%s: tcp: %v", step, err)
			} else if host, _, _ := net.SplitHostPort(seen); host != from.IP {
				t.Errorf("%s: receiver saw %s, want the pod's own %s", step, seen, from.IP)
			}
			if err := udpEchoVia(from.NS, net.JoinHostPort(to.IP, "8081")); err != nil {
				t.Errorf("%s: %v", step, err)
			}
			if err := pingDF(from.NS, to.IP, wantMTU); err != nil {
				t.Errorf("%s: full-size packet: %v", step, err)
			}
			if err := testutil.TCPTransfer(from.NS, to.NS, to.IP, 4<<20); err != nil {
				t.Errorf("%s: transfer: %v", step, err)
			}
		}
	}
	// Nodes and pods of other nodes: a node's own processes (hostNetwork
	// pods, NodePort relays) reach the other nodes' pods, and pods reach
	// the other nodes' addresses, in both modes.
	for i, n := range w.nodes {
		for j, p := range pods {
			if i == j {
				continue
			}
			step := fmt.Sprintf("%s: node%d host <-> node%d pod", w, i+1, j+1)
			if err := testutil.Ping(n.NS, p.IP, 1); err != nil {
				t.Errorf("%s: %v", step, err)
			}
			if _, err := greet(n.NS, net.JoinHostPort(p.IP, "8080")); err != nil {
				t.Errorf("%s: tcp: %v", step, err)
			}
			if err := testutil.Ping(p.NS, n.ip, 1); err != nil {
				t.Errorf("%s: pod pings the node: %v", step, err)
			}
		}
	}
	if dp == "ebpf" && mode == routing.ModeVXLAN {
		// Pods' answers to a node's own address came through the tunnel.
		for _, n := range w.nodes {
			if n.metrics(t)["tunnel_to_host"] == 0 {
				t.Errorf("%s: tunnel_to_host stayed 0: answers to the node did not come through the tunnel", n.name)
			}
		}
	}
	// One byte more than the pod MTU with DF cannot leave the pod.
	if err := pingDF(pods[0].NS, pods[1].IP, wantMTU+1); err == nil {
		t.Errorf("%s: a packet above the pod MTU with DF went through", w)
	}
	if dp == "ebpf" {
		out, in := "remote_native", "from_remote"
		if mode == routing.ModeVXLAN {
			out = "remote_vxlan"
		}
		for i, n := range w.nodes {
			after := n.metrics(t)
			for _, m := range []string{out, in} {
				if after[m] <= before[i][m] {
					t.Errorf("%s: %s counter did not grow (%d -> %d): the fast path was not taken", n.name, m, before[i][m], after[m])
				}
			}
		}
	}

	// node3 leaves: its routes go everywhere, its pod is unreachable.
	w.sync(t, w.clusterNodes("node3"))
	for _, n := range w.nodes[:2] {
		for _, r := range n.ownRoutes(t) {
			if r == w.nodes[2].podCIDR {
				t.Errorf("%s: route to removed node3's %s is still there", n.name, r)
			}
		}
	}
	if err := testutil.Ping(pods[0].NS, pods[2].IP, 1); err == nil {
		t.Errorf("%s: node1's pod still reaches removed node3's pod", w)
	}
	if err := testutil.Ping(pods[0].NS, pods[1].IP, 1); err != nil {
		t.Errorf("%s: node1 -> node2 after node3 left: %v", w, err)
	}
	// And back.
	w.sync(t, w.clusterNodes())
	if err := testutil.Ping(pods[0].NS, pods[2].IP, 2); err != nil {
		t.Errorf("%s: node1 -> node3 after node3 came back: %v", w, err)
	}
}

// vxlanHeader is the 8-byte VXLAN header with VNI vni (I flag set).
func vxlanHeader(vni uint32) []byte {
	return []byte{0x08, 0, 0, 0, byte(vni >> 16), byte(vni >> 8), byte(vni), 0}
}

// TestMultiNodeForgedVXLAN: in VXLAN mode, a VXLAN packet for a local pod
// from a host that is not a node (the fabric's router claiming to carry a
// packet of node2's pod) is dropped: on the eBPF datapath by
// tern_from_tunnel (the outer source does not own the inner source's pod
// CIDR; counted), on the iptables datapath by routing's TERN-VXLAN-IN
// chain (not a node's address). The same inner packet from node2 itself is
// delivered.
func TestMultiNodeForgedVXLAN(t *testing.T) {
	for _, dp := range []string{"ebpf", "iptables"} {
		t.Run(dp, func(t *testing.T) { testMultiNodeForgedVXLAN(t, dp) })
	}
}

func testMultiNodeForgedVXLAN(t *testing.T, dp string) {
	w := newMultiNode(t, dp, routing.ModeVXLAN)
	var pods []*pod
	for _, n := range w.nodes[:2] {
		pods = append(pods, addPod(t, n.Node, n.conf, "mnpod"))
	}
	w.sync(t, w.clusterNodes())
	pc, err := testutil.ListenUDP(pods[0].NS, pods[0].IP+":9999")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	inner := func(payload string) []byte {
		return append(vxlanHeader(routing.VNI), udpFrame(routing.MACFor(net.ParseIP(w.nodes[0].ip)),
			net.HardwareAddr{0x02, 1, 2, 3, 4, 5}, netip.MustParseAddr(pods[1].IP),
			netip.MustParseAddr(pods[0].IP), 4444, 9999, []byte(payload))...)
	}
	send := func(from ns.NetNS, payload string) {
		t.Helper()
		c, err := dialFrom(from, "udp", net.JoinHostPort(w.nodes[0].ip, strconv.Itoa(routing.DefaultPort)), 0)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write(inner(payload)); err != nil {
			t.Fatal(err)
		}
	}
	received := func() string {
		buf := make([]byte, 64)
		_ = pc.SetReadDeadline(time.Now().Add(time.Second))
		k, _, err := pc.ReadFrom(buf)
		if err != nil {
			return ""
		}
		return string(buf[:k])
	}
	before := w.nodes[0].metrics(t)["drop_tunnel_forged"]
	send(w.fab, "forged")
	if got := received(); got != "" {
		t.Errorf("forged VXLAN packet from the router delivered: %q", got)
	}
	if after := w.nodes[0].metrics(t)["drop_tunnel_forged"]; dp == "ebpf" && after <= before {
		t.Errorf("drop_tunnel_forged %d -> %d, want it counted", before, after)
	}
	send(w.nodes[1].NS, "genuine")
	if got := received(); got != "genuine" {
		t.Errorf("VXLAN packet from the owning node: received %q, want it delivered", got)
	}
}
