package e2e

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// Frames a pod with NET_RAW can send through a packet socket, past its own
// stack's rules: the datapath must judge them as they are.

// sendRaw sends frame out of ifname inside netns n through an AF_PACKET
// socket, as a pod process with NET_RAW can.
func sendRaw(n ns.NetNS, ifname string, frame []byte) error {
	return n.Do(func(ns.NetNS) error {
		lk, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0) // protocol 0: send only
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: lk.Attrs().Index, Halen: 6}
		copy(sa.Addr[:], frame[0:6])
		if err := unix.Sendto(fd, frame, 0, sa); err != nil {
			return fmt.Errorf("send on %s: %w", ifname, err)
		}
		return nil
	})
}

// linkMAC returns the MAC of ifname inside n.
func linkMAC(t *testing.T, n ns.NetNS, ifname string) net.HardwareAddr {
	t.Helper()
	var mac net.HardwareAddr
	if err := n.Do(func(ns.NetNS) error {
		lk, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		mac = lk.Attrs().HardwareAddr
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return mac
}

func writeSysctl(t *testing.T, n ns.NetNS, name, value string) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error {
		return os.WriteFile(filepath.Join("/proc/sys", name), []byte(value), 0o644)
	}); err != nil {
		t.Fatal(err)
	}
}

// csum is the RFC 1071 checksum of the concatenated parts.
func csum(parts ...[]byte) uint16 {
	var sum uint32
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// routerAdvert is an Ethernet frame carrying a valid ICMPv6 router
// advertisement from src (link-local) to all nodes: router lifetime 1800 s,
// so a host accepting it installs a default route via src.
func routerAdvert(srcMAC net.HardwareAddr, src netip.Addr) []byte {
	ra := []byte{134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0}
	ra = append(ra, 1, 1) // source link-layer address option
	ra = append(ra, srcMAC...)
	s, d := src.As16(), netip.MustParseAddr("ff02::1").As16()
	pseudo := append(append(append([]byte{}, s[:]...), d[:]...), 0, 0, 0, byte(len(ra)), 0, 0, 0, unix.IPPROTO_ICMPV6)
	binary.BigEndian.PutUint16(ra[2:], csum(pseudo, ra))
	ip := []byte{0x60, 0, 0, 0, 0, byte(len(ra)), unix.IPPROTO_ICMPV6, 255}
	ip = append(append(ip, s[:]...), d[:]...)
	f := append([]byte{0x33, 0x33, 0, 0, 0, 1}, srcMAC...)
	f = append(f, 0x86, 0xdd)
	return append(append(f, ip...), ra...)
}

// udpFrame is an Ethernet/IPv4/UDP frame (UDP checksum 0: none).
func udpFrame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	u := binary.BigEndian.AppendUint16(nil, sport)
	u = binary.BigEndian.AppendUint16(u, dport)
	u = binary.BigEndian.AppendUint16(u, uint16(8+len(payload)))
	u = append(append(u, 0, 0), payload...)
	ip := []byte{0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, unix.IPPROTO_UDP, 0, 0}
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(u)))
	s, d := src.As4(), dst.As4()
	ip = append(append(ip, s[:]...), d[:]...)
	binary.BigEndian.PutUint16(ip[10:], csum(ip))
	f := append(append(append([]byte{}, dstMAC...), srcMAC...), 0x08, 0x00)
	return append(append(f, ip...), u...)
}

// TestHostVethIPv6Off: on both datapaths the host veth and the pod's
// interface come up with IPv6 disabled, so the node takes no router
// advertisement from a pod and has no IPv6 on the pods' links.
func TestHostVethIPv6Off(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: dp, Subnet: subnetFor(t)})
			p := addPod(t, n, conf, "v6")
			veths := hostVeths(t, n)
			if len(veths) != 1 {
				t.Fatalf("host veths %v, want one", veths)
			}
			if v := readSysctl(t, n.NS, "net/ipv6/conf/"+veths[0]+"/disable_ipv6"); v != "1" {
				t.Errorf("host veth %s: disable_ipv6=%s, want 1", veths[0], v)
			}
			if v := readSysctl(t, p.NS, "net/ipv6/conf/eth0/disable_ipv6"); v != "1" {
				t.Errorf("pod eth0: disable_ipv6=%s, want 1", v)
			}
			if out, _ := n.Exec(t, "ip", "-6", "addr", "show", "dev", veths[0]); strings.Contains(out, "inet6") {
				t.Errorf("host veth has IPv6 addresses:\n%s", out)
			}
			// CHECK notices IPv6 switched back on.
			args := append(k8sArgs, [2]string{"K8S_POD_NAME", p.Name})
			if err := n.Check(t.Context(), conf, p.ID, p.Path, "eth0", args); err != nil {
				t.Errorf("CHECK of a fresh pod: %v", err)
			}
			writeSysctl(t, n.NS, "net/ipv6/conf/"+veths[0]+"/disable_ipv6", "0")
			err := n.Check(t.Context(), conf, p.ID, p.Path, "eth0", args)
			if err == nil || !strings.Contains(err.Error(), veths[0]) || !strings.Contains(err.Error(), "IPv6") {
				t.Errorf("CHECK with IPv6 back on on the host veth: %v, want an error naming it", err)
			}
		})
	}
}

