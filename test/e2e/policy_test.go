package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/cilium/ebpf"

	"github.com/ternlabs/tern/internal/testutil"
)

// policyProbeTimeout is how long a probe waits before it calls the
// connection blocked (a probe expected to connect retries for
// testutil.AllowedProbeWindow).
const policyProbeTimeout = 1500 * time.Millisecond

// Ports every policy test pod serves.
var (
	policyTCPPorts = []int{80, 1000, 1050, 1100, 1101, 5432, 8080, 9090}
	policyUDPPorts = []int{53, 5353}
)

// k8sPod is a pod added through the tern binary with Kubernetes CNI_ARGS.
type k8sPod struct {
	*pod
	Namespace, Name string
}

func (p *k8sPod) String() string { return p.Namespace + "/" + p.Name }

// addK8sPod adds a pod named namespace/name (CNI_ARGS K8S_POD_NAMESPACE and
// K8S_POD_NAME) with TCP and UDP echo servers on the policy test ports.
// DEL, server shutdown and netns removal are registered as cleanup.
func addK8sPod(t *testing.T, n *testutil.Node, conf []byte, namespace, name string) *k8sPod {
	t.Helper()
	p := n.Pod(t, name)
	id := "c-" + p.Name
	args := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", namespace}, {"K8S_POD_NAME", name}}
	t.Cleanup(func() { _ = n.Del(context.Background(), conf, id, p.Path, "eth0", args) })
	res, err := n.Add(t.Context(), conf, id, p.Path, "eth0", args)
	if err != nil {
		t.Fatalf("ADD %s/%s: %v", namespace, name, err)
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IPs) != 1 {
		t.Fatalf("ADD %s/%s: want 1 IP, got %v", namespace, name, r.IPs)
	}
	serve(t, p.NS)
	return &k8sPod{pod: &pod{Pod: p, ID: id, IP: r.IPs[0].Address.IP.String()}, Namespace: namespace, Name: name}
}

// serve runs TCP accept-and-close and UDP echo servers on the policy test
// ports in namespace n until the test ends.
func serve(t *testing.T, n ns.NetNS) {
	t.Helper()
	for _, port := range policyTCPPorts {
		serveTCP(t, n, port, closeConn)
	}
	for _, port := range policyUDPPorts {
		udpEchoServer(t, n, port)
	}
}

// reach is one expectation: from can (or cannot) open proto/port to ip.
type reach struct {
	from  ns.NetNS
	fromS string
	ip    string
	toS   string
	proto string // "tcp" or "udp"
	port  int
	want  bool
}

func (r reach) String() string {
	verb := "blocked"
	if r.want {
		verb = "allowed"
	}
	return fmt.Sprintf("%s -> %s %s/%d should be %s", r.fromS, r.toS, r.proto, r.port, verb)
}

// tcp and udp build expectations between pods.
func tcp(from, to *k8sPod, port int, want bool) reach {
	return reach{from: from.NS, fromS: from.String(), ip: to.IP, toS: to.String(), proto: "tcp", port: port, want: want}
}

func udp(from, to *k8sPod, port int, want bool) reach {
	r := tcp(from, to, port, want)
	r.proto = "udp"
	return r
}

// connects reports whether the connection got through: a TCP handshake,
// or a UDP datagram echoed back, within policyProbeTimeout.
func (r reach) connects() (bool, error) {
	addr := net.JoinHostPort(r.ip, strconv.Itoa(r.port))
	var c net.Conn
	err := r.from.Do(func(ns.NetNS) error {
		var err error
		if r.proto == "tcp" {
			c, err = net.DialTimeout("tcp4", addr, policyProbeTimeout)
		} else {
			c, err = net.Dial("udp4", addr)
		}
		return err
	})
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return false, nil
		}
		return false, err
	}
	defer c.Close()
	if r.proto == "tcp" {
		return true, nil
	}
	deadline := time.Now().Add(policyProbeTimeout)
	buf := make([]byte, 64)
	for time.Now().Before(deadline) {
		if _, err := c.Write([]byte("policy-probe")); err != nil {
			time.Sleep(100 * time.Millisecond) // ICMP error from an earlier datagram
			continue
		}
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if k, err := c.Read(buf); err == nil && string(buf[:k]) == "policy-probe" {
			return true, nil
		}
	}
	return false, nil
}

