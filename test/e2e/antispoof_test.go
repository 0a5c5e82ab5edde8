package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestAntiSpoofing has pod a misbehave towards pod c on the same node: IPv4
// from another pod's address, the gateway's, a free address of the subnet
// and an outside one (raw socket), a frame with another pod's MAC, ARP that
// claims pod b's address, and IPv6 link-local ping. Each must be dropped
// before c sees it; a's genuine packets and ARP, sent the same way, must
// arrive (so a drop is the datapath's, not the test's).
func TestAntiSpoofing(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			subnet := "10.77.211.0/24"
			conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: dp, Subnet: subnet, Extra: map[string]any{"ipMasq": false}})
			a := addPod(t, n, conf, "a")
			b := addPod(t, n, conf, "b")
			c := addPod(t, n, conf, "c")
			aMAC, bMAC := podMAC(t, a), podMAC(t, b)
			aIP, bIP, cIP := net.ParseIP(a.IP), net.ParseIP(b.IP), net.ParseIP(c.IP)
			gw := net.ParseIP("10.77.211.1")

			pc, err := testutil.ListenUDP(c.NS, "0.0.0.0:4790")
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			// send crafts one UDP datagram with a given source and tag and
			// reports whether c's socket got it.
			send := func(t *testing.T, tag string, sendOne func([]byte) error) bool {
				t.Helper()
				payload := []byte("tern-antispoof-" + tag)
				for range 3 {
					if err := sendOne(testutil.UDPDatagram(4791, 4790, payload)); err != nil {
						t.Fatal(err)
					}
				}
				return receivedUDP(t, pc, payload, 2*time.Second)
			}
			viaSocket := func(src net.IP) func([]byte) error {
				return func(udp []byte) error { return testutil.SendIPv4(a.NS, src, cIP, unix.IPPROTO_UDP, udp) }
			}

			t.Run("forged IPv4 source", func(t *testing.T) {
				if !send(t, "genuine", viaSocket(aIP)) {
					t.Fatalf("a's raw packet from its own address %s did not reach c", aIP)
				}
				for _, src := range []struct{ what, ip string }{
					{"pod b", b.IP}, {"gateway", gw.String()}, {"free address", "10.77.211.250"}, {"outside", "192.0.2.7"},
				} {
					if send(t, "forged-"+src.ip, viaSocket(net.ParseIP(src.ip))) {
						t.Errorf("a's packet forging the address of %s (%s) reached c", src.what, src.ip)
					}
				}
			})

			t.Run("forged MAC", func(t *testing.T) {
				cMAC := podMAC(t, c)
				if dp == "ebpf" {
					// Pods resolve nothing but their gateway, whose
					// permanent neighbour entry is the host veth.
					cMAC = hostVethMAC(t, a)
				}
				frame := func(src net.HardwareAddr) func([]byte) error {
					return func(udp []byte) error {
						return testutil.SendFrame(a.NS, "eth0", testutil.IPv4Frame(cMAC, src, aIP, cIP, unix.IPPROTO_UDP, udp))
					}
				}
				if !send(t, "genuine-frame", frame(aMAC)) {
					t.Fatalf("a's frame with its own MAC %s did not reach c", aMAC)
				}
				if send(t, "forged-frame", frame(bMAC)) {
					t.Errorf("a's frame with pod b's MAC %s reached c", bMAC)
				}
			})

			t.Run("forged ARP", func(t *testing.T) {
				bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
				zero := net.HardwareAddr{0, 0, 0, 0, 0, 0}
				if _, err := testutil.ExecIn(c.NS, "ip", "neigh", "flush", "dev", "eth0"); err != nil {
					t.Fatal(err)
				}
				arp := func(sender net.IP) {
					t.Helper()
					f := testutil.ARPFrame(bcast, aMAC, testutil.ARPRequest, aMAC, sender, zero, cIP)
					if err := testutil.SendFrame(a.NS, "eth0", f); err != nil {
						t.Fatal(err)
					}
				}
				arp(aIP)
				arp(bIP)
				time.Sleep(500 * time.Millisecond)
				if dp == "iptables" {
					// On the bridge c learns from ARP requests for its
					// address: the genuine one must have made an entry.
					if got := neighMAC(t, c, aIP); !bytes.Equal(got, aMAC) {
						t.Fatalf("c's neighbour entry for %s after a's genuine ARP is %v, want %s", aIP, got, aMAC)
					}
				}
				if got := neighMAC(t, c, bIP); bytes.Equal(got, aMAC) {
					t.Errorf("a's forged ARP poisoned c: c resolves pod b %s to a's MAC %s", bIP, got)
				}
			})

			t.Run("to the node's localhost (CVE-2020-8558)", func(t *testing.T) {
				// kube-proxy sets route_localnet=1, which makes the node
				// accept 127.0.0.0/8 from outside: a pod that sends a
				// frame to its gateway with such a destination reaches
				// the node's localhost-only services.
				out, err := n.Exec(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/route_localnet; do echo 1 > $f; done")
				if err != nil {
					t.Fatal(err, out)
				}
				lo, err := testutil.ListenUDP(n.NS, "127.0.0.1:4792")
				if err != nil {
					t.Fatal(err)
				}
				defer lo.Close()
				if err := testutil.Ping(a.NS, gw.String(), 1); err != nil {
					t.Fatal(err)
				}
				gwMAC := neighMAC(t, a, gw)
				if gwMAC == nil {
					t.Fatalf("a has no neighbour entry for its gateway %s", gw)
				}
				payload := []byte("tern-localnet")
				for range 3 {
					f := testutil.IPv4Frame(gwMAC, aMAC, aIP, net.ParseIP("127.0.0.1"), unix.IPPROTO_UDP, testutil.UDPDatagram(4793, 4792, payload))
					if err := testutil.SendFrame(a.NS, "eth0", f); err != nil {
						t.Fatal(err)
					}
				}
				if receivedUDP(t, lo, payload, 2*time.Second) {
					t.Error("a's datagram to 127.0.0.1 reached a socket bound to the node's localhost")
				}
			})

			t.Run("IPv6 link-local", func(t *testing.T) {
				// Tern turns IPv6 off in pods; a pod with NET_ADMIN
				// can turn it back on, and then the datapath must
				// still carry none of it.
				for _, p := range []*pod{a, c} {
					if _, err := testutil.ExecIn(p.NS, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"); err != nil {
						t.Fatal(err)
					}
				}
				ll := linkLocal(t, c)
				out, err := testutil.ExecIn(a.NS, "ping", "-6", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-w", "3", ll+"%eth0")
				if err == nil {
					t.Errorf("a reached c over IPv6 link-local %s, which no policy sees:\n%s", ll, out)
				}
			})
		})
	}
}

