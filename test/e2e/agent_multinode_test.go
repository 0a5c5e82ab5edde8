package e2e

import (
	"bufio"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/routing"
)

// agentUplink is the simulated nodes' link to each other.
const agentUplink = "tern-up0"

// setInternalIP writes the node's InternalIP into its Node object's
// status.
func (w *agentWorld) setInternalIP(ip string) {
	w.t.Helper()
	n, err := w.client.CoreV1().Nodes().Get(w.ctx(), w.nodeName, metav1.GetOptions{})
	if err != nil {
		w.t.Fatal(err)
	}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: ip}, {Type: corev1.NodeHostName, Address: w.nodeName}}
	if _, err := w.client.CoreV1().Nodes().UpdateStatus(w.ctx(), n, metav1.UpdateOptions{}); err != nil {
		w.t.Fatal(err)
	}
}

// agentRoutes lists the node's routes made by routing (their protocol),
// as "destination via gateway".
func (w *agentWorld) agentRoutes() []string {
	w.t.Helper()
	out, err := w.node.Exec(w.t, "ip", "-4", "route", "show", "proto", strconv.Itoa(int(routing.RouteProtocol)))
	if err != nil {
		w.t.Fatal(err)
	}
	var rs []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		// VXLAN routes carry their encapsulation before the gateway.
		f := strings.Fields(l)
		if i := slices.Index(f, "via"); i > 0 && i+1 < len(f) {
			rs = append(rs, f[0]+" via "+f[i+1])
		}
	}
	slices.Sort(rs)
	return rs
}

// waitRoutes waits until the node's agent routes are exactly want and
// returns how long after since that was.
func (w *agentWorld) waitRoutes(step string, since time.Time, want ...string) time.Duration {
	w.t.Helper()
	slices.Sort(want)
	var got []string
	_, err := testutil.WaitFor(w.ctx(), enforceBound, func() error {
		if got = w.agentRoutes(); !slices.Equal(got, want) {
			return fmt.Errorf("routes %q", got)
		}
		return nil
	})
	took := time.Since(since)
	if err != nil {
		w.t.Fatalf("%s: %s: routes %q, want %q after %v", step, w.nodeName, got, want, took)
	}
	w.t.Logf("%s: %s routes %q %v after the API write", step, w.nodeName, want, took.Round(time.Millisecond))
	return took
}

// TestAgentTwoNodes: two simulated nodes, each with its own ternd, pods on
// both, in native and VXLAN routing. The routes between the nodes' pod
// CIDRs come from the agents, which read the other node's pod CIDR and
// InternalIP from its Node object: pods reach each other across nodes with
// their own addresses. Policy on one node selects peers on the other by
// labels that only the API server knows (the remote pods' labels and
// status.podIPs), and a label change on a remote pod reaches the other
// node's datapath. A Node deleted from the API takes its routes with it;
// ternd --uninstall removes the rest. On both datapaths (the eBPF one also
// fills its table of remote pod CIDRs from the same node list).
func TestAgentTwoNodes(t *testing.T) { runAgentClusters(t, testAgentTwoNodes) }

