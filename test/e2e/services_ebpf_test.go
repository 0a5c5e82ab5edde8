package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// The Services tests of services "ebpf": Tern's own load balancer, fed
// with Service and EndpointSlice manifests through ternctl, in a simulated
// node with an uplink to an "external" namespace standing for a pod on
// another node (its address is in nonMasqueradeCIDRs and it routes the
// pods' subnet back through the node):
//
//	client  dev/client (A)   web  prod/web (B)   db  prod/db (C)
//	10.96.1.10 tcp/80 -> http (B:8080, a named targetPort), udp/53 -> B:53
//	10.96.1.11 tcp/7000 -> B:7000 (whoami: greets with the client address),
//	           NodePort 30090, externalIP 198.51.100.70
//	10.96.1.20 tcp/80 -> A:8080                        (A's own Service)
//	10.96.1.30 tcp/80 -> ext's whoami                  (a backend off the node)
//	10.96.1.40 tcp/80, udp/53: no endpoints            (rejected)
//	10.96.1.50 tcp/7100 -> B:7100, C:7100              (churn: servers that name themselves)
//	10.96.1.50 udp/53 -> B:53, C:53
//	10.96.1.60 tcp/443 -> the node's uplink address:16443 (a host-network
//	           backend on the node, as the API server behind "kubernetes")
const (
	lbWeb    = "10.96.1.10"
	lbWho    = "10.96.1.11"
	lbSelf   = "10.96.1.20"
	lbRemote = "10.96.1.30"
	lbEmpty  = "10.96.1.40"
	lbChurn  = "10.96.1.50"
	lbNode   = "10.96.1.60"
	nodePort = 16443 // the host-network backend's port on the node
	namedTCP = 7100
)

type lbWorld struct {
	*svcWorld
	remotePort int
	// cgroup is the test's cgroup the socket programs attach to
	// (hostServicesCgroup): never the machine's root in tests.
	cgroup string
}

func newLBWorld(t *testing.T) *lbWorld {
	t.Helper()
	sw := &svcWorld{snatWorld: newSNATWorld(t), t: t, bin: ternctlBinary(t), dir: t.TempDir()}
	cgroup := testutil.NewCgroup(t)
	_, sw.conf = sw.snatWorld.conf(t, "ebpf", map[string]any{
		"services":           "ebpf",
		"nonMasqueradeCIDRs": []string{extIP + "/32"},
		"hostServicesCgroup": cgroup,
	})
	sw.confFile = writeTemp(t, "10-tern.conflist", sw.conf)
	sw.a = addK8sPod(t, sw.node, sw.conf, "dev", "client")
	sw.b = addK8sPod(t, sw.node, sw.conf, "prod", "web")
	sw.c = addK8sPod(t, sw.node, sw.conf, "prod", "db")
	serveWhoami(t, sw.b.NS)
	serveNamed(t, sw.b.NS, namedTCP, "web")
	serveNamed(t, sw.c.NS, namedTCP, "db")
	serveWhoamiOn(t, sw.node.NS, nodePort)
	srv := sw.snatWorld.serve(t)
	_, extPort, err := net.SplitHostPort(srv.tcpAddr())
	if err != nil {
		t.Fatal(err)
	}
	w := &lbWorld{svcWorld: sw, cgroup: cgroup}
	w.remotePort, _ = strconv.Atoi(extPort)
	// ext is "another node's pod": it answers pods directly.
	if _, err := testutil.ExecIn(sw.snatWorld.ext, "ip", "route", "add", "10.77.50.0/24", "via", extNodeIP); err != nil {
		t.Fatal(err)
	}
	// ...and sends to the external IP through the node.
	if _, err := testutil.ExecIn(sw.snatWorld.ext, "ip", "route", "add", "198.51.100.70/32", "via", extNodeIP); err != nil {
		t.Fatal(err)
	}
	if _, err := sw.node.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		t.Fatal(err)
	}
	sw.apply("cluster.yaml", policyCluster)
	sw.apply("services.yaml", w.services("ready"))
	return w
}

func writeTemp(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// services is the manifest of the Services above; churnC is C in the
// churn Service: "ready", "terminating" (still serving) or "" (gone).
func (w *lbWorld) services(churnC string) string {
	a, b, c := w.a.IP, w.b.IP, w.c.IP
	switch churnC {
	case "ready":
		churnC = fmt.Sprintf("\n- {addresses: [%s], conditions: {ready: true}}", c)
	case "terminating":
		churnC = fmt.Sprintf("\n- {addresses: [%s], conditions: {ready: false, serving: true, terminating: true}}", c)
	}
	return fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: web}
spec:
  clusterIP: %[4]s
  ports: [{name: http, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP, targetPort: dns}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 53, protocol: UDP}]