// receivedUDP reads pc until payload arrives or wait passes.
func receivedUDP(t *testing.T, pc net.PacketConn, payload []byte, wait time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(wait)
	buf := make([]byte, 2048)
	for {
		if err := pc.SetReadDeadline(deadline); err != nil {
			t.Fatal(err)
		}
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				return false
			}
			t.Fatal(err)
		}
		if bytes.Equal(buf[:n], payload) {
			return true
		}
	}
}

func podMAC(t *testing.T, p *pod) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	err := p.NS.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		mac = l.Attrs().HardwareAddr
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return mac
}

// hostVethMAC is the MAC the pod's gateway neighbour entry resolves to.
func hostVethMAC(t *testing.T, p *pod) net.HardwareAddr {
	t.Helper()
	out, err := testutil.ExecIn(p.NS, "ip", "-4", "neigh", "show", "dev", "eth0", "nud", "permanent")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range strings.Fields(out) {
		if mac, err := net.ParseMAC(f); err == nil {
			return mac
		}
	}
	t.Fatalf("no permanent neighbour in %s:\n%s", p.Name, out)
	return nil
}

// neighMAC returns the MAC p's neighbour table holds for ip, or nil.
func neighMAC(t *testing.T, p *pod, ip net.IP) net.HardwareAddr {
	t.Helper()
	out, err := testutil.ExecIn(p.NS, "ip", "neigh", "show", ip.String(), "dev", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(out)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "lladdr" {
			mac, _ := net.ParseMAC(f[i+1])
			return mac
		}
	}
	return nil
}

// linkLocal waits (at most 5 s) for p's eth0 to have a usable IPv6
// link-local address and returns it.
func linkLocal(t *testing.T, p *pod) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for {
		out, err := testutil.ExecIn(p.NS, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link")
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(out); len(f) > 3 && !strings.Contains(out, "tentative") {
			return strings.SplitN(f[3], "/", 2)[0]
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no usable IPv6 link-local address on %s's eth0: %s", p.Name, fmt.Sprint(out))
		case <-time.After(100 * time.Millisecond):
		}
	}
}
