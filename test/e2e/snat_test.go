package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// The SNAT tests build, per test, a node whose uplink is a veth to an
// "external" namespace standing in for the internet:
//
//	node  uplink 192.0.2.1/24, default via 192.0.2.2
//	ext   192.0.2.2/24, no route to the pods (10.77.0.0/16)
//
// so a pod's packet only gets an answer from ext if it left with the node's
// address.
const (
	extNodeIP = "192.0.2.1"
	extIP     = "192.0.2.2"
	// The eBPF datapath's default NAT source ports.
	natPortMin = 61000
	natPortMax = 65535
)

type snatWorld struct {
	node   *testutil.Node
	ext    ns.NetNS
	uplink string // node side of the uplink veth
}

func newSNATWorld(t testing.TB) *snatWorld {
	t.Helper()
	w := &snatWorld{node: testutil.NewNode(t), ext: testutil.NewNetNS(t, "ext"), uplink: testutil.UniqueName("up")}
	peer := testutil.UniqueName("upx")
	err := w.node.NS.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: w.uplink},
			PeerName:      peer,
			PeerNamespace: netlink.NsFd(int(w.ext.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add uplink veth: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Deleting one end deletes both; the namespaces' removal would too,
	// but only once nothing holds them.
	t.Cleanup(func() { _, _ = w.node.Exec(t, "ip", "link", "del", w.uplink) })
	for _, c := range []struct {
		n    ns.NetNS
		cmds [][]string
	}{
		{w.node.NS, [][]string{
			{"ip", "addr", "add", extNodeIP + "/24", "dev", w.uplink},
			{"ip", "link", "set", w.uplink, "up"},
			{"ip", "route", "add", "default", "via", extIP},
		}},
		{w.ext, [][]string{
			{"ip", "addr", "add", extIP + "/24", "dev", peer},
			{"ip", "link", "set", peer, "up"},
		}},
	} {
		for _, cmd := range c.cmds {
			if _, err := testutil.ExecIn(c.n, cmd[0], cmd[1:]...); err != nil {
				t.Fatal(err)
			}
		}
	}
	return w
}

// conf is the world's network config for datapath dp with extra fields.
func (w *snatWorld) conf(t testing.TB, dp string, extra map[string]any) (string, []byte) {
	t.Helper()
	network := testutil.UniqueName("net")
	return network, conflist(t, w.node, network, netConf{Datapath: dp, Subnet: "10.77.50.0/24", Extra: extra})
}

// seenServer runs in ext: a TCP server that greets every connection with
// the address it came from, then echoes; and a UDP server that answers each
// datagram with "<source> <payload>". It records every source it saw.
type seenServer struct {
	tcp  net.Listener
	udp  net.PacketConn
	mu   sync.Mutex
	seen []string
}

func (w *snatWorld) serve(t *testing.T) *seenServer {
	t.Helper()
	s := &seenServer{}
	var err error
	if s.tcp, err = testutil.ListenTCP(w.ext, net.JoinHostPort(extIP, "0")); err != nil {
		t.Fatal(err)
	}
	if s.udp, err = testutil.ListenUDP(w.ext, net.JoinHostPort(extIP, "0")); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		s.tcp.Close()
		s.udp.Close()
		wg.Wait()
	})
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			c, err := s.tcp.Accept()
			if err != nil {
				return
			}
			s.record(c.RemoteAddr().String())
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := fmt.Fprintf(c, "%s\n", c.RemoteAddr()); err != nil {
					return
				}
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	go func() {
		defer wg.Done()
		buf := make([]byte, 2048)
		for {
			n, peer, err := s.udp.ReadFrom(buf)
			if err != nil {
				return
			}
			s.record(peer.String())
			_, _ = s.udp.WriteTo([]byte(peer.String()+" "+string(buf[:n])), peer)
		}
	}()
	return s
}

func (s *seenServer) record(addr string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seen = append(s.seen, addr)
}

func (s *seenServer) sources() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.seen...)
}

func (s *seenServer) tcpAddr() string { return s.tcp.Addr().String() }
func (s *seenServer) udpAddr() string { return s.udp.LocalAddr().String() }