endpoints: [{addresses: [%[2]s], conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: who}
spec: {type: NodePort, clusterIP: %[5]s, externalIPs: [198.51.100.70], ports: [{port: 7000, nodePort: 30090}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: who-1, labels: {kubernetes.io/service-name: who}}
addressType: IPv4
ports: [{port: 7000}]
endpoints: [{addresses: [%[2]s]}]
---
apiVersion: v1
kind: Service
metadata: {namespace: dev, name: client}
spec: {clusterIP: %[6]s, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: dev, name: client-1, labels: {kubernetes.io/service-name: client}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [%[1]s]}]
---
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: remote}
spec: {clusterIP: %[7]s, ports: [{port: 80, targetPort: %[11]d}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: remote-1, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{port: %[11]d}]
endpoints: [{addresses: [%[12]s], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: empty}
spec: {clusterIP: %[8]s, ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: churn}
spec: {clusterIP: %[9]s, ports: [{name: named, port: %[13]d}, {name: dns, port: 53, protocol: UDP}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: churn-1, labels: {kubernetes.io/service-name: churn}}
addressType: IPv4
ports: [{name: named, port: %[13]d}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- {addresses: [%[2]s], conditions: {ready: true}}%[10]s
---
apiVersion: v1
kind: Service
metadata: {namespace: default, name: kubernetes}
spec: {clusterIP: %[14]s, ports: [{name: https, port: 443, targetPort: %[16]d}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: default, name: kubernetes, labels: {kubernetes.io/service-name: kubernetes}}
addressType: IPv4
ports: [{name: https, port: %[16]d}]
endpoints: [{addresses: [%[15]s]}]
`, a, b, c, lbWeb, lbWho, lbSelf, lbRemote, lbEmpty, lbChurn, churnC, w.remotePort, extIP, namedTCP,
		lbNode, extNodeIP, nodePort)
}

// TestServicesEBPF drives Tern's own load balancer end to end: ClusterIP
// to a backend on the node (TCP, UDP DNS-style, a named targetPort), the
// client's own address at the backend, a backend off the node, a Service
// without endpoints refused at once, a pod reaching itself through its
// Service under deny-all, NetworkPolicy decided on the backend with the
// same truth table as TestServicesKubeProxy, and backend churn under
// traffic.
func TestServicesEBPF(t *testing.T) {
	testutil.RequirePrivileged(t)
	w := newLBWorld(t)
	a, b, c := w.a, w.b, w.c

	// ternctl shows the table the load balancer got.
	out, err := w.node.Exec(t, w.bin, "--cni-conf", w.confFile, "get", "services")
	if err != nil || !strings.Contains(out, lbWeb+":80/TCP") || !strings.Contains(out, b.IP+":8080") ||
		!strings.Contains(out, lbEmpty+":53/UDP") || !strings.Contains(out, "<reject>") {
		t.Errorf("ternctl get services: %v\n%s", err, out)
	}

	expect(t, "no policy",
		svc(a, lbWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, lbWeb, "prod/web ClusterIP (DNS)", "udp", 53, true),
		svc(c, lbWeb, "prod/web ClusterIP (backend's neighbour)", "tcp", 80, true),
		svc(a, lbSelf, "dev/client's own ClusterIP", "tcp", 80, true),
		svc(b, lbWeb, "prod/web ClusterIP (the backend itself)", "tcp", 80, true),
		svc(a, lbRemote, "prod/remote ClusterIP (backend off the node)", "tcp", 80, true),
		tcp(a, b, 8080, true),
	)
	// The backend sees the client pod's own address (no SNAT), on the
	// node and off it; the answers come back from the ClusterIP (the
	// connection would not complete otherwise).
	for _, p := range []struct{ what, addr string }{
		{"ClusterIP, backend on the node", net.JoinHostPort(lbWho, "7000")},
		{"ClusterIP, backend off the node", net.JoinHostPort(lbRemote, "80")},
		{"ClusterIP, host-network backend on the node", net.JoinHostPort(lbNode, "443")},
		{"NodePort on the node's uplink address", net.JoinHostPort(extNodeIP, "30090")},
		{"external IP", net.JoinHostPort("198.51.100.70", "7000")},
	} {
		if got, err := whoami(a.NS, p.addr); err != nil || got != a.IP {
			t.Errorf("%s: backend saw %q (%v), want %s", p.what, got, err, a.IP)
		}
	}
	// From outside the node (the uplink): the NodePort and the external
	// IP, to a backend on the node, keep the client's address; the answer
	// comes back from the address and port the client used.
	for _, addr := range []string{net.JoinHostPort(extNodeIP, "30090"), net.JoinHostPort("198.51.100.70", "7000")} {
		if got, err := whoami(w.snatWorld.ext, addr); err != nil || got != extIP {
			t.Errorf("ext -> %s: backend saw %q (%v), want the client's address %s", addr, got, err, extIP)
		}
	}
	// A pod reaching itself: its server sees the service-loopback address.
	serveWhoamiOn(t, a.NS, 8081)
	w.apply("self-who.yaml", fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {namespace: dev, name: self-who}
spec: {clusterIP: 10.96.1.21, ports: [{port: 7000, targetPort: 8081}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: dev, name: self-who-1, labels: {kubernetes.io/service-name: self-who}}
addressType: IPv4
ports: [{port: 8081}]
endpoints: [{addresses: [%s]}]
`, a.IP))
	if got, err := whoami(a.NS, "10.96.1.21:7000"); err != nil || got != "169.254.42.1" {
		t.Errorf("hairpin: the pod saw %q (%v), want the service-loopback address 169.254.42.1", got, err)
	}

	// No endpoints: refused at once (ICMP port unreachable), TCP and UDP.
	start := time.Now()
	_, err = dialFrom(a.NS, "tcp", net.JoinHostPort(lbEmpty, "80"), 0)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("TCP to a Service without endpoints: %v, want connection refused", err)
	} else if d := time.Since(start); d > 4*time.Second {
		t.Logf("refused after %s", d) // not asserted: CPU may be stolen
	}
	if err := udpRefused(a.NS, net.JoinHostPort(lbEmpty, "53")); err != nil {
		t.Errorf("UDP to a Service without endpoints: %v", err)
	}

	// Deny-all in A's namespace: A still reaches itself through its
	// Service; nothing else reaches A, A reaches nothing.
	w.apply("deny-dev.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: deny-all}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
`)
	expect(t, "deny-all in dev",
		svc(a, lbSelf, "dev/client's own ClusterIP", "tcp", 80, true),
		tcp(c, a, 8080, false),
		svc(c, lbSelf, "dev/client's ClusterIP from prod/db", "tcp", 80, false),
		svc(a, lbWeb, "prod/web ClusterIP (egress not allowed)", "tcp", 80, false),
		svc(a, lbWeb, "prod/web ClusterIP DNS (egress not allowed)", "udp", 53, false),
		svc(a, lbRemote, "prod/remote ClusterIP (egress not allowed)", "tcp", 80, false),
	)
	// The canonical "egress only to the backend pods by selector".
	w.apply("egress-web.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: egress-web}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: web}}}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}, {protocol: TCP, port: 8080}]
`)
	expect(t, "egress allowed to the backend by selector",
		svc(a, lbWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, lbWeb, "prod/web ClusterIP (DNS)", "udp", 53, true),
		svc(a, lbWho, "prod/who ClusterIP (port not allowed)", "tcp", 7000, false),
		tcp(a, c, 8080, false),
		svc(a, lbSelf, "dev/client's own ClusterIP", "tcp", 80, true),
		svc(a, lbRemote, "prod/remote ClusterIP (backend not selected)", "tcp", 80, false),
	)
	w.remove("egress-web.yaml")
	w.apply("egress-db.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: egress-db}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: db}}}]
`)
	expect(t, "egress allowed only to another pod",
		svc(a, lbWeb, "prod/web ClusterIP", "tcp", 80, false),
		svc(a, lbWeb, "prod/web ClusterIP (DNS)", "udp", 53, false),
		tcp(a, c, 8080, true),
	)
	w.remove("egress-db.yaml")
	w.apply("egress-ext.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: egress-ext}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: `+extIP+`/32}}]
`)
	expect(t, "egress allowed to the off-node backend's address",
		svc(a, lbRemote, "prod/remote ClusterIP", "tcp", 80, true),
		svc(a, lbWeb, "prod/web ClusterIP", "tcp", 80, false),
	)
	w.remove("egress-ext.yaml")
	w.remove("deny-dev.yaml")
	w.apply("egress-web.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: egress-web}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: web}}}]
`)
	expect(t, "egress-only isolation",
		svc(a, lbWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, lbRemote, "prod/remote ClusterIP (backend not selected)", "tcp", 80, false),
	)
	w.remove("egress-web.yaml")
	// Ingress on the backend, decided on the client pod's own address.
	w.apply("ingress-web.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: web-from-client}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: client}}}]
`)
	expect(t, "backend ingress from dev/client only",
		svc(a, lbWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, lbWeb, "prod/web ClusterIP (DNS)", "udp", 53, true),
		svc(c, lbWeb, "prod/web ClusterIP", "tcp", 80, false),
		svc(c, lbWeb, "prod/web ClusterIP (DNS)", "udp", 53, false),
		svc(b, lbWeb, "prod/web's own ClusterIP", "tcp", 80, true),
	)
	w.remove("ingress-web.yaml")

	testLBChurn(t, w)
}

// testLBChurn: connections spread over B and C; C starts terminating
// while they are open (its connections keep working, new ones go to B),
// then leaves the Service: B's connections keep working, C's end with a
// reset (not a hang), new connections all go to B; a DNS-style UDP client
// sending all along is answered.
func testLBChurn(t *testing.T, w *lbWorld) {
	type conn struct {
		c       net.Conn
		r       *bufio.Reader
		backend string
	}
	dial := func() conn {
		t.Helper()
		c, err := dialFrom(w.a.NS, "tcp", net.JoinHostPort(lbChurn, strconv.Itoa(namedTCP)), 0)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		r := bufio.NewReader(c)
		name, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("greeting: %v", err)
		}
		return conn{c, r, strings.TrimSpace(name)}
	}
	var conns []conn
	seen := map[string]int{}
	for i := 0; i < 64 && (seen["web"] == 0 || seen["db"] == 0 || len(conns) < 8); i++ {
		cn := dial()
		conns = append(conns, cn)
		seen[cn.backend]++
	}
	t.Cleanup(func() {
		for _, cn := range conns {
			cn.c.Close()
		}
	})
	if seen["web"] == 0 || seen["db"] == 0 {
		t.Fatalf("64 connections did not reach both backends: %v", seen)
	}

	// DNS-style traffic all along: a new socket (a new flow) per query.
	stop := make(chan struct{})
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		answered int
		failed   int
	)
	wg.Go(func() {
		for i := 0; i < 400; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ok := udpQuery(w.a.NS, net.JoinHostPort(lbChurn, "53"))
			mu.Lock()
			if ok {
				answered++
			} else {
				failed++
			}
			mu.Unlock()
		}
	})

	newOnlyToB := func(step string) {
		t.Helper()
		for range 8 {
			if cn := dial(); cn.backend != "web" {
				t.Errorf("%s: a new connection went to %s", step, cn.backend)
			} else {
				cn.c.Close()
			}
		}
	}
	w.apply("services.yaml", w.services("terminating"))
	for i, cn := range conns {
		_, werr := fmt.Fprintf(cn.c, "drain %d\n", i)
		if line, rerr := cn.r.ReadString('\n'); werr != nil || rerr != nil || line != fmt.Sprintf("drain %d\n", i) {
			t.Errorf("C terminating: connection %d to %s: %q %v %v", i, cn.backend, line, werr, rerr)
		}
	}
	newOnlyToB("C terminating")

	w.apply("services.yaml", w.services(""))

	for i, cn := range conns {
		_, werr := fmt.Fprintf(cn.c, "ping %d\n", i)
		line, rerr := cn.r.ReadString('\n')
		switch cn.backend {
		case "web":
			if werr != nil || rerr != nil || line != fmt.Sprintf("ping %d\n", i) {
				t.Errorf("connection %d to the surviving backend: %q %v %v", i, line, werr, rerr)
			}
		default:
			var ne net.Error
			if rerr == nil || (errors.As(rerr, &ne) && ne.Timeout()) {
				t.Errorf("connection %d to the removed backend: read %q, %v; want a reset", i, line, rerr)
			}
		}
	}
	newOnlyToB("C gone")
	close(stop)
	wg.Wait()
	if answered == 0 || failed > answered/10 {
		t.Errorf("DNS-style queries during the churn: %d answered, %d unanswered", answered, failed)
	}
	t.Logf("DNS-style queries during the churn: %d answered, %d unanswered", answered, failed)
}

// udpQuery sends one datagram from a new socket in n and waits up to 1 s
// for the echo.
func udpQuery(n ns.NetNS, addr string) bool {
	c, err := dialFrom(n, "udp", addr, 0)
	if err != nil {
		return false
	}
	defer c.Close()
	if _, err := c.Write([]byte("query")); err != nil {
		return false
	}
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 16)
	k, err := c.Read(buf)
	return err == nil && string(buf[:k]) == "query"
}
