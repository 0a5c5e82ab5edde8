package e2e

import (
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestHairpin: a pod reaches itself through a node-level DNAT, as through a
// Service whose only backend it is, on every datapath variant. The network
// is configured as the README says for kube-proxy clusters: the Service
// CIDR in nonMasqueradeCIDRs, so that Service traffic reaches the node's
// DNAT instead of being masqueraded out of the uplink.
func TestHairpin(t *testing.T) {
	for _, v := range []struct {
		name, dp string
		extra    map[string]any
	}{
		{"ebpf", "ebpf", nil},
		{"ebpf-clsact", "ebpf", map[string]any{"tcAttach": "legacy"}},
		{"iptables", "iptables", nil},
	} {
		t.Run(v.name, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := newSNATWorld(t)
			extra := map[string]any{"nonMasqueradeCIDRs": []string{"10.96.0.0/12"}}
			for k, val := range v.extra {
				extra[k] = val
			}
			_, conf := w.conf(t, v.dp, extra)
			addPod(t, w.node, conf, "other") // the pod is not alone on the node
			p := addPod(t, w.node, conf, "hp")
			hairpinThroughDNAT(t, w.node, p)
		})
	}
}

// hairpinVIP is the Service-like address hairpinThroughDNAT translates.
const hairpinVIP = "10.96.0.10"

// hairpinThroughDNAT has pod p reach itself the way it reaches a Service
// whose only backend it is: p connects to hairpinVIP:80, which the node
// DNATs to p's own listener, masquerading the hairpin flow as kube-proxy
// does (a packet from p's own address would arrive as a martian). The
// request leaves p, crosses the node and comes back in; the reply takes
// the way back. Both directions must carry data. (A ping to the pod's own
// address would be answered by its lo, never leaving the pod.)
func hairpinThroughDNAT(t *testing.T, node *testutil.Node, p *pod) {
	t.Helper()
	l, err := testutil.ListenTCP(p.NS, "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	rules := [][]string{
		{"-t", "nat", "PREROUTING", "-d", hairpinVIP, "-p", "tcp", "--dport", "80", "-j", "DNAT", "--to-destination", p.IP + ":" + port},
		{"-t", "nat", "POSTROUTING", "-s", p.IP, "-d", p.IP, "-p", "tcp", "--dport", port, "-j", "MASQUERADE"},
	}
	for _, r := range rules {
		if _, err := node.Exec(t, "iptables", append([]string{"-w", r[0], r[1], "-I", r[2]}, r[3:]...)...); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _, _ = node.Exec(t, "iptables", append([]string{"-w", r[0], r[1], "-D", r[2]}, r[3:]...)...) })
	}

	type accepted struct {
		remote string
		got    string
		err    error
	}
	done := make(chan accepted, 1)
	go func() {
		l.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
		conn, err := l.Accept()
		if err != nil {
			done <- accepted{err: err}
			return
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		n, err := conn.Read(buf)
		if err == nil {
			_, err = conn.Write([]byte("pong:" + string(buf[:n])))
		}
		done <- accepted{remote: conn.RemoteAddr().String(), got: string(buf[:n]), err: err}
	}()
	conn, err := testutil.Dial(p.NS, "tcp4", net.JoinHostPort(hairpinVIP, "80"))
	if err != nil {
		t.Fatalf("pod %s to itself through %s:80: %v", p.IP, hairpinVIP, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 64)
	n, err := conn.Read(reply)
	if err != nil || string(reply[:n]) != "pong:ping" {
		t.Errorf("hairpin reply %q, %v; want \"pong:ping\"", reply[:n], err)
	}
	a := <-done
	if a.err != nil || a.got != "ping" {
		t.Errorf("the pod's listener got %q, %v", a.got, a.err)
	}
	// Proof that the flow left the pod: translated, it came from the node's
	// masquerade address, not from the pod's own.
	if strings.HasPrefix(a.remote, p.IP+":") {
		t.Errorf("the listener saw the pod's own address %s: the flow never left the pod", a.remote)
	}
}
