package e2e

import (
	"errors"
	"fmt"
	"io"
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

// The Services tests run kube-proxy's own iptables rules
// (testutil.InstallKubeProxy) in a simulated node with an uplink to an
// "external" namespace (newSNATWorld), on both datapaths, and probe through
// ClusterIPs, NodePorts and a hostPort:
//
//	client  dev/client  (A)   web  prod/web (B, the backend)   db  prod/db (C)
//	10.96.0.10 tcp/80 -> B:8080, udp/53 -> B:53        (ClusterIP, DNS-style)
//	           udp/54 -> B:54 (nothing listens: port unreachable)
//	10.96.0.13 udp/54 -> B:54 (the same, for an ingress-isolated client)
//	10.96.0.11 tcp/7000 -> B:7000, NodePort 30070, externalTrafficPolicy Local
//	10.96.0.12 tcp/7000 -> B:7000, NodePort 30071, Cluster (masqueraded)
//	10.96.0.20 tcp/80 -> A:8080                         (A's own Service)
//	10.96.0.30 tcp/80 -> ext's server                   (a backend off the node)
//	hostPort 8070/tcp -> B:7000
//
// B also runs a "whoami" server on 7000 that greets each connection with
// the address it came from.
const (
	svcCIDR      = "10.96.0.0/16"
	svcWeb       = "10.96.0.10"
	svcWhoLocal  = "10.96.0.11"
	svcWhoMasq   = "10.96.0.12"
	svcSelf      = "10.96.0.20"
	svcClosed    = "10.96.0.13"
	svcRemote    = "10.96.0.30"
	npLocal      = 30070
	npCluster    = 30071
	hostPortWho  = 8070
	whoamiPort   = 7000
	svcTestCIDRs = "10.77.0.0/16" // the conflist's clusterCIDR: kube-proxy's --cluster-cidr
)

type svcWorld struct {
	*snatWorld
	t        *testing.T
	conf     []byte
	confFile string
	bin      string
	dir      string
	a, b, c  *k8sPod
}

func newSvcWorld(t *testing.T, dp string) *svcWorld {
	t.Helper()
	w := &svcWorld{snatWorld: newSNATWorld(t), t: t, bin: ternctlBinary(t), dir: t.TempDir()}
	_, w.conf = w.snatWorld.conf(t, dp, map[string]any{"serviceCIDR": []string{svcCIDR}})
	w.confFile = filepath.Join(t.TempDir(), "10-tern.conflist")
	if err := os.WriteFile(w.confFile, w.conf, 0o600); err != nil {
		t.Fatal(err)
	}
	w.a = addK8sPod(t, w.node, w.conf, "dev", "client")
	w.b = addK8sPod(t, w.node, w.conf, "prod", "web")
	w.c = addK8sPod(t, w.node, w.conf, "prod", "db")
	serveWhoami(t, w.b.NS)
	srv := w.snatWorld.serve(t)
	_, extPort, err := net.SplitHostPort(srv.tcpAddr())
	if err != nil {
		t.Fatal(err)
	}
	remotePort, _ := strconv.Atoi(extPort)
	// ext answers pods directly (kube-proxy does not masquerade a pod's
	// traffic to a ClusterIP): a route to the pods via the node.
	if _, err := testutil.ExecIn(w.snatWorld.ext, "ip", "route", "add", svcTestCIDRs, "via", extNodeIP); err != nil {
		t.Fatal(err)
	}

	services := []testutil.KubeService{
		{Namespace: "prod", Name: "web", PortName: "http", Protocol: "tcp", ClusterIP: svcWeb, Port: 80,
			Endpoints: []testutil.KubeEndpoint{{IP: w.b.IP, Port: 8080, Local: true}}},
		{Namespace: "prod", Name: "web", PortName: "dns", Protocol: "udp", ClusterIP: svcWeb, Port: 53,
			Endpoints: []testutil.KubeEndpoint{{IP: w.b.IP, Port: 53, Local: true}}},
		{Namespace: "prod", Name: "web", PortName: "closed", Protocol: "udp", ClusterIP: svcWeb, Port: 54,
			Endpoints: []testutil.KubeEndpoint{{IP: w.b.IP, Port: 54, Local: true}}},
		{Namespace: "prod", Name: "closed", Protocol: "udp", ClusterIP: svcClosed, Port: 54,
			Endpoints: []testutil.KubeEndpoint{{IP: w.b.IP, Port: 54, Local: true}}},
		{Namespace: "prod", Name: "who-local", Protocol: "tcp", ClusterIP: svcWhoLocal, Port: whoamiPort,
			NodePort: npLocal, ExternalLocal: true,
			Endpoints: []testutil.KubeEndpoint{{IP: w.b.IP, Port: whoamiPort, Local: true}}},
		{Namespace: "prod", Name: "who-cluster", Protocol: "tcp", ClusterIP: svcWhoMasq, Port: whoamiPort,
			NodePort:  npCluster,
			Endpoints: []testutil.KubeEndpoint{{IP: w.b.IP, Port: whoamiPort, Local: true}}},
		{Namespace: "dev", Name: "client", Protocol: "tcp", ClusterIP: svcSelf, Port: 80,
			Endpoints: []testutil.KubeEndpoint{{IP: w.a.IP, Port: 8080, Local: true}}},
		{Namespace: "prod", Name: "remote", Protocol: "tcp", ClusterIP: svcRemote, Port: 80,
			Endpoints: []testutil.KubeEndpoint{{IP: extIP, Port: remotePort}}},
	}
	if err := testutil.InstallKubeProxy(w.node.NS, svcTestCIDRs, services); err != nil {
		t.Fatal(err)
	}
	if err := testutil.HostPort(w.node.NS, "tcp", hostPortWho, w.b.IP, whoamiPort); err != nil {
		t.Fatal(err)
	}
	// What a kube-proxy node has: bridged traffic is not involved in
	// eBPF mode, and route_localnet is irrelevant to these probes.
	if _, err := w.node.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		t.Fatal(err)
	}
	w.apply("cluster.yaml", policyCluster)
	return w
}