// TestPodIPv6RouterAdvertDropped: a pod sends IPv6 router advertisements
// and an IPv6 datagram through a packet socket. tern_from_pod drops and
// counts each. Then the host veth's IPv6 is switched back on by the test
// (accept_ra=2), so the only thing between the pod and the node's routing
// table is tern_from_pod: the node must not get an IPv6 default route via
// the pod.
func TestPodIPv6RouterAdvertDropped(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: subnetFor(t)})
	p := addPod(t, n, conf, "ra")
	veths := hostVeths(t, n)
	if len(veths) != 1 {
		t.Fatalf("host veths %v, want one", veths)
	}
	hv := veths[0]
	podMAC, hostMAC := linkMAC(t, p.NS, "eth0"), linkMAC(t, n.NS, hv)
	ra := routerAdvert(podMAC, netip.MustParseAddr("fe80::bad:1"))
	v6 := append([]byte{0x33, 0x33, 0, 0, 0, 1}, podMAC...)
	v6 = append(v6, 0x86, 0xdd, 0x60, 0, 0, 0, 0, 8, unix.IPPROTO_UDP, 1)
	s, d := netip.MustParseAddr("fe80::bad:1").As16(), netip.MustParseAddr("ff02::1").As16()
	v6 = append(append(append(v6, s[:]...), d[:]...), 0x13, 0x88, 0x13, 0x89, 0, 8, 0, 0)
	// marker is an IPv4 datagram the program passes to the stack: the
	// veth delivers in order, so once it is counted, every frame sent
	// before it has been through the program and the node's stack.
	marker := udpFrame(hostMAC, podMAC, netip.MustParseAddr(p.IP), netip.MustParseAddr("10.99.0.1"), 40000, 9, []byte("marker"))
	sendAll := func(frames ...[]byte) (drops uint64) {
		t.Helper()
		before := snatMetrics(t, n)
		for _, f := range append(frames, marker) {
			if err := sendRaw(p.NS, "eth0", f); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			after := snatMetrics(t, n)
			if after["pass_host"] > before["pass_host"] {
				return after["drop_non_ipv4"] - before["drop_non_ipv4"]
			}
			if time.Now().After(deadline) {
				t.Fatalf("the marker datagram was never counted: %v", after)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	// As Tern leaves the node: IPv6 off on the host veth, so nothing of the
	// node's IPv6 is sent into the pod and every drop is the pod's.
	if got := sendAll(ra, ra, ra, v6); got != 4 {
		t.Errorf("drop_non_ipv4 moved by %d, want 4 (3 RAs, 1 IPv6 datagram)", got)
	}

	// IPv6 back on, accepting router advertisements even with forwarding.
	writeSysctl(t, n.NS, "net/ipv6/conf/"+hv+"/disable_ipv6", "0")
	writeSysctl(t, n.NS, "net/ipv6/conf/"+hv+"/accept_ra", "2")
	if got := sendAll(ra, ra, ra); got < 3 {
		t.Errorf("drop_non_ipv4 moved by %d, want at least 3", got)
	}
	if out, err := n.Exec(t, "ip", "-6", "route", "show", "default"); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("node has an IPv6 default route after the pod's RA (err %v):\n%s", err, out)
	}
}

// TestPodVLANTaggedDropped: a pod sends 802.1Q-tagged IPv4 frames (VLAN 5,
// and a priority tag, VLAN 0) with its own valid source. The receiving
// veth takes the tag off before tc (skb_vlan_untag), so the program sees
// what looks like the pod's IPv4 packet with a tag in the skb's metadata:
// it must drop it (no pod of Tern's sends tagged frames) rather than pass
// it on with the tag.
func TestPodVLANTaggedDropped(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: subnetFor(t)})
	p := addPod(t, n, conf, "vl")
	veths := hostVeths(t, n)
	if len(veths) != 1 {
		t.Fatalf("host veths %v, want one", veths)
	}
	plain := udpFrame(linkMAC(t, n.NS, veths[0]), linkMAC(t, p.NS, "eth0"), netip.MustParseAddr(p.IP),
		netip.MustParseAddr("10.99.0.1"), 40000, 9, []byte("tagged"))
	before := snatMetrics(t, n)
	for _, vid := range []byte{5, 0} {
		tagged := append(append([]byte{}, plain[:12]...), 0x81, 0x00, 0, vid)
		tagged = append(tagged, plain[12:]...)
		if err := sendRaw(p.NS, "eth0", tagged); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(3 * time.Second)
	var after map[string]uint64
	for {
		after = snatMetrics(t, n)
		if after["drop_non_ipv4"]-before["drop_non_ipv4"] >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if got := after["drop_non_ipv4"] - before["drop_non_ipv4"]; got != 2 {
		t.Errorf("drop_non_ipv4 moved by %d, want 2; counters %v", got, after)
	}
	if got := after["pass_host"] - before["pass_host"]; got != 0 {
		t.Errorf("pass_host moved by %d: a tagged frame went on to the stack", got)
	}
}

// TestPodLoopbackDropped: with route_localnet=1 on the host veth (what
// kube-proxy sets for localhost NodePorts), a pod sending a datagram to
// 127.0.0.1 through a packet socket would reach a server the node binds to
// its 127.0.0.1 (CVE-2020-8558). tern_from_pod drops it and counts it.
func TestPodLoopbackDropped(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: subnetFor(t)})
	p := addPod(t, n, conf, "lo")
	veths := hostVeths(t, n)
	if len(veths) != 1 {
		t.Fatalf("host veths %v, want one", veths)
	}
	hv := veths[0]
	writeSysctl(t, n.NS, "net/ipv4/conf/"+hv+"/route_localnet", "1")
	writeSysctl(t, n.NS, "net/ipv4/conf/"+hv+"/rp_filter", "0")
	writeSysctl(t, n.NS, "net/ipv4/conf/all/rp_filter", "0")

	srv, err := testutil.ListenUDP(n.NS, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	port := uint16(srv.LocalAddr().(*net.UDPAddr).Port)

	before := snatMetrics(t, n)
	frame := udpFrame(linkMAC(t, n.NS, hv), linkMAC(t, p.NS, "eth0"), netip.MustParseAddr(p.IP),
		netip.MustParseAddr("127.0.0.1"), 40000, port, []byte("reach the node's localhost"))
	for range 3 {
		if err := sendRaw(p.NS, "eth0", frame); err != nil {
			t.Fatal(err)
		}
	}
	_ = srv.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 256)
	if k, from, err := srv.ReadFrom(buf); err == nil {
		t.Errorf("the node's 127.0.0.1:%d server got %q from %s", port, buf[:k], from)
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("read: %v", err)
	}
	after := snatMetrics(t, n)
	if got := after["drop_loopback"] - before["drop_loopback"]; got != 3 {
		t.Errorf("drop_loopback moved by %d, want 3", got)
	}
}