func testAgentTwoNodes(t *testing.T, mode, dp string) {
	c := newAgentCluster(t, mode, dp)
	client := c.client
	createNamespaces(t, client, "alpha")
	w1 := c.addNode("10.77.152.0/24")
	w2 := c.addNode("10.77.153.0/24")
	start := time.Now()
	if mode == routing.ModeNative {
		// Agents first, InternalIPs later: the routes follow the Node
		// objects' updates.
		w1.start()
		w2.start()
		if len(w1.agentRoutes())+len(w2.agentRoutes()) != 0 {
			t.Fatalf("routes before the nodes have InternalIPs: %q %q", w1.agentRoutes(), w2.agentRoutes())
		}
		start = time.Now()
		w1.publish()
		w2.publish()
	} else {
		w1.publish()
		w2.publish()
		w1.start()
		w2.start()
	}
	waitMesh("InternalIPs published", start, w1, w2)

	srv := w1.addPod("alpha", "srv", map[string]string{"app": "srv"})
	friend := w2.addPod("alpha", "friend", map[string]string{"app": "friend"})
	stranger := w2.addPod("alpha", "stranger", map[string]string{"app": "stranger"})
	expect(t, "no policy, across nodes", tcp(friend, srv, 80, true), tcp(stranger, srv, 80, true), tcp(srv, friend, 80, true))
	// No NAT between the nodes' pods: the server sees the client pod's
	// own address.
	serveWhoami(t, srv.NS)
	if seen, err := whoami(friend.NS, net.JoinHostPort(srv.IP, strconv.Itoa(whoamiPort))); err != nil || seen != friend.IP {
		t.Fatalf("across nodes the server saw %q (%v), want the client pod's %s", seen, err, friend.IP)
	}

	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "alpha", Name: "srv-from-friends"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "srv"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "friend"}}},
			}}},
		},
	}
	start = time.Now()
	if _, err := client.NetworkingV1().NetworkPolicies("alpha").Create(t.Context(), np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w1.enforced("policy selecting remote pods", start, enforceBound, tcp(friend, srv, 80, true), tcp(stranger, srv, 80, false))
	start = time.Now()
	w1.labelPod("alpha", "stranger", map[string]string{"app": "friend"})
	w1.enforced("label of a remote pod", start, enforceBound, tcp(stranger, srv, 80, true))

	// Node 2 leaves the cluster: node 1 routes to its pods no more.
	start = time.Now()
	if err := client.CoreV1().Nodes().Delete(t.Context(), w2.nodeName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	w1.waitRoutes("node deleted from the API", start)
	expect(t, "node 2 deleted", tcp(friend, srv, 80, false))

	// Uninstall on node 2 removes the routes its agent made.
	w2.agent.stop()
	if b, err := w2.node.Exec(t, terndBinary(t), "--uninstall", "--cni-conf-dir", w2.confDir); err != nil {
		t.Fatalf("ternd --uninstall: %v\n%s", err, b)
	}
	if rs := w2.agentRoutes(); len(rs) != 0 {
		t.Fatalf("routes left after ternd --uninstall: %q", rs)
	}
	if out, err := w2.node.Exec(t, "ip", "-o", "link", "show"); err != nil || strings.Contains(out, routing.DefaultDevice) {
		t.Fatalf("VXLAN device left after ternd --uninstall (%v): %s", err, out)
	}
}

// greeting dials addr from n (bounded) and returns the first line the
// server sends (serveNamed's name).
func greeting(n ns.NetNS, addr string) (string, error) {
	var line string
	err := n.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp4", addr, 500*time.Millisecond)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return strings.TrimSpace(line), err
}

// backendsSeen waits until connections to addr from n reach exactly the
// backends named want (every one of them seen, no other within 20
// connections in a row) and returns the time from since.
func backendsSeen(t *testing.T, step string, n ns.NetNS, addr string, since time.Time, want ...string) time.Duration {
	t.Helper()
	var last map[string]int
	_, err := testutil.WaitFor(t.Context(), enforceBound, func() error {
		last = map[string]int{}
		for range 20 {
			name, err := greeting(n, addr)
			if err != nil {
				return err
			}
			if !slices.Contains(want, name) {
				return fmt.Errorf("backend %q answered", name)
			}
			last[name]++
		}
		if len(last) != len(want) {
			return fmt.Errorf("seen %v", last)
		}
		return nil
	})
	took := time.Since(since)
	if err != nil {
		t.Fatalf("%s: backends %v not in force %v after the API write: %v (last round %v)", step, want, took, err, last)
	}
	t.Logf("%s: backends %v in force %v after the API write (includes 20 connections of checking)", step, want, took.Round(time.Millisecond))
	return took
}

// TestAgentServices: ternd with --services ebpf drives Tern's own load
// balancer from the API server: a Service and its EndpointSlice created
// through the API make the ClusterIP reach the backend; scaling the
// EndpointSlice (a backend added, then the first one removed) is enforced;
// removing the last endpoint makes the ClusterIP refuse connections.
func TestAgentServices(t *testing.T) {
	testutil.RequirePrivileged(t)
	cp := testutil.StartControlPlane(t)
	client := cp.Client(t)
	ctx := t.Context()
	createNamespaces(t, client, "alpha")
	cgroup := testutil.NewCgroup(t) // never the machine's root in tests
	w := newAgentNode(t, cp, client, "10.77.156.0/24", "--services", "ebpf", "--host-services-cgroup", cgroup)
	cli := w.addPod("alpha", "cli", map[string]string{"app": "cli"})
	b1 := w.addPod("alpha", "b1", map[string]string{"app": "web"})
	b2 := w.addPod("alpha", "b2", map[string]string{"app": "web"})
	serveNamed(t, b1.NS, 9180, "b1")
	serveNamed(t, b2.NS, 9180, "b2")

	const clusterIP = "10.96.77.10"
	addr := net.JoinHostPort(clusterIP, "80")
	if _, err := greeting(cli.NS, addr); err == nil {
		t.Fatalf("ClusterIP %s answers before the Service exists", clusterIP)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "alpha", Name: "web"},
		Spec: corev1.ServiceSpec{
			ClusterIP: clusterIP,
			Ports:     []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(9180), Protocol: corev1.ProtocolTCP}},
		},
	}
	if _, err := client.CoreV1().Services("alpha").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ready := true
	endpoint := func(p *k8sPod) discoveryv1.Endpoint {
		return discoveryv1.Endpoint{
			Addresses:  []string{p.IP},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			NodeName:   &w.nodeName,
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: p.Namespace, Name: p.Name},
		}
	}
	name, port, proto := "http", int32(9180), corev1.ProtocolTCP
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "alpha", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}},
		Endpoints:   []discoveryv1.Endpoint{endpoint(b1)},
	}
	start := time.Now()
	es, err := client.DiscoveryV1().EndpointSlices("alpha").Create(ctx, es, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	backendsSeen(t, "EndpointSlice created", cli.NS, addr, start, "b1")
	// The node's own processes too (--host-services-cgroup: the socket
	// programs attached there).
	if out, err := testutil.SockClient(w.node.NS, cgroup, "tcp", addr); err != nil || out != addr+" b1" {
		t.Errorf("host -> %s: %q (%v), want b1's greeting from the ClusterIP", addr, out, err)
	}

	update := func(step string, eps []discoveryv1.Endpoint, want ...string) {
		t.Helper()
		es.Endpoints = eps
		start := time.Now()
		var err error
		if es, err = client.DiscoveryV1().EndpointSlices("alpha").Update(ctx, es, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		if len(want) > 0 {
			backendsSeen(t, step, cli.NS, addr, start, want...)
		}
	}
	update("scaled up to two endpoints", []discoveryv1.Endpoint{endpoint(b1), endpoint(b2)}, "b1", "b2")
	update("first endpoint removed", []discoveryv1.Endpoint{endpoint(b2)}, "b2")

	// No endpoint left: the ClusterIP refuses at once (the balancer's
	// reject), it does not time out.
	update("no endpoints", nil)
	start = time.Now()
	took, err := testutil.WaitFor(ctx, enforceBound, func() error {
		_, err := greeting(cli.NS, addr)
		if err == nil {
			return fmt.Errorf("still answered")
		}
		if !strings.Contains(err.Error(), "refused") {
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatalf("ClusterIP without endpoints: not refused %v after the API write: %v", took, err)
	}
	t.Logf("no endpoints: refused %v after the API write", time.Since(start).Round(time.Millisecond))

	// ternd --uninstall takes the socket programs off the cgroup.
	if out, err := w.node.Exec(t, "bpftool", "cgroup", "show", cgroup); err != nil || !strings.Contains(out, "connect4") {
		t.Fatalf("bpftool cgroup show %s before --uninstall (%v): %q, want the socket programs", cgroup, err, out)
	}
	w.agent.stop()
	if b, err := w.node.Exec(t, terndBinary(t), "--uninstall", "--cni-conf-dir", w.confDir); err != nil {
		t.Fatalf("ternd --uninstall: %v\n%s", err, b)
	}
	if out, err := w.node.Exec(t, "bpftool", "cgroup", "show", cgroup); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("bpftool cgroup show %s after --uninstall (%v): %q, want nothing attached", cgroup, err, out)
	}
}