func (w *svcWorld) ternctl(args ...string) {
	w.t.Helper()
	out, err := w.node.Exec(w.t, w.bin, append([]string{"--cni-conf", w.confFile}, args...)...)
	if err != nil {
		w.t.Fatalf("ternctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (w *svcWorld) apply(name, body string) {
	w.t.Helper()
	p := filepath.Join(w.dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		w.t.Fatal(err)
	}
	w.ternctl("apply", "-f", p)
}

func (w *svcWorld) remove(name string) {
	w.t.Helper()
	w.ternctl("delete", "-f", filepath.Join(w.dir, name))
}

// svc is a probe from a pod to a Service address.
func svc(from *k8sPod, ip, name, proto string, port int, want bool) reach {
	return reach{from: from.NS, fromS: from.String(), ip: ip, toS: name, proto: proto, port: port, want: want}
}

// ext is a probe from the external namespace to the node.
func (w *svcWorld) ext(name string, port int, want bool) reach {
	return reach{from: w.snatWorld.ext, fromS: "ext", ip: extNodeIP, toS: name, proto: "tcp", port: port, want: want}
}

// serveWhoami runs, in n, a TCP server on whoamiPort that greets each
// connection with its remote address and then echoes (tcpSeen's protocol).
func serveWhoami(t *testing.T, n ns.NetNS) { serveWhoamiOn(t, n, whoamiPort) }

// serveWhoamiOn is serveWhoami on another port.
func serveWhoamiOn(t *testing.T, n ns.NetNS, port int) {
	t.Helper()
	serveGreeting(t, n, port, 10*time.Second, func(c net.Conn) string { return c.RemoteAddr().String() })
}

// serveNamed runs, in n, a TCP server on port that greets each connection
// with name and then echoes lines.
func serveNamed(t *testing.T, n ns.NetNS, port int, name string) {
	t.Helper()
	serveGreeting(t, n, port, 60*time.Second, func(net.Conn) string { return name })
}

// serveGreeting runs, in n, a TCP server on port that writes greet's line
// to each connection and then echoes, each connection for at most
// deadline. At the end of the test it stops and waits for its connections.
func serveGreeting(t *testing.T, n ns.NetNS, port int, deadline time.Duration, greet func(net.Conn) string) {
	t.Helper()
	l, err := testutil.ListenTCP(n, "0.0.0.0:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(deadline))
				if _, err := fmt.Fprintf(c, "%s\n", greet(c)); err != nil {
					return
				}
				_, _ = io.Copy(c, c)
			})
		}
	})
}