// dialFrom dials from inside n, from local port lport (0: any).
func dialFrom(n ns.NetNS, network, raddr string, lport int) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func(ns.NetNS) error {
		d := net.Dialer{Timeout: 5 * time.Second}
		if lport != 0 {
			if network == "tcp" {
				d.LocalAddr = &net.TCPAddr{Port: lport}
			} else {
				d.LocalAddr = &net.UDPAddr{Port: lport}
			}
		}
		var err error
		c, err = d.Dial(network, raddr)
		return err
	})
	return c, err
}

// tcpSeen connects from n (from lport, 0: any), reads the source ext saw,
// checks that a payload comes back intact and returns that source.
func tcpSeen(n ns.NetNS, addr string, lport int, payload []byte) (string, error) {
	c, err := dialFrom(n, "tcp", addr, lport)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return "", err
	}
	r := bufio.NewReader(c)
	seen, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read greeting: %w", err)
	}
	if _, err := c.Write(payload); err != nil {
		return "", fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(r, got); err != nil {
		return "", fmt.Errorf("read echo: %w", err)
	}
	if string(got) != string(payload) {
		return "", errors.New("echo differs from what was sent")
	}
	return strings.TrimSpace(seen), nil
}

// udpSeen sends a datagram from n (from lport, 0: any), resending until the
// answer comes, and returns the source ext saw.
func udpSeen(n ns.NetNS, addr string, lport int) (string, error) {
	c, err := dialFrom(n, "udp", addr, lport)
	if err != nil {
		return "", err
	}
	defer c.Close()
	msg := "tern-snat " + strconv.FormatInt(time.Now().UnixNano(), 36)
	buf := make([]byte, 2048)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := c.Write([]byte(msg)); err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		k, err := c.Read(buf)
		if err != nil {
			continue
		}
		src, body, _ := strings.Cut(string(buf[:k]), " ")
		if body == msg {
			return src, nil
		}
	}
	return "", fmt.Errorf("udp %s: no answer", addr)
}

// udpEchoAt runs a UDP echo server on ip in to and checks a datagram from
// from comes back.
func udpEchoAt(from, to ns.NetNS, ip string) error {
	pc, err := testutil.ListenUDP(to, net.JoinHostPort(ip, "0"))
	if err != nil {
		return err
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, peer, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], peer)
		}
	}()
	c, err := dialFrom(from, "udp", pc.LocalAddr().String(), 0)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 2048)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if _, err := c.Write([]byte("echo")); err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && string(buf[:n]) == "echo" {
			return nil
		}
	}
	return fmt.Errorf("udp echo %s: no answer", pc.LocalAddr())
}

// checkMasqueraded checks that ext saw src as the node's address, and for
// the eBPF datapath a port from its NAT range.
func checkMasqueraded(t *testing.T, dp, what, src string) {
	t.Helper()
	host, port, err := net.SplitHostPort(src)
	if err != nil {
		t.Errorf("%s: ext saw %q: %v", what, src, err)
		return
	}
	if host != extNodeIP {
		t.Errorf("%s: ext saw source %s, want the node IP %s", what, src, extNodeIP)
	}
	if p, _ := strconv.Atoi(port); dp == "ebpf" && (p < natPortMin || p > natPortMax) {
		t.Errorf("%s: ext saw source port %d, outside the NAT range %d-%d", what, p, natPortMin, natPortMax)
	}
}

// podGateway is the pod's default gateway, from its routing table.
func podGateway(t *testing.T, p *pod) string {
	t.Helper()
	out, err := testutil.ExecIn(p.NS, "ip", "-4", "route", "show", "default")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(out)
	for i := range f {
		if f[i] == "via" && i+1 < len(f) {
			return f[i+1]
		}
	}
	t.Fatalf("no default gateway in pod %s: %q", p.Name, out)
	return ""
}

