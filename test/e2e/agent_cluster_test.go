package e2e

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/routing"
)

// agentCluster is a control plane and simulated nodes, each running its own
// ternd (its own CNI config, state and bpffs directories), joined by a
// simulated fabric: a network namespace with bridges that routes between
// them. Native routing puts every node on one bridge (the nodes are
// adjacent, as native routing needs); VXLAN puts the third node and later
// ones on a second bridge in another subnet, so the tunnel crosses a
// router.
type agentCluster struct {
	t      *testing.T
	cp     *testutil.ControlPlane
	client kubernetes.Interface
	fab    *fabric
	mode   string
	args   []string // ternd flags every node gets
	nodes  []*agentWorld
	joined int // nodes linked so far: numbers their addresses
}

// newAgentCluster starts a control plane and the fabric. Nodes come with
// addNode.
func newAgentCluster(t *testing.T, mode, dp string) *agentCluster {
	t.Helper()
	cp := testutil.StartControlPlane(t)
	return &agentCluster{t: t, cp: cp, client: cp.Client(t), mode: mode,
		fab:  newFabric(t, map[string]string{"brA": "192.0.2.", "brB": "198.51.100."}),
		args: []string{"--routing", mode, "--datapath", dp, "--uplink", agentUplink}}
}

// addNode creates a Node object with podCIDR and a simulated node linked
// into the fabric (the uplink exists before the agent: the eBPF datapath
// attaches to it and VXLAN sizes its device from it). Its agent is not
// started and its InternalIP not published: start and publish do that.
func (c *agentCluster) addNode(podCIDR string) *agentWorld {
	c.t.Helper()
	w := prepareAgentNode(c.t, c.cp, c.client, podCIDR, c.args...)
	c.joined++
	br := "brA"
	if c.mode == routing.ModeVXLAN && c.joined >= 3 {
		br = "brB"
	}
	w.ip = c.fab.link(c.t, w.node, agentUplink, br, c.joined)
	c.nodes = append(c.nodes, w)
	return w
}

// publish writes the node's fabric address into its Node object as its
// InternalIP, as kubelet does.
func (w *agentWorld) publish() { w.setInternalIP(w.ip) }

// joinNode is addNode, publish and start: a node joining a running cluster.
func (c *agentCluster) joinNode(podCIDR string) *agentWorld {
	c.t.Helper()
	w := c.addNode(podCIDR)
	w.publish()
	w.start()
	return w
}

// routeTo is the route a node's agent makes to w's pods.
func (w *agentWorld) routeTo() string { return w.podCIDR + " via " + w.ip }

// runAgentClusters runs test as a subtest "<routing mode>/<datapath>" for
// every routing mode and datapath.
func runAgentClusters(t *testing.T, test func(t *testing.T, mode, dp string)) {
	testutil.RequirePrivileged(t)
	for _, mode := range []string{routing.ModeNative, routing.ModeVXLAN} {
		for _, dp := range []string{"ebpf", "iptables"} {
			t.Run(mode+"/"+dp, func(t *testing.T) { test(t, mode, dp) })
		}
	}
}

// waitMesh waits until every node of nodes routes to the pods of every
// other one, and nothing else, and returns the longest wait from since.
func waitMesh(step string, since time.Time, nodes ...*agentWorld) time.Duration {
	var longest time.Duration
	for _, w := range nodes {
		var want []string
		for _, o := range nodes {
			if o != w {
				want = append(want, o.routeTo())
			}
		}
		longest = max(longest, w.waitRoutes(step, since, want...))
	}
	return longest
}

// TestAgentThreeNodes: three simulated nodes under their own agents (a
// fourth and fifth join later), pods wired as kubelet wires them. Pods
// reach each other across nodes with their own addresses (TCP, UDP, ping,
// a transfer of full-MTU packets with DF, the source address the server
// sees); NetworkPolicies written to the API are enforced on every node:
// ingress on the destination node (two policies' pods on different
// nodes), egress on the source node; a node added gets routes on every
// other node and its pod gets its labels' allowances there; a node removed
// takes its routes with it; an IP of a deleted pod reused on another node
// by a pod with other labels does not inherit the old pod's allowances.
func TestAgentThreeNodes(t *testing.T) { runAgentClusters(t, testAgentThreeNodes) }