// whoami connects from n to addr and returns the client address the
// server saw. A connection that completes proves the answers came back
// from the address dialled (the client's kernel refuses anything else).
func whoami(n ns.NetNS, addr string) (string, error) {
	seen, err := tcpSeen(n, addr, 0, []byte("tern-services"))
	if err != nil {
		return "", err
	}
	host, _, err := net.SplitHostPort(seen)
	return host, err
}

// TestServicesKubeProxy drives Services through kube-proxy's real rules on
// both datapaths: ClusterIP to a backend on the same node (TCP and UDP), a
// pod reaching itself through its Service, NodePort with
// externalTrafficPolicy Local (client address kept, answer from the node
// port) and Cluster (masqueraded), a hostPort DNAT; then NetworkPolicy
// decided on the translated packets.
func TestServicesKubeProxy(t *testing.T) {
	for _, dp := range []string{"iptables", "ebpf"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			testServicesKubeProxy(t, dp)
		})
	}
}

// TestServicesAfterDirectFlow: a pod's socket talks to a backend pod
// directly, then, from the same port, to the backend's ClusterIP: once the
// stack has DNATed it, the second flow has the first one's tuple, and its
// answers must come back through the stack, from the ClusterIP. On the eBPF
// datapath the first flow's policy conntrack entry was marked "no flow of
// the host stack" (POLICY_CT_F_NO_STACK, which spares later packets the
// tern_stack_ct lookup); the stack's delivery of the second flow clears it,
// or the backend's answers would go past the stack, from its own address,
// and the client's socket (connected to the ClusterIP) would never read
// them.
func TestServicesAfterDirectFlow(t *testing.T) {
	for _, dp := range []string{"iptables", "ebpf"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := newSvcWorld(t, dp)
			const port = 41053
			if err := udpEchoFrom(w.a.NS, net.JoinHostPort(w.b.IP, "53"), port); err != nil {
				t.Fatalf("A:%d -> B:53 directly: %v", port, err)
			}
			if err := udpEchoFrom(w.a.NS, net.JoinHostPort(svcWeb, "53"), port); err != nil {
				t.Fatalf("A:%d -> %s:53 (DNATed to B:53) after the direct flow: %v", port, svcWeb, err)
			}
		})
	}
}