// expect runs the probes concurrently and reports every one whose outcome
// differs.
func expect(t *testing.T, step string, rs ...reach) {
	t.Helper()
	explainFirst(t, step, rs) // observe_test.go: ternctl explain must predict each outcome
	errs := make([]error, len(rs))
	var wg sync.WaitGroup
	for i, r := range rs {
		wg.Go(func() {
			got, err := testutil.Probe(r.want, r.connects)
			switch {
			case err != nil:
				errs[i] = fmt.Errorf("%v: %w", r, err)
			case got != r.want:
				errs[i] = fmt.Errorf("%v, but is not", r)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Errorf("%s: %v", step, err)
		}
	}
}

// policyWorld is a node with a tern network, ternctl, and a directory of
// manifests.
type policyWorld struct {
	t        *testing.T
	node     *testutil.Node
	conf     []byte
	confFile string
	bin      string
	dir      string
}

func newPolicyWorld(t *testing.T, dp string) *policyWorld {
	t.Helper()
	w := &policyWorld{t: t, bin: ternctlBinary(t), node: testutil.NewNode(t), dir: t.TempDir()}
	w.conf = conflist(t, w.node, testutil.UniqueName("net"), netConf{Datapath: dp, Subnet: "10.77.30.0/24"})
	w.confFile = filepath.Join(t.TempDir(), "10-tern.conflist")
	if err := os.WriteFile(w.confFile, w.conf, 0o600); err != nil {
		t.Fatal(err)
	}
	return w
}

// write puts a manifest file in the world's directory and returns its path.
func (w *policyWorld) write(name, body string) string {
	w.t.Helper()
	p := filepath.Join(w.dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		w.t.Fatal(err)
	}
	return p
}

// ternctl runs ternctl in the node namespace.
func (w *policyWorld) ternctl(args ...string) (string, error) {
	w.t.Helper()
	return w.node.Exec(w.t, w.bin, append([]string{"--cni-conf", w.confFile}, args...)...)
}

func (w *policyWorld) mustTernctl(args ...string) string {
	w.t.Helper()
	out, err := w.ternctl(args...)
	if err != nil {
		w.t.Fatalf("ternctl %s: %v", strings.Join(args, " "), err)
	}
	return out
}

const policyCluster = `
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {env: dev}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: web, labels: {app: web}}
spec:
  containers:
  - name: main
    ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: db, labels: {app: db}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: api, labels: {app: api}}
spec:
  containers:
  - name: main
    ports: [{name: metrics, containerPort: 9090}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: dev, name: client, labels: {app: client}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: dev, name: web, labels: {app: web}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: late, labels: {app: db}}
spec: {containers: [{name: main}]}
`

// TestNetworkPolicy drives NetworkPolicy end to end: pods added through the
// tern binary with Kubernetes CNI_ARGS in two namespaces, policies applied
// and deleted with ternctl, TCP and UDP probes between the pods after each
// step.
func TestNetworkPolicy(t *testing.T) {
	for _, dp := range []string{"iptables", "ebpf"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			testNetworkPolicy(t, dp)
		})
	}
}

const denyAllIngress = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: deny-all}
spec:
  podSelector: {}