// natMapsFor lists the NAT map entries (both directions) that refer to any
// of ips, read from the node's pinned maps.
func natMapsFor(t *testing.T, n *testutil.Node, ips ...string) []string {
	t.Helper()
	want := map[string]bool{}
	for _, ip := range ips {
		want[ip] = true
	}
	var out []string
	for _, name := range []string{"tern_nat", "tern_nat_rev"} {
		m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", name), nil)
		if err != nil {
			t.Fatalf("open %s: %v", name, err)
		}
		var (
			key [16]byte // struct nat_tuple: saddr daddr sport dport proto pad[3]
			val [16]byte // struct nat_entry: last_seen addr port flags
		)
		it := m.Iterate()
		for it.Next(&key, &val) {
			src, addr := net.IP(key[0:4]).String(), net.IP(val[8:12]).String()
			if want[src] || want[addr] {
				out = append(out, fmt.Sprintf("%s: %s->%s => %s", name, src, net.IP(key[4:8]), addr))
			}
		}
		err = it.Err()
		m.Close()
		if err != nil {
			t.Fatalf("iterate %s: %v", name, err)
		}
	}
	return out
}

// snatMetrics reads the node's pinned metrics, packets by name.
func snatMetrics(t *testing.T, n *testutil.Node) map[string]uint64 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", "tern_metrics"), nil)
	if err != nil {
		t.Fatalf("open metrics: %v", err)
	}
	defer m.Close()
	vals, err := ebpfdp.ReadMetrics(m)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for name, v := range vals {
		out[name] = v.Packets
	}
	return out
}