func testServicesKubeProxy(t *testing.T, dp string) {
	w := newSvcWorld(t, dp)
	a, b, c := w.a, w.b, w.c

	expect(t, "no policy",
		svc(a, svcWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, svcWeb, "prod/web ClusterIP (DNS)", "udp", 53, true),
		svc(c, svcWeb, "prod/web ClusterIP (backend's neighbour)", "tcp", 80, true),
		svc(b, svcWeb, "prod/web ClusterIP (the backend itself)", "tcp", 80, true),
		svc(a, svcSelf, "dev/client's own ClusterIP", "tcp", 80, true),
		svc(a, svcRemote, "prod/remote ClusterIP (backend off the node)", "tcp", 80, true),
		tcp(a, b, 8080, true),
	)

	// A ClusterIP nothing translates (no such Service) must not leave the
	// node, with the pod's address or masqueraded (anything out there
	// could answer for it: on the real node a proxy of the machine's
	// network did, and the conformance spec "same port and different
	// protocols" saw its TCP port answer after the Service lost it): ext
	// counts what reaches it for the Service range.
	if _, err := testutil.ExecIn(w.snatWorld.ext, "iptables", "-w", "5", "-t", "raw", "-I", "PREROUTING",
		"-d", svcCIDR); err != nil {
		t.Fatal(err)
	}
	expect(t, "a ClusterIP without a Service",
		svc(a, "10.96.0.99", "10.96.0.99 (no Service)", "udp", 53, false),
		svc(a, "10.96.0.99", "10.96.0.99 (no Service)", "tcp", 80, false),
	)
	out, err := testutil.ExecIn(w.snatWorld.ext, "iptables", "-w", "5", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n")
	if err != nil {
		t.Fatal(err)
	}
	if leaked := pktCount(t, out, svcCIDR); leaked != 0 {
		t.Errorf("%d packets to the Service range left the node:\n%s", leaked, out)
	}

	// The backend's ICMP port unreachable reaches the client's socket,
	// which is connected to the ClusterIP.
	if err := udpRefused(a.NS, net.JoinHostPort(svcWeb, "54")); err != nil {
		t.Errorf("no policy: %v", err)
	}

	// The client address the backend sees, and that the answer comes back
	// from the address the client used.
	for _, p := range []struct {
		what, addr string
		want       func(string) bool
		wantS      string
	}{
		{"A -> ClusterIP", net.JoinHostPort(svcWhoLocal, strconv.Itoa(whoamiPort)), func(s string) bool { return s == a.IP }, "A's own address"},
		{"A -> node:NodePort", net.JoinHostPort(extNodeIP, strconv.Itoa(npLocal)), func(s string) bool { return s == a.IP }, "A's own address"},
		{"A -> node:hostPort", net.JoinHostPort(extNodeIP, strconv.Itoa(hostPortWho)), func(s string) bool { return s == a.IP }, "A's own address"},
	} {
		got, err := whoami(a.NS, p.addr)
		if err != nil || !p.want(got) {
			t.Errorf("%s: backend saw %q (%v), want %s", p.what, got, err, p.wantS)
		}
	}
	for _, p := range []struct {
		what  string
		port  int
		want  func(string) bool
		wantS string
	}{
		{"NodePort, externalTrafficPolicy Local", npLocal, func(s string) bool { return s == extIP }, "the client's address " + extIP},
		{"hostPort", hostPortWho, func(s string) bool { return s == extIP }, "the client's address " + extIP},
		{"NodePort, externalTrafficPolicy Cluster", npCluster, func(s string) bool { return s != "" && s != extIP }, "a node address (masqueraded)"},
	} {
		got, err := whoami(w.snatWorld.ext, net.JoinHostPort(extNodeIP, strconv.Itoa(p.port)))
		if err != nil || !p.want(got) {
			t.Errorf("%s from ext: backend saw %q (%v), want %s", p.what, got, err, p.wantS)
		}
	}

	// Deny-all ingress in A's namespace: A still reaches itself through
	// its Service; nothing else reaches A.
	w.apply("deny-dev.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: deny-all}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
`)
	expect(t, "deny-all in dev",
		svc(a, svcSelf, "dev/client's own ClusterIP", "tcp", 80, true),
		tcp(c, a, 8080, false),
		svc(a, svcWeb, "prod/web ClusterIP (egress not allowed)", "tcp", 80, false),
		svc(a, svcWeb, "prod/web ClusterIP DNS (egress not allowed)", "udp", 53, false),
		svc(a, svcRemote, "prod/remote ClusterIP (egress not allowed)", "tcp", 80, false),
	)

	// The canonical "egress only to the backend pods by selector" policy:
	// decided on the translated packet, so the ClusterIP works without an
	// ipBlock for the Service CIDR.
	w.apply("egress-web.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: egress-web}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: web}}}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}, {protocol: TCP, port: 8080}, {protocol: UDP, port: 54}]
`)
	// A is isolated for ingress too: the error is related to its allowed
	// flow and passes. (Another ClusterIP than above: policy tracks ICMP
	// errors between two addresses as one flow, and the one before, sent
	// while A was not isolated, would let this one pass on its own.)
	if err := udpRefused(a.NS, net.JoinHostPort(svcClosed, "54")); err != nil {
		t.Errorf("egress allowed to the backend by selector: %v", err)
	}
	expect(t, "egress allowed to the backend by selector",
		svc(a, svcWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, svcWeb, "prod/web ClusterIP (DNS)", "udp", 53, true),
		svc(a, svcWhoLocal, "prod/who-local ClusterIP (port not allowed)", "tcp", whoamiPort, false),
		tcp(a, c, 8080, false),
		svc(a, svcSelf, "dev/client's own ClusterIP", "tcp", 80, true),
		// The backend off the node is decided at the uplink, after DNAT.
		svc(a, svcRemote, "prod/remote ClusterIP (backend not selected)", "tcp", 80, false),
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
		svc(a, svcWeb, "prod/web ClusterIP", "tcp", 80, false),
		svc(a, svcWeb, "prod/web ClusterIP (DNS)", "udp", 53, false),
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
		svc(a, svcRemote, "prod/remote ClusterIP", "tcp", 80, true),
		svc(a, svcWeb, "prod/web ClusterIP", "tcp", 80, false),
	)
	w.remove("egress-ext.yaml")
	w.remove("deny-dev.yaml")

	// Egress isolation alone (answers would pass A's ingress): the
	// off-node backend must still be refused by A's egress rules.
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
		svc(a, svcWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, svcRemote, "prod/remote ClusterIP (backend not selected)", "tcp", 80, false),
	)
	w.remove("egress-web.yaml")

	// Ingress on the backend, decided on the client's address.
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
		svc(a, svcWeb, "prod/web ClusterIP", "tcp", 80, true),
		svc(a, svcWeb, "prod/web ClusterIP (DNS)", "udp", 53, true),
		svc(c, svcWeb, "prod/web ClusterIP", "tcp", 80, false),
		svc(c, svcWeb, "prod/web ClusterIP (DNS)", "udp", 53, false),
		svc(b, svcWeb, "prod/web's own ClusterIP", "tcp", 80, true),
		// NodePort: decided on the external client's address, masqueraded
		// by kube-proxy or not.
		w.ext("NodePort Local", npLocal, false),
		w.ext("NodePort Cluster (masqueraded)", npCluster, false),
		w.ext("hostPort", hostPortWho, false),
	)
	w.apply("ingress-ext.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: web-from-ext}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{ipBlock: {cidr: `+extIP+`/32}}]
    ports: [{port: `+strconv.Itoa(whoamiPort)+`}]
`)
	expect(t, "backend ingress from the external client's address",
		w.ext("NodePort Local", npLocal, true),
		w.ext("NodePort Cluster (masqueraded)", npCluster, true),
		w.ext("hostPort", hostPortWho, true),
		svc(c, svcWeb, "prod/web ClusterIP", "tcp", 80, false),
	)
}

// pktCount is the packet counter of the rule of an `iptables -L -v -x -n`
// listing whose destination is dst.
func pktCount(t *testing.T, listing, dst string) int {
	t.Helper()
	for _, line := range strings.Split(listing, "\n") {
		f := strings.Fields(line)
		if len(f) >= 8 && f[len(f)-1] == dst {
			n, err := strconv.Atoi(f[0])
			if err != nil {
				t.Fatalf("counter of %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatalf("no rule for %s in:\n%s", dst, listing)
	return 0
}

// udpRefused sends datagrams from n to addr until the socket reports the
// port unreachable (connection refused), for up to 5 s.
func udpRefused(n ns.NetNS, addr string) error {
	c, err := dialFrom(n, "udp", addr, 0)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 64)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := c.Write([]byte("tern-refused")); err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				return nil
			}
			return fmt.Errorf("udp %s: write: %w", addr, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, err := c.Read(buf)
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil
		}
		if err == nil {
			return fmt.Errorf("udp %s: got an answer, want port unreachable", addr)
		}
	}
	return fmt.Errorf("udp %s: no port unreachable reached the socket", addr)
}
