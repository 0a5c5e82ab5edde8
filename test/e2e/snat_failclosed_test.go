package e2e

import (
	"errors"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// podSourcePackets reads the counter of ext's raw PREROUTING rule that
// drops every packet arriving with a pod source address: anything a pod
// sent that left the node untranslated.
func podSourcePackets(t *testing.T, ext ns.NetNS) int {
	t.Helper()
	out, err := testutil.ExecIn(ext, "iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-n", "-x")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 8 && f[2] == "DROP" && f[7] == "10.77.0.0/16" {
			n, err := strconv.Atoi(f[0])
			if err != nil {
				t.Fatalf("counter %q: %v", f[0], err)
			}
			return n
		}
	}
	t.Fatalf("no pod-source rule in ext's raw PREROUTING:\n%s", out)
	return 0
}

// TestSNATFailsClosed (eBPF): what must be masqueraded and cannot be never
// leaves the node with the pod's address. The uplink's MTU is 1280, the
// pods' 1500: a 1400-byte ping without DF is dropped (the stack would
// fragment it and forward the fragments untranslated); with DF the pod
// learns the uplink's MTU from the stack's fragmentation-needed error. An
// ICMP port unreachable a pod sends about a late reply of its masqueraded
// UDP flow reaches the remote translated, so the remote's socket sees the
// refusal. ext counts every packet that arrives with a pod address.
func TestSNATFailsClosed(t *testing.T) {
	testutil.RequirePrivileged(t)
	w := newSNATWorld(t)
	if _, err := w.node.Exec(t, "ip", "link", "set", w.uplink, "mtu", "1280"); err != nil {
		t.Fatal(err)
	}
	if _, err := testutil.ExecIn(w.ext, "iptables", "-t", "raw", "-A", "PREROUTING", "-s", "10.77.0.0/16", "-j", "DROP"); err != nil {
		t.Fatal(err)
	}
	_, conf := w.conf(t, "ebpf", nil)
	a := addPod(t, w.node, conf, "fa")
	b := addPod(t, w.node, conf, "fb")
	c := addPod(t, w.node, conf, "fc")
	if err := testutil.Ping(a.NS, extIP, 2); err != nil {
		t.Fatalf("small ping: %v", err)
	}

	t.Run("too big, DF clear: dropped", func(t *testing.T) {
		out, err := testutil.ExecIn(a.NS, "ping", "-c", "2", "-i", "0.3", "-W", "1", "-M", "dont", "-s", "1400", extIP)
		if err == nil {
			t.Errorf("1400-byte ping without DF got an answer through a 1280 MTU uplink:\n%s", out)
		}
		if m := snatMetrics(t, w.node); m["drop_nat_too_big"] == 0 {
			t.Errorf("drop_nat_too_big is 0 (all: %v)", m)
		}
	})
	t.Run("too big, DF set: the pod learns the MTU", func(t *testing.T) {
		out, _ := testutil.ExecIn(b.NS, "ping", "-c", "2", "-i", "0.3", "-W", "1", "-M", "do", "-s", "1400", extIP)
		if !strings.Contains(out, "mtu = 1280") && !strings.Contains(out, "mtu=1280") {
			// The first error sets the route's MTU; later sends fail locally.
			route, _ := testutil.ExecIn(b.NS, "ip", "route", "get", extIP)
			if !strings.Contains(route, "mtu 1280") {
				t.Errorf("pod b did not learn the uplink MTU 1280: ping:\n%s\nroute: %s", out, route)
			}
		}
	})
	t.Run("ICMP error about a masqueraded flow leaves translated", func(t *testing.T) {
		srv, err := testutil.ListenUDP(w.ext, net.JoinHostPort(extIP, "0"))
		if err != nil {
			t.Fatal(err)
		}
		srvAddr := srv.LocalAddr().(*net.UDPAddr)
		pc, err := dialFrom(c.NS, "udp", srvAddr.String(), 41000)
		if err != nil {
			srv.Close()
			t.Fatal(err)
		}
		if _, err := pc.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		_ = srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 64)
		_, from, err := srv.ReadFrom(buf)
		srv.Close()
		if err != nil {
			t.Fatalf("ext read: %v", err)
		}
		if !strings.HasPrefix(from.String(), extNodeIP+":") {
			t.Fatalf("ext saw %s, want the node IP", from)
		}
		pc.Close() // the pod's port is closed now: it answers port unreachable
		// ext answers late, from the server's address and port, on a
		// connected socket, which reports an ICMP error that quotes
		// exactly this flow as ECONNREFUSED.
		var conn *net.UDPConn
		err = w.ext.Do(func(ns.NetNS) error {
			var err error
			conn, err = net.DialUDP("udp", srvAddr, from.(*net.UDPAddr))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		refused := false
		for i := 0; i < 20 && !refused; i++ {
			if _, err := conn.Write([]byte("late")); err != nil {
				refused = errors.Is(err, syscall.ECONNREFUSED)
				continue
			}
			_ = conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			_, err := conn.Read(buf)
			refused = errors.Is(err, syscall.ECONNREFUSED)
		}
		if !refused {
			t.Errorf("ext never saw the pod's port unreachable for %s (metrics %v)", from, snatMetrics(t, w.node))
		}
	})

	if n := podSourcePackets(t, w.ext); n != 0 {
		t.Errorf("ext received %d packets with a pod source address", n)
	}
	m := snatMetrics(t, w.node)
	for _, name := range []string{"drop_nat_icmp", "drop_nat_no_route", "nat_rev_lost"} {
		if m[name] != 0 {
			t.Errorf("metric %s is %d (all: %v)", name, m[name], m)
		}
	}
}
