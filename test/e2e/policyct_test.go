package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// Ports of the long-lived echo servers of TestPolicyKeepsEstablished.
const (
	establishedTCPPort = 7000
	establishedUDPPort = 7001
)

const denyAllEgressDev = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: deny-egress}
spec:
  podSelector: {}
  policyTypes: [Egress]
`

// TestPolicyKeepsEstablished: a TCP connection and a UDP flow set up while
// no policy existed on the node go on, both ways, after policies that deny
// new such flows (ingress of the server, egress of the client) are applied;
// new flows are denied. Both datapaths: the semantics of a policy change
// for established flows is "keep" (docs/policy.md).
func TestPolicyKeepsEstablished(t *testing.T) {
	for _, dp := range []string{"iptables", "ebpf"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			testPolicyKeepsEstablished(t, dp)
		})
	}
}

func testPolicyKeepsEstablished(t *testing.T, dp string) {
	w := newPolicyWorld(t, dp)
	web := addK8sPod(t, w.node, w.conf, "prod", "web")
	client := addK8sPod(t, w.node, w.conf, "dev", "client")
	serveEcho(t, web.NS)
	tcpAddr := net.JoinHostPort(web.IP, strconv.Itoa(establishedTCPPort))
	udpAddr := net.JoinHostPort(web.IP, strconv.Itoa(establishedUDPPort))

	var tc, uc net.Conn
	if err := client.NS.Do(func(ns.NetNS) error {
		var err error
		if tc, err = net.DialTimeout("tcp4", tcpAddr, 5*time.Second); err != nil {
			return err
		}
		uc, err = net.Dial("udp4", udpAddr)
		return err
	}); err != nil {
		t.Fatalf("connect before any policy: %v", err)
	}
	defer tc.Close()
	defer uc.Close()
	if err := echoTCP(tc, "before"); err != nil {
		t.Fatalf("TCP before any policy: %v", err)
	}
	if err := echoUDP(uc, "before"); err != nil {
		t.Fatalf("UDP before any policy: %v", err)
	}

	// The node's first policy state: objects, then default deny for
	// prod's ingress and dev's egress.
	w.mustTernctl("apply", "-f", w.write("cluster.yaml", policyCluster))
	w.mustTernctl("apply", "-f", w.write("deny.yaml", denyAllIngress))
	w.mustTernctl("apply", "-f", w.write("deny-egress.yaml", denyAllEgressDev))

	// New flows are denied (this also waits for the policy to be in force).
	for _, r := range []reach{tcp(client, web, establishedTCPPort, false), udp(client, web, establishedUDPPort, false)} {
		got, err := testutil.Probe(false, r.connects)
		if err != nil || got {
			t.Errorf("after the deny policies: %v (connected %v, err %v)", r, got, err)
		}
	}
	// The established ones go on, several round trips each.
	for i := range 3 {
		msg := fmt.Sprintf("after-%d", i)
		if err := echoTCP(tc, msg); err != nil {
			t.Errorf("established TCP connection after the deny policies: %v", err)
		}
		if err := echoUDP(uc, msg); err != nil {
			t.Errorf("established UDP flow after the deny policies: %v", err)
		}
	}
}

// serveEcho runs TCP and UDP echo servers on the established* ports in n
// until the test ends.
func serveEcho(t *testing.T, n ns.NetNS) {
	t.Helper()
	serveTCP(t, n, establishedTCPPort, func(c net.Conn) {
		t.Cleanup(func() { c.Close() })
		go io.Copy(c, c)
	})
	udpEchoServer(t, n, establishedUDPPort)
}

// echoTCP sends msg on c and reads it back.
func echoTCP(c net.Conn, msg string) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	return nil
}

// echoUDP sends msg on c until it comes back (datagrams may be lost), for
// up to 10 s.
func echoUDP(c net.Conn, msg string) error {
	buf := make([]byte, 64)
	for range 10 {
		if _, err := c.Write([]byte(msg)); err != nil {
			time.Sleep(time.Second)
			continue
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		if k, err := c.Read(buf); err == nil && bytes.Equal(buf[:k], []byte(msg)) {
			return nil
		}
	}
	return fmt.Errorf("no echo of %q in 10 s", msg)
}