func testAgentThreeNodes(t *testing.T, mode, dp string) {
	c := newAgentCluster(t, mode, dp)
	createNamespaces(t, c.client, "x", "y")
	start := time.Now()
	n1 := c.joinNode("10.77.160.0/24")
	n2 := c.joinNode("10.77.161.0/24")
	n3 := c.joinNode("10.77.162.0/24")
	waitMesh("three nodes joined", start, n1, n2, n3)

	client := map[string]string{"role": "client"}
	xa := n1.addPod("x", "a", map[string]string{"app": "a", "role": "client"})
	xb := n2.addPod("x", "b", map[string]string{"app": "b"})
	xc := n3.addPod("x", "c", map[string]string{"app": "c"})
	ya := n3.addPod("y", "a", map[string]string{"app": "a", "role": "client"})
	yb := n1.addPod("y", "b", map[string]string{"app": "b"})

	expect(t, "no policy, across nodes",
		tcp(xa, xb, 80, true), tcp(xa, xc, 80, true), tcp(xb, xc, 8080, true), tcp(xc, xa, 80, true),
		udp(xa, xc, 53, true), udp(xb, xa, 53, true), udp(ya, xb, 53, true))
	if err := testutil.Ping(xa.NS, xc.IP, 2); err != nil {
		t.Errorf("ping node 1 -> node 3: %v", err)
	}
	// Full-size packets with DF across the nodes (the VXLAN pods' MTU
	// leaves room for the overlay), then a transfer checked end to end.
	mtu := podMTU(t, xa.pod)
	if err := pingDF(xa.NS, xc.IP, mtu); err != nil {
		t.Errorf("ping with DF of %d-byte packets (the pod MTU) node 1 -> node 3: %v", mtu, err)
	}
	if err := testutil.TCPTransfer(xa.NS, xc.NS, xc.IP, 4<<20); err != nil {
		t.Errorf("4 MiB transfer node 1 -> node 3: %v", err)
	}
	// No NAT between pods of the cluster.
	serveWhoami(t, xc.NS)
	if seen, err := whoami(xb.NS, net.JoinHostPort(xc.IP, strconv.Itoa(whoamiPort))); err != nil || seen != xb.IP {
		t.Errorf("node 2 -> node 3: the server saw %q (%v), want the client pod's %s", seen, err, xb.IP)
	}

	// Ingress in x: only pods labelled role=client, of any namespace, on
	// port 80. Egress of y/a: only x/c on port 80. The isolated pods are
	// on all three nodes: each node enforces its part.
	tcpProto := corev1.ProtocolTCP
	port80 := intstr.FromInt32(80)
	ingress := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "from-clients"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}, PodSelector: &metav1.LabelSelector{MatchLabels: client}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcpProto, Port: &port80}},
			}},
		},
	}
	egress := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: "a-to-xc"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To: []networkingv1.NetworkPolicyPeer{{
					NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "x"}},
					PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": "c"}},
				}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcpProto, Port: &port80}},
			}},
		},
	}
	start = time.Now()
	var written int64
	for _, np := range []*networkingv1.NetworkPolicy{ingress, egress} {
		got, err := c.client.NetworkingV1().NetworkPolicies(np.Namespace).Create(t.Context(), np, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		written, _ = strconv.ParseInt(got.ResourceVersion, 10, 64)
	}
	// Every agent reports the writes applied (what the convergence
	// benchmark measures).
	for _, w := range []*agentWorld{n1, n2, n3} {
		w.waitApplied("networkpolicies", written, start)
	}
	// Each node's part, timed from the writes.
	n2.enforced("ingress on node 2", start, enforceBound, tcp(yb, xb, 80, false))
	n1.enforced("ingress on node 1", start, enforceBound, tcp(xc, xa, 80, false))
	n3.enforced("egress on node 3", start, enforceBound, tcp(ya, xb, 80, false))
	expect(t, "policies in force on three nodes",
		tcp(xa, xb, 80, true), tcp(xa, xb, 8080, false), tcp(yb, xb, 80, false), // node 2's ingress
		tcp(ya, xc, 80, true), tcp(yb, xc, 80, false), tcp(xa, xc, 80, true), // node 3's ingress (and y/a's egress)
		tcp(xc, xa, 80, false), tcp(yb, xa, 80, false), tcp(ya, xa, 80, false), // node 1's ingress; node 3's egress
		tcp(ya, xb, 80, false), udp(ya, xb, 53, false), tcp(ya, yb, 80, false), // node 3's egress
		tcp(xb, yb, 80, true), udp(xc, yb, 53, true)) // y/b is not isolated

	// A fourth node joins: every node routes to its pods, and its pod's
	// labels bring it the allowances of role=client on the other nodes.
	start = time.Now()
	n4 := c.joinNode("10.77.163.0/24")
	waitMesh("node 4 joined", start, n1, n2, n3, n4)
	xd := n4.addPod("x", "d", map[string]string{"app": "d", "role": "client"})
	expect(t, "pod on the new node",
		tcp(xd, xb, 80, true), tcp(xd, xb, 8080, false), tcp(xd, xa, 80, true), tcp(ya, xd, 80, false), tcp(xa, xd, 80, true))

	// It leaves: its agent stops (drained), its pod and Node object are
	// deleted from the API; the other nodes' routes to it go.
	n4.agent.stop()
	if err := c.client.CoreV1().Pods("x").Delete(t.Context(), "d", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	if err := c.client.CoreV1().Nodes().Delete(t.Context(), n4.nodeName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitMesh("node 4 deleted", start, n1, n2, n3)

	// Its pod CIDR goes to a fifth node, whose first pod gets x/d's
	// address with other labels: x/d's allowances must not apply to it.
	start = time.Now()
	n5 := c.joinNode("10.77.163.0/24")
	waitMesh("node 5 joined with node 4's pod CIDR", start, n1, n2, n3, n5)
	ye := n5.addPod("y", "e", map[string]string{"app": "e"})
	if ye.IP != xd.IP {
		t.Fatalf("the new pod got %s, not the reused address %s: the test needs the same address", ye.IP, xd.IP)
	}
	expect(t, "address of a deleted pod reused on another node with other labels",
		tcp(ye, xb, 80, false), tcp(ye, xa, 80, false), tcp(ye, yb, 80, true), tcp(xa, ye, 80, true))
}

// appliedRV reads tern_agent_applied_resource_version{resource} from the
// agent's /metrics (-1 when absent).
func (w *agentWorld) appliedRV(resource string) (int64, error) {
	var body string
	if err := w.get("/metrics", "9962", &body); err != nil {
		return -1, err
	}
	prefix := `tern_agent_applied_resource_version{resource="` + resource + `"} `
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			return int64(f), err
		}
	}
	return -1, nil
}

// waitApplied waits until the agent reports every change of resource up
// to resourceVersion rv applied to its datapath.
func (w *agentWorld) waitApplied(resource string, rv int64, since time.Time) time.Duration {
	w.t.Helper()
	var got int64
	_, err := testutil.WaitFor(w.ctx(), enforceBound, func() error {
		var err error
		if got, err = w.appliedRV(resource); err != nil {
			return err
		}
		if got < rv {
			return fmt.Errorf("applied %s resourceVersion %d < %d", resource, got, rv)
		}
		return nil
	})
	took := time.Since(since)
	if err != nil {
		w.t.Fatalf("%s: %v after %v", w.nodeName, err, took)
	}
	return took
}