`

func testNetworkPolicy(t *testing.T, dp string) {
	w := newPolicyWorld(t, dp)
	n := w.node
	w.explainEveryCase("10.77.30.1")
	web := addK8sPod(t, n, w.conf, "prod", "web")
	db := addK8sPod(t, n, w.conf, "prod", "db")
	api := addK8sPod(t, n, w.conf, "prod", "api")
	client := addK8sPod(t, n, w.conf, "dev", "client")
	devweb := addK8sPod(t, n, w.conf, "dev", "web")
	subnet := "10.77.30.0/24"
	gateway := "10.77.30.1"

	expect(t, "no policy",
		tcp(client, web, 8080, true), tcp(web, db, 5432, true), udp(client, devweb, 5353, true), tcp(api, client, 80, true))

	// Pod and Namespace objects alone change nothing.
	if out := w.mustTernctl("apply", "-f", w.write("cluster.yaml", policyCluster)); !strings.Contains(out, "Pod prod/web created") {
		t.Errorf("apply cluster:\n%s", out)
	}
	expect(t, "objects without policies", tcp(client, web, 8080, true), tcp(web, db, 5432, true))

	// Default deny for ingress in prod; dev and egress stay open.
	deny := w.write("deny.yaml", denyAllIngress)
	w.mustTernctl("apply", "-f", deny)
	expect(t, "default deny",
		tcp(client, web, 8080, false), udp(client, web, 53, false), tcp(web, db, 5432, false), tcp(api, web, 80, false),
		tcp(web, client, 80, true), udp(db, devweb, 53, true), tcp(client, devweb, 80, true))
	// The node reaches its pods whatever the policy.
	expect(t, "host to isolated pod", reach{from: n.NS, fromS: "node", ip: db.IP, toS: db.String(), proto: "tcp", port: 5432, want: true})
	if dp == "ebpf" {
		// The drops are counted by reason.
		var metrics map[string]map[string]uint64
		if err := json.Unmarshal([]byte(w.mustTernctl("-o", "json", "get", "metrics")), &metrics); err != nil {
			t.Fatal(err)
		}
		if metrics["drop_policy_ingress"]["packets"] == 0 || metrics["drop_policy_egress"] == nil {
			t.Errorf("ternctl get metrics after denied probes: drop_policy_ingress %v, drop_policy_egress %v",
				metrics["drop_policy_ingress"], metrics["drop_policy_egress"])
		}
	}

	// Allow from a labelled pod, one port.
	w.mustTernctl("apply", "-f", w.write("db.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: db-from-web}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
`))
	expect(t, "allow from labelled pod",
		tcp(web, db, 5432, true), tcp(web, db, 80, false), tcp(api, db, 5432, false),
		tcp(devweb, db, 5432, false)) // app=web, but another namespace

	// Allow from a namespace.
	w.mustTernctl("apply", "-f", w.write("web.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: web-from-dev}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}]}]
`))
	expect(t, "allow from namespace",
		tcp(client, web, 8080, true), udp(devweb, web, 53, true), tcp(api, web, 8080, false))

	// Combined selector (AND) and a named port.
	w.mustTernctl("apply", "-f", w.write("api.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: api}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: client}}}]
  - from: [{podSelector: {}}]
    ports: [{port: metrics}]
`))
	expect(t, "combined selector and named port",
		tcp(client, api, 80, true), tcp(devweb, api, 80, false),
		tcp(web, api, 9090, true), tcp(web, api, 8080, false), tcp(db, api, 9090, true))

	// ipBlock with except, and an endPort range.
	w.mustTernctl("apply", "-f", w.write("block.yaml", fmt.Sprintf(`
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: db-block}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{ipBlock: {cidr: %s, except: [%s/32]}}]
    ports: [{port: 1000, endPort: 1100}]
`, subnet, devweb.IP)))
	expect(t, "ipBlock except and endPort",
		tcp(client, db, 1000, true), tcp(client, db, 1050, true), tcp(client, db, 1100, true), tcp(client, db, 1101, false),
		tcp(devweb, db, 1050, false), tcp(api, db, 1050, true), tcp(client, db, 5432, false))

	// Egress deny with DNS-style UDP allowed; the node stays reachable.
	serve(t, n.NS)
	egress := w.write("egress.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: client-egress}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{ports: [{protocol: UDP, port: 53}]}]
`)
	w.mustTernctl("apply", "-f", egress)
	expect(t, "egress deny, DNS allowed",
		udp(client, devweb, 53, true), udp(client, web, 53, true), udp(client, devweb, 5353, false),
		tcp(client, devweb, 80, false), tcp(client, web, 8080, false),
		tcp(devweb, client, 80, true), // ingress of client is not isolated
		reach{from: client.NS, fromS: client.String(), ip: gateway, toS: "node", proto: "tcp", port: 5432, want: true})

	// What ternctl says is in force.
	out := w.mustTernctl("-o", "json", "get", "policies")
	if !strings.Contains(out, `"name": "client-egress"`) || !strings.Contains(out, `"dev/client"`) {
		t.Errorf("get policies: no client-egress selecting dev/client in\n%s", out)
	}
	if strings.Contains(out, `"prod/late"`) {
		t.Errorf("get policies lists a pod not added yet:\n%s", out)
	}

	// Deleting a policy restores access.
	if out := w.mustTernctl("delete", "-f", egress); !strings.Contains(out, "NetworkPolicy dev/client-egress deleted") {
		t.Errorf("delete: %s", out)
	}
	expect(t, "egress policy deleted", tcp(client, devweb, 80, true), tcp(client, web, 8080, true), udp(client, devweb, 5353, true))

	// A pod added after the policies has them from its first packet.
	late := addK8sPod(t, n, w.conf, "prod", "late")
	expect(t, "pod added after the policies",
		tcp(api, late, 5432, false), tcp(web, late, 5432, true), tcp(client, late, 1050, true), tcp(late, client, 80, true))
	out = w.mustTernctl("-o", "json", "get", "policies")
	if !strings.Contains(out, `"prod/late"`) {
		t.Errorf("get policies does not list prod/late:\n%s", out)
	}

	// A strict error names the object and changes nothing.
	bad := w.write("bad.yaml", strings.Replace(denyAllIngress, "podSelector: {}", "podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: 70000}]}]", 1))
	if _, err := w.ternctl("apply", "-f", bad); err == nil || !strings.Contains(err.Error(), "NetworkPolicy prod/deny-all") {
		t.Errorf("invalid policy: %v", err)
	}
	expect(t, "after a refused apply", tcp(api, web, 80, false), tcp(web, db, 5432, true))

	// Deleting every policy opens everything again.
	w.mustTernctl("delete", "-f", deny, "-f", filepath.Join(w.dir, "db.yaml"), "-f", filepath.Join(w.dir, "web.yaml"), "-f", filepath.Join(w.dir, "api.yaml"), "-f", filepath.Join(w.dir, "block.yaml"))
	expect(t, "all policies deleted",
		tcp(api, web, 80, true), tcp(api, db, 5432, true), tcp(devweb, db, 1050, true), tcp(devweb, api, 80, true), tcp(api, late, 5432, true))
	if out := w.mustTernctl("get", "policies"); strings.Count(out, "\n") != 1 {
		t.Errorf("policies left:\n%s", out)
	}

	// Policies again, then DEL of every pod: nothing of ours is left.
	w.mustTernctl("apply", "-f", deny, "-f", filepath.Join(w.dir, "block.yaml"))
	expect(t, "policies again", tcp(api, web, 80, false))
	for _, p := range []*k8sPod{web, db, api, client, devweb, late} {
		args := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", p.Namespace}, {"K8S_POD_NAME", p.Name}}
		if err := n.Del(t.Context(), w.conf, p.ID, p.Path, "eth0", args); err != nil {
			t.Fatalf("DEL %s: %v", p, err)
		}
	}
	if out, _ := n.Exec(t, "iptables-save"); strings.Contains(out, "TERN") {
		t.Errorf("iptables rules left after DEL of every pod:\n%s", out)
	}
	if out, _ := n.Exec(t, "ipset", "list", "-n"); strings.TrimSpace(out) != "" {
		t.Errorf("ipsets left in the node after DEL of every pod: %s", out)
	}
	// The desired state stays; the record of what was applied goes with
	// the datapath's state.
	if _, err := os.Stat(filepath.Join(n.StateDir, "policy", "state.json")); err != nil {
		t.Errorf("policy state: %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(n.StateDir, "policy", "applied-*")); len(m) != 0 {
		t.Errorf("applied rule set kept after the last DEL: %v", m)
	}
	if dp == "ebpf" {
		if keys := endpointKeys(t, n); len(keys) != 0 {
			t.Errorf("endpoint map not empty after DEL: %v", keys)
		}
		// ReleaseNode took the network's policy state with it.
		for _, name := range []string{"tern_ep_policy", "tern_ipcache", "tern_policy", "tern_policy_ct", "tern_policy_ct_other", "tern_policy_ct_quota"} {
			if k := mapKeys(t, n, name); k != 0 {
				t.Errorf("%s holds %d entries after DEL of every pod", name, k)
			}
		}
	}
}

// mapKeys counts the entries of a pinned map of the node.
func mapKeys(t *testing.T, n *testutil.Node, name string) int {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", name), nil)
	if err != nil {
		t.Fatalf("open %s: %v", name, err)
	}
	defer m.Close()
	var k, v []byte
	count := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		count++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return count
}