// TestSNAT wires three pods on a node with an uplink to ext and checks every
// path out of a pod: to ext (TCP with several parallel connections, UDP,
// ping) with ext seeing the node IP; two pods with the same source port to
// the same server; node <-> pod, pod -> node IP and gateway; pod to pod
// unmasqueraded (hairpin: TestHairpin). Then DEL leaves no NAT state behind.
func TestSNAT(t *testing.T) {
	variants := []struct {
		name, dp string
		extra    map[string]any
	}{
		{"ebpf", "ebpf", nil}, // uplink found from the default route
		{"ebpf-clsact", "ebpf", map[string]any{"tcAttach": "legacy"}},
		{"iptables", "iptables", nil},
	}
	for _, v := range variants {
		dp := v.dp
		t.Run(v.name, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := newSNATWorld(t)
			srv := w.serve(t)
			network, conf := w.conf(t, dp, v.extra)
			a := addPod(t, w.node, conf, "sa")
			b := addPod(t, w.node, conf, "sb")
			c := addPod(t, w.node, conf, "sc")

			t.Run("pod to external, TCP x8 in parallel", func(t *testing.T) {
				var wg sync.WaitGroup
				errs := make([]error, 8)
				seen := make([]string, 8)
				for i := range errs {
					wg.Add(1)
					go func() {
						defer wg.Done()
						p := []*pod{a, b}[i%2]
						seen[i], errs[i] = tcpSeen(p.NS, srv.tcpAddr(), 0, []byte(strings.Repeat("x", 1000+i)))
					}()
				}
				wg.Wait()
				ports := map[string]bool{}
				for i, err := range errs {
					if err != nil {
						t.Errorf("connection %d: %v", i, err)
						continue
					}
					checkMasqueraded(t, dp, fmt.Sprintf("connection %d", i), seen[i])
					if ports[seen[i]] {
						t.Errorf("connection %d: source %s seen twice", i, seen[i])
					}
					ports[seen[i]] = true
				}
			})
			t.Run("pod to external, 4 MiB TCP transfer", func(t *testing.T) {
				if err := testutil.TCPTransfer(a.NS, w.ext, extIP, 4<<20); err != nil {
					t.Error(err)
				}
			})
			t.Run("pod to external, UDP", func(t *testing.T) {
				for _, p := range []*pod{a, c} {
					src, err := udpSeen(p.NS, srv.udpAddr(), 0)
					if err != nil {
						t.Errorf("%s: %v", p.Name, err)
						continue
					}
					checkMasqueraded(t, dp, "udp from "+p.Name, src)
				}
				if err := testutil.UDPEcho(b.NS, w.ext, extIP); err != nil {
					t.Error(err)
				}
			})
			t.Run("pod to external, ping", func(t *testing.T) {
				for _, p := range []*pod{a, b, c} {
					if err := testutil.Ping(p.NS, extIP, 2); err != nil {
						t.Error(err)
					}
				}
			})
			t.Run("two pods, same source port, same server", func(t *testing.T) {
				for _, proto := range []string{"tcp", "udp"} {
					var got []string
					for _, p := range []*pod{a, b} {
						var (
							src string
							err error
						)
						if proto == "tcp" {
							src, err = tcpSeen(p.NS, srv.tcpAddr(), 40000, []byte("same port"))
						} else {
							src, err = udpSeen(p.NS, srv.udpAddr(), 40000)
						}
						if err != nil {
							t.Errorf("%s from %s:40000: %v", proto, p.Name, err)
							continue
						}
						checkMasqueraded(t, dp, proto+" from "+p.Name+":40000", src)
						got = append(got, src)
					}
					if len(got) == 2 && got[0] == got[1] {
						t.Errorf("%s: both pods' flows left as %s", proto, got[0])
					}
				}
			})
			t.Run("node to pod and back", func(t *testing.T) {
				if err := testutil.Ping(w.node.NS, a.IP, 2); err != nil {
					t.Error(err)
				}
				if err := testutil.TCPTransfer(w.node.NS, a.NS, a.IP, 1<<20); err != nil {
					t.Error(err)
				}
			})
			t.Run("pod to node IP and gateway", func(t *testing.T) {
				gw := podGateway(t, a)
				for _, ip := range []string{extNodeIP, gw} {
					if err := testutil.Ping(a.NS, ip, 2); err != nil {
						t.Error(err)
					}
					if err := testutil.TCPTransfer(a.NS, w.node.NS, ip, 1<<20); err != nil {
						t.Error(err)
					}
					// Bound to ip: a wildcard socket would answer from the
					// address of the route back (the gateway), which the
					// pod's connected socket ignores.
					if err := udpEchoAt(a.NS, w.node.NS, ip); err != nil {
						t.Error(err)
					}
				}
			})
			t.Run("pod to pod keeps the pod address", func(t *testing.T) {
				l, err := testutil.ListenTCP(b.NS, net.JoinHostPort(b.IP, "0"))
				if err != nil {
					t.Fatal(err)
				}
				defer l.Close()
				done := make(chan string, 1)
				go func() {
					conn, err := l.Accept()
					if err != nil {
						done <- err.Error()
						return
					}
					done <- conn.RemoteAddr().String()
					conn.Close()
				}()
				conn, err := testutil.Dial(a.NS, "tcp", l.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				conn.Close()
				if got := <-done; !strings.HasPrefix(got, a.IP+":") {
					t.Errorf("pod b saw %s, want pod a's address %s", got, a.IP)
				}
			})

			for _, s := range srv.sources() {
				if strings.HasPrefix(s, "10.77.") {
					t.Errorf("ext saw a pod address: %s", s)
				}
			}
			if dp == "ebpf" {
				if got := natMapsFor(t, w.node, a.IP, b.IP, c.IP); len(got) == 0 {
					t.Errorf("no NAT entries for the pods after their traffic")
				}
				// The programs did the masquerading, not the stack.
				m := snatMetrics(t, w.node)
				for _, name := range []string{"snat", "rev_snat"} {
					if m[name] == 0 {
						t.Errorf("metric %s is 0 after masqueraded traffic (all: %v)", name, m)
					}
				}
				for _, name := range []string{"drop_nat_no_port", "drop_nat_map_full", "drop_nat_unsupported", "drop_redirect"} {
					if m[name] != 0 {
						t.Errorf("metric %s is %d (all: %v)", name, m[name], m)
					}
				}
			}

			for _, p := range []*pod{a, b, c} {
				if err := w.node.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
					t.Fatalf("DEL %s: %v", p.Name, err)
				}
			}
			if r := ipamRecords(t, w.node, network); len(r) != 0 {
				t.Errorf("IPAM records left after DEL: %v", r)
			}
			if out, _ := w.node.Exec(t, "iptables-save"); strings.Contains(out, "TERN") {
				t.Errorf("iptables rules left after DEL:\n%s", out)
			}
			if dp != "ebpf" {
				return
			}
			if got := natMapsFor(t, w.node, a.IP, b.IP, c.IP); len(got) != 0 {
				t.Errorf("NAT entries left after DEL:\n%s", strings.Join(got, "\n"))
			}
			if pins, _ := filepath.Glob(filepath.Join(w.node.BPFFSDir, "links", "*")); len(pins) != 0 {
				t.Errorf("link pins left after DEL: %v", pins)
			}
			if recs, _ := filepath.Glob(filepath.Join(w.node.StateDir, "bpf-legacy", "*")); len(recs) != 0 {
				t.Errorf("clsact attachment records left after DEL: %v", recs)
			}
			if out, _ := w.node.Exec(t, "tc", "filter", "show", "dev", w.uplink, "ingress"); strings.Contains(out, "tern") {
				t.Errorf("filter left on the uplink after DEL:\n%s", out)
			}
			if out, _ := w.node.Exec(t, "ip", "-4", "addr", "show", "dev", "lo"); strings.Contains(out, "lo:tern") {
				t.Errorf("gateway address left on lo after DEL:\n%s", out)
			}
		})
	}
}

