package bpf

import (
	"encoding/binary"
	"net"
	"testing"

	"golang.org/x/sys/unix"
)

// withIPID sets the IPv4 identification of frame (Ethernet + IPv4) and
// recomputes the header checksum; it returns that checksum.
func withIPID(frame []byte, id uint16) uint16 {
	ip := frame[14:34]
	binary.BigEndian.PutUint16(ip[4:], id)
	binary.BigEndian.PutUint16(ip[10:], 0)
	c := natCsum(ip)
	binary.BigEndian.PutUint16(ip[10:], c)
	return c
}

// The TTL decrement (lib/csum.h, decrement_ttl_at) writes the header in
// place and adjusts the checksum as the kernel's ip_decrease_ttl does: on
// both routed hops of the cross-node path (tern_from_pod to a remote pod,
// tern_from_uplink into a local one), for header checksums around the
// one's complement wrap (0xfeff..0x0100, where the carry matters), the
// TTL leaves one lower and the header checksum verifies (natParse checks
// it independently of the program), and the MACs are the pod's gateway's.
func TestTTLDecrementChecksums(t *testing.T) {
	w := newRemoteWorld(t)
	w.reset(t)
	w.setRemote(t, false)
	out := natPkt{srcMAC: w.a.mac, dstMAC: w.a.hostMAC, src: w.a.ip, dst: natOtherPod,
		proto: unix.IPPROTO_UDP, sport: 40000, dport: 11111, payload: make([]byte, 14)}.frame()
	in := natPkt{srcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, dstMAC: w.uplinkMAC, src: natOtherPod, dst: w.a.ip,
		ttl: 9, proto: unix.IPPROTO_UDP, sport: 11111, dport: 40000, payload: make([]byte, 14)}.frame()
	edge := func(c uint16) bool { return c >= 0xfeff || c <= 0x0100 }
	for _, c := range []struct {
		name   string
		frame  []byte
		ttl    uint8
		dstMAC net.HardwareAddr // nil: to the remote pod (the kernel sets the MACs)
	}{
		{name: "from-pod to a remote pod", frame: out, ttl: 64},
		{name: "from-uplink to a local pod", frame: in, ttl: 9, dstMAC: w.a.mac},
	} {
		t.Run(c.name, func(t *testing.T) {
			runs := 0
			for id := range 1 << 16 {
				if !edge(withIPID(c.frame, uint16(id))) {
					continue
				}
				runs++
				var verdict uint32
				var got []byte
				if c.dstMAC == nil {
					verdict, got = w.run(t, w.fromPod, w.a.ifindex, c.frame)
				} else {
					verdict, got = w.run(t, w.fromUplink, w.uplink, c.frame)
				}
				if verdict != natActRedirect {
					t.Fatalf("id %#04x: verdict %d", id, verdict)
				}
				p := natParse(t, got) // fails the test on a wrong checksum
				if p.ttl != c.ttl-1 {
					t.Errorf("id %#04x: ttl %d, want %d", id, p.ttl, c.ttl-1)
				}
				if c.dstMAC != nil && (net.HardwareAddr(p.dstMAC).String() != c.dstMAC.String() || net.HardwareAddr(p.srcMAC).String() != w.a.hostMAC.String()) {
					t.Errorf("id %#04x: MACs %s -> %s", id, p.srcMAC, p.dstMAC)
				}
				if t.Failed() {
					t.Fatalf("header checksum in %#04x", binary.BigEndian.Uint16(c.frame[24:]))
				}
			}
			t.Logf("%d frames with a header checksum near the wrap", runs)
			if runs < 64 {
				t.Fatalf("only %d frames near the wrap", runs)
			}
		})
	}
}
