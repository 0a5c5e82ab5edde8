package e2e

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/routing"
)

// The cross-node policy world: namespaces x and y, pods a, b and c in each,
// spread over the three nodes so that most pairs cross a node boundary:
//
//	node1: x/a  y/a     node2: x/b  x/c     node3: y/c  y/b
//
// Every node gets the same manifests with ternctl apply -f (as the node
// agent will feed its store): the Namespaces, the NetworkPolicies and a Pod
// object per pod with its node and status.podIPs, which is how a node
// learns the identity of pods it does not run.
var mnPolicyPlacement = []struct{ ns, name string }{
	{"x", "a"}, {"y", "a"}, // node1
	{"x", "b"}, {"x", "c"}, // node2
	{"y", "c"}, {"y", "b"}, // node3
}

const mnPolicies = `
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: "y", labels: {ns: "y"}}  # quoted: YAML 1.1 reads a bare y as true
---
# x/a: from x/b on 80 (pod selector), from y/c on 81 (namespace and pod
# selector together), from pods serving a port named "alt" there (named port).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: a-ingress}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 80}]
  - from: [{namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: c}}}]
    ports: [{port: alt}]
---
# x/b: from the pod CIDRs of nodes 1 and 2 (10.77.80.0/20 except node3's
# 10.77.83.0/24), port 80.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: b-ingress}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 10.77.80.0/20, except: [10.77.83.0/24]}}]
    ports: [{port: 80}]
---
# y/b: may only reach namespace x, port 80 (egress, enforced on node3).
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: "y", name: b-egress}
spec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {ns: x}}}]
    ports: [{port: 80}]
`

// mnPodObject is the Pod manifest of p running on node with labels.
func mnPodObject(p *k8sPod, node string, labels map[string]string) string {
	var l []string
	for k, v := range labels {
		l = append(l, fmt.Sprintf("%s: %q", k, v))
	}
	return fmt.Sprintf(`---
apiVersion: v1
kind: Pod
metadata: {namespace: %q, name: %q, labels: {%s}}
spec:
  nodeName: %s
  containers: [{name: main, ports: [{name: alt, containerPort: 81}]}]
status: {podIP: %s, podIPs: [{ip: %s}]}
`, p.Namespace, p.Name, strings.Join(l, ", "), node, p.IP, p.IP)
}

type mnPolicyWorld struct {
	*multiNode
	ternctl string
	dir     string
	confs   []string // each node's conflist file, for ternctl --cni-conf
	pods    map[string]*k8sPod
	nodeOf  map[string]*mnNode
}

func newMNPolicyWorld(t *testing.T, dp, mode string) *mnPolicyWorld {
	t.Helper()
	w := &mnPolicyWorld{multiNode: newMultiNode(t, dp, mode), ternctl: ternctlBinary(t), dir: t.TempDir(),
		pods: map[string]*k8sPod{}, nodeOf: map[string]*mnNode{}}
	for i, n := range w.nodes {
		f := filepath.Join(w.dir, n.name+".conflist")
		if err := os.WriteFile(f, n.conf, 0o600); err != nil {
			t.Fatal(err)
		}
		w.confs = append(w.confs, f)
		for _, pl := range mnPolicyPlacement[2*i : 2*i+2] {
			p := addK8sPod(t, n.Node, n.conf, pl.ns, pl.name)
			serveTCP(t, p.NS, 81, closeConn)
			w.pods[p.String()] = p
			w.nodeOf[p.String()] = n
		}
	}
	w.sync(t, w.clusterNodes())
	return w
}