// TestSNATReplyTTLExpires: a reply to a pod's masqueraded UDP flow arrives
// at the node with TTL 1, so it would expire on the hop into the pod. The
// outside must not learn the pod's address from it: no ICMP time exceeded
// quoting the pod's address comes back (the reply is dropped untranslated
// and counted). A reply with the usual TTL reaches the pod.
func TestSNATReplyTTLExpires(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	w := newSNATWorld(t)
	_, conf := w.conf(t, "ebpf", nil)
	a := addPod(t, w.node, conf, "tt")
	podIP := netip.MustParseAddr(a.IP).As4()

	srv, err := testutil.ListenUDP(w.ext, net.JoinHostPort(extIP, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	// Every ICMP message ext receives, IP header included.
	var icmpFD int
	if err := w.ext.Do(func(ns.NetNS) error {
		var err error
		icmpFD, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
		if err != nil {
			return err
		}
		return unix.SetsockoptTimeval(icmpFD, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 200000})
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(icmpFD)

	c, err := dialFrom(a.NS, "udp", srv.LocalAddr().String(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 2048)
	exchange := func(ttl int) (string, error) {
		if _, err := c.Write([]byte("hello")); err != nil {
			return "", err
		}
		_ = srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, peer, err := srv.ReadFrom(buf)
		if err != nil {
			return "", fmt.Errorf("ext read: %w", err)
		}
		raw, err := srv.(*net.UDPConn).SyscallConn()
		if err != nil {
			return "", err
		}
		var serr error
		if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, ttl) }); err != nil || serr != nil {
			return "", fmt.Errorf("set TTL %d: %v %v", ttl, err, serr)
		}
		if _, err := srv.WriteTo([]byte("reply"), peer); err != nil {
			return "", err
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		k, err := c.Read(buf)
		if err != nil {
			return "", err
		}
		return string(buf[:k]), nil
	}
	if got, err := exchange(64); err != nil || got != "reply" {
		t.Fatalf("reply with TTL 64: %q, %v", got, err)
	}
	before := snatMetrics(t, w.node)
	if got, err := exchange(1); err == nil {
		t.Errorf("reply with TTL 1 reached the pod: %q", got)
	}
	// Whatever ICMP ext got meanwhile: none may quote the pod's address.
	for range 10 {
		k, _, err := unix.Recvfrom(icmpFD, buf, 0)
		if err != nil {
			break
		}
		pkt := buf[:k]
		ihl := int(pkt[0]&0x0f) * 4
		if len(pkt) < ihl+8+20 {
			continue
		}
		inner := pkt[ihl+8:]
		if [4]byte(inner[16:20]) == podIP || [4]byte(inner[12:16]) == podIP {
			t.Errorf("ext got ICMP type %d code %d quoting the pod's address %s", pkt[ihl], pkt[ihl+1], a.IP)
		}
	}
	if got := snatMetrics(t, w.node)["drop_rev_ttl"] - before["drop_rev_ttl"]; got != 1 {
		t.Errorf("drop_rev_ttl moved by %d, want 1", got)
	}
}