// TestSNATDisabled: with "ipMasq": false pods' traffic leaves with their own
// address. ext has no route back, so only what it saw is checked.
func TestSNATDisabled(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := newSNATWorld(t)
			srv := w.serve(t)
			_, conf := w.conf(t, dp, map[string]any{"ipMasq": false, "uplink": w.uplink})
			p := addPod(t, w.node, conf, "nm")

			c, err := dialFrom(p.NS, "udp", srv.udpAddr(), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			deadline := time.Now().Add(5 * time.Second)
			var seen []string
			for time.Now().Before(deadline) && len(seen) == 0 {
				if _, err := c.Write([]byte("unmasqueraded")); err != nil {
					t.Fatal(err)
				}
				time.Sleep(100 * time.Millisecond)
				seen = srv.sources()
			}
			if len(seen) == 0 {
				t.Fatal("ext received nothing")
			}
			for _, s := range seen {
				if host, _, _ := net.SplitHostPort(s); host != p.IP {
					t.Errorf("ext saw source %s, want the pod address %s", s, p.IP)
				}
			}
		})
	}
}

// TestSNATUplinkConfig: an uplink that does not exist fails ADD with an
// error naming the field's value, and leaves nothing behind; DEL of the
// attachment still succeeds.
func TestSNATUplinkConfig(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	w := newSNATWorld(t)
	network, conf := w.conf(t, "ebpf", map[string]any{"uplink": "nosuchdev0"})
	p := w.node.Pod(t, "bad")
	_, err := w.node.Add(t.Context(), conf, "c-"+p.Name, p.Path, "eth0", k8sArgs)
	if err == nil || !strings.Contains(err.Error(), "nosuchdev0") {
		t.Fatalf("ADD with a missing uplink: %v, want an error naming it", err)
	}
	if err := w.node.Del(context.Background(), conf, "c-"+p.Name, p.Path, "eth0", k8sArgs); err != nil {
		t.Errorf("DEL after the failed ADD: %v", err)
	}
	if r := ipamRecords(t, w.node, network); len(r) != 0 {
		t.Errorf("IPAM records left: %v", r)
	}

	// Not an interface name at all: a config error (code 7) naming the field.
	_, conf = w.conf(t, "ebpf", map[string]any{"uplink": "eth0/../x"})
	_, err = w.node.Add(t.Context(), conf, "c-"+p.Name, p.Path, "eth0", k8sArgs)
	var cerr *types.Error
	if !errors.As(err, &cerr) || cerr.Code != types.ErrInvalidNetworkConfig || !strings.Contains(cerr.Msg, "uplink") {
		t.Errorf("ADD with uplink \"eth0/../x\": %v, want error code 7 naming uplink", err)
	}
}