// apply writes body and applies it on every node.
func (w *mnPolicyWorld) apply(t *testing.T, verb, name, body string) {
	t.Helper()
	f := filepath.Join(w.dir, name)
	if err := os.WriteFile(f, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	for i, n := range w.nodes {
		if out, err := n.Exec(t, w.ternctl, "--cni-conf", w.confs[i], verb, "-f", f); err != nil {
			t.Fatalf("%s: ternctl %s -f %s: %v\n%s", n.name, verb, name, err, out)
		}
	}
}

func (w *mnPolicyWorld) podObjects() string {
	var b strings.Builder
	for _, pl := range mnPolicyPlacement {
		p := w.pods[pl.ns+"/"+pl.name]
		b.WriteString(mnPodObject(p, w.nodeOf[p.String()].name, map[string]string{"pod": pl.name}))
	}
	return b.String()
}

// TestMultiNodePolicy: NetworkPolicy across nodes, same verdicts as on one
// node: ingress decided on the destination's node, egress on the source's,
// remote pods known by the identity of their Pod objects (pod and
// namespace selectors, named ports), ipBlock with except over other nodes'
// pod CIDRs. Source addresses are pod addresses end to end, so ipBlocks
// over pod CIDRs work.
func TestMultiNodePolicy(t *testing.T) {
	for _, c := range []struct{ dp, mode string }{
		{"ebpf", routing.ModeNative}, {"ebpf", routing.ModeVXLAN},
		{"iptables", routing.ModeNative}, {"iptables", routing.ModeVXLAN},
	} {
		t.Run(c.dp+"/"+c.mode, func(t *testing.T) { testMultiNodePolicy(t, c.dp, c.mode) })
	}
}

func testMultiNodePolicy(t *testing.T, dp, mode string) {
	w := newMNPolicyWorld(t, dp, mode)
	p := func(s string) *k8sPod { return w.pods[s] }
	xa, xb, xc, ya, yb, yc := p("x/a"), p("x/b"), p("x/c"), p("y/a"), p("y/b"), p("y/c")

	w.apply(t, "apply", "pods.yaml", w.podObjects())
	expect(t, "no policy", tcp(xb, xa, 80, true), tcp(yb, xa, 81, true), tcp(yc, xb, 80, true), udp(yb, xa, 53, true))

	w.apply(t, "apply", "policies.yaml", mnPolicies)
	expect(t, "policies",
		// x/a (node1), ingress-isolated.
		tcp(xb, xa, 80, true),  // x/b on node2: pod selector, port 80
		tcp(xb, xa, 81, false), // wrong port
		tcp(yc, xa, 81, true),  // y/c on node3: namespace + pod selector, named port alt = 81
		tcp(yc, xa, 80, false), // wrong port for that rule
		tcp(ya, xa, 81, false), // y/a: same node, not selected
		tcp(xc, xa, 80, false), // x/c on node2: pod c in x is not selected
		udp(xb, xa, 53, false),
		// x/b (node2), ingress from nodes 1 and 2's pod CIDRs on 80.
		tcp(xa, xb, 80, true),  // node1
		tcp(ya, xb, 80, true),  // node1, other namespace: ipBlock ignores namespaces
		tcp(xc, xb, 80, true),  // node2, local
		tcp(yc, xb, 80, false), // node3: excepted
		tcp(xa, xb, 81, false), // wrong port
		// y/b (node3), egress to namespace x on 80 only.
		tcp(yb, xc, 80, true),  // node2, x/c not isolated
		tcp(yb, xc, 81, false), // egress: wrong port
		tcp(yb, xa, 80, false), // egress allows, x/a's ingress does not
		tcp(yb, ya, 80, false), // namespace y
		tcp(yb, xb, 80, false), // egress allows, x/b's ingress excepts node3
		udp(yb, xc, 53, false),
		// Not isolated: x/c (node2), y/a (node1), y/c (node3).
		tcp(xa, xc, 81, true),
		tcp(xb, ya, 80, true),
		udp(xc, yc, 53, true),
	)

	w.apply(t, "delete", "policies-del.yaml", mnPolicies)
	expect(t, "policies deleted", tcp(yc, xb, 80, true), tcp(yb, ya, 80, true), tcp(xb, xa, 81, true))
}

// TestMultiNodeIdentityChurn: a remote pod's IP taken over by a pod with
// other labels gets none of the old pod's allowances, not even on the
// connections the old pod had open. x/a on node1 may talk with pods b
// only (ingress and egress isolated) and holds a connection with x/b on
// node2; then, on every node's store, x/b's Pod object goes and a pod with
// other labels appears with its IP. Node1's datapath forgets the flows of
// an address whose identity changed once the new identity is in place, so
// the connection's next packets, either way, are decided again and denied.
func TestMultiNodeIdentityChurn(t *testing.T) {
	for _, dp := range []string{"ebpf", "iptables"} {
		t.Run(dp, func(t *testing.T) { testMultiNodeIdentityChurn(t, dp) })
	}
}

func testMultiNodeIdentityChurn(t *testing.T, dp string) {
	w := newMNPolicyWorld(t, dp, routing.ModeNative)
	xa, xb := w.pods["x/a"], w.pods["x/b"]
	greeter(t, xa.NS, 8082)
	w.apply(t, "apply", "pods.yaml", w.podObjects())
	w.apply(t, "apply", "policy.yaml", `
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: a-from-b}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
  egress:
  - to: [{podSelector: {matchLabels: {pod: b}}}]
`)
	c, err := dialFrom(xb.NS, "tcp", xa.IP+":8082", 0)
	if err != nil {
		t.Fatalf("x/b -> x/a allowed, but: %v", err)
	}
	defer c.Close()
	rd := bufio.NewReader(c)
	echo := func() error {
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return err
		}
		for {
			l, err := rd.ReadString('\n')
			if err != nil {
				return err
			}
			if l == "ping\n" {
				return nil
			}
		}
	}
	if err := echo(); err != nil {
		t.Fatalf("echo on the allowed connection: %v", err)
	}
	// x/b's IP now belongs to x/intruder (other labels): one apply
	// deletes the old Pod object and adds the new one.
	intruder := &k8sPod{pod: xb.pod, Namespace: "x", Name: "intruder"}
	w.apply(t, "delete", "old.yaml", mnPodObject(xb, "node2", map[string]string{"pod": "b"}))
	w.apply(t, "apply", "new.yaml", mnPodObject(intruder, "node2", map[string]string{"pod": "intruder"}))
	err = echo()
	if err == nil {
		t.Errorf("%s: the connection x/b had open still passes after its IP went to a pod with other labels", dp)
	}
	expect(t, "intruder", tcp(intruder, xa, 80, false))
}
