package e2e

import (
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/ternlabs/tern/internal/testutil"
)

// The socket client of testutil.SockClient: this test binary, re-executed.
func init() { testutil.SockClientMain() }

// TestHostClusterIP: with services "ebpf", processes of the node itself
// (here: a process in the node's network namespace, moved into the test's
// cgroup, where the plugin attached the socket programs) reach Services:
// TCP to a ClusterIP gets the backend's answer and sees the ClusterIP as
// its peer; a DNS-style UDP exchange, from an unconnected and from a
// connected socket, gets its answer from the ClusterIP; a NodePort on the
// node's own address works; a Service without endpoints refuses at once,
// TCP and UDP; a backend removed from the Service is no longer chosen.
// A process of the same cgroup in a pod's namespace is left to
// tern_from_pod (its peer is the backend seen through the tc load
// balancer, not translated twice).
func TestHostClusterIP(t *testing.T) {
	testutil.RequirePrivileged(t)
	w := newLBWorld(t)
	node := w.node.NS
	host := func(args ...string) (string, error) { return testutil.SockClient(node, w.cgroup, args...) }

	// TCP: whoami greets with the client address the backend saw.
	who := net.JoinHostPort(lbWho, "7000")
	out, err := host("tcp", who)
	if err != nil || !strings.HasPrefix(out, who+" ") || len(strings.Fields(out)) != 2 {
		t.Errorf("host -> %s: %q (%v), want the ClusterIP as peer and the backend's greeting", who, out, err)
	}
	// The NodePort on the node's address, from the node.
	np := net.JoinHostPort(extNodeIP, "30090")
	if out, err := host("tcp", np); err != nil || !strings.HasPrefix(out, np+" ") {
		t.Errorf("host -> NodePort %s: %q (%v)", np, out, err)
	}
	// UDP (B echoes): the answer comes from the ClusterIP, as a DNS
	// client checks.
	dns := net.JoinHostPort(lbWeb, "53")
	for _, mode := range []string{"udp", "udpconn"} {
		if out, err := host(mode, dns, "query-"+mode); err != nil || out != dns+" query-"+mode {
			t.Errorf("host %s -> %s: %q (%v), want %q", mode, dns, out, err, dns+" query-"+mode)
		}
	}

	// No endpoints: connection refused, TCP and UDP.
	for _, args := range [][]string{
		{"tcp", net.JoinHostPort(lbEmpty, "80")},
		{"udp", net.JoinHostPort(lbEmpty, "53"), "q"},
	} {
		if out, err := host(args...); err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("host %v (no endpoints): %q (%v), want connection refused", args, out, err)
		}
	}

	// Backends followed: both churn backends answer; once db leaves the
	// Service, only web does.
	churn := net.JoinHostPort(lbChurn, "7100")
	seen := map[string]bool{}
	for i := 0; i < 40 && len(seen) < 2; i++ {
		out, err := host("tcp", churn)
		if err != nil {
			t.Fatalf("host -> %s: %v", churn, err)
		}
		seen[strings.TrimPrefix(out, churn+" ")] = true
	}
	if !seen["web"] || !seen["db"] {
		t.Errorf("host -> %s reached %v, want web and db", churn, seen)
	}
	w.apply("services.yaml", w.services(""))
	for i := 0; i < 12; i++ {
		if out, err := host("tcp", churn); err != nil || out != churn+" web" {
			t.Fatalf("host -> %s after db left: %q (%v), want web", churn, out, err)
		}
	}

	// The same cgroup, a pod's namespace: left to tern_from_pod. A pod
	// reaching itself through its Service is told apart: through the tc
	// load balancer its server sees the service-loopback address; had the
	// socket program translated the connect, it would see its own.
	serveWhoamiOn(t, w.a.NS, 8081)
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
`, w.a.IP))
	if out, err := testutil.SockClient(w.a.NS, w.cgroup, "tcp", "10.96.1.21:7000"); err != nil ||
		!strings.HasPrefix(out, "10.96.1.21:7000 169.254.42.1:") {
		t.Errorf("pod -> its own Service from the host's cgroup: %q (%v), want the service-loopback address at the server", out, err)
	}
}
