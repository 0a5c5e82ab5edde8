package testutil

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"net"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// Crafted packets, for tests where a pod misbehaves (forged source
// addresses, forged ARP) or speaks a protocol this kernel has no sockets for
// (SCTP). Sending needs CAP_NET_RAW in the pod, as containerd grants by
// default.

// SendIPv4 sends one IPv4 packet with the given source, destination,
// protocol and payload (the transport header included) from inside n,
// through a raw socket with IP_HDRINCL: the kernel routes it by destination
// and keeps the forged source. It fills in the header checksum and total
// length.
func SendIPv4(n ns.NetNS, src, dst net.IP, proto uint8, payload []byte) error {
	src4, dst4 := src.To4(), dst.To4()
	if src4 == nil || dst4 == nil {
		return fmt.Errorf("send ipv4: %v -> %v is not IPv4", src, dst)
	}
	pkt := make([]byte, 20+len(payload))
	pkt[0] = 0x45
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	binary.BigEndian.PutUint16(pkt[4:], 0x7e57)
	pkt[8] = 64
	pkt[9] = proto
	copy(pkt[12:16], src4)
	copy(pkt[16:20], dst4)
	binary.BigEndian.PutUint16(pkt[10:], Checksum(pkt[:20]))
	copy(pkt[20:], payload)
	return n.Do(func(ns.NetNS) error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("raw socket in %s: %w", NSName(n), err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrInet4{}
		copy(sa.Addr[:], dst4)
		if err := unix.Sendto(fd, pkt, 0, sa); err != nil {
			return fmt.Errorf("send %v -> %v (proto %d) from %s: %w", src4, dst4, proto, NSName(n), err)
		}
		return nil
	})
}

// UDPDatagram returns a UDP header and payload (checksum 0: none, which
// IPv4 allows).
func UDPDatagram(sport, dport uint16, payload []byte) []byte {
	b := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)))
	copy(b[8:], payload)
	return b
}

// SCTP chunk types used by SCTPPacket's callers.
const (
	SCTPChunkInit    = 1
	SCTPChunkInitAck = 2
)

// SCTPPacket returns an SCTP common header and one chunk (type, flags,
// value padded to 4 bytes), with its CRC32c checksum.
func SCTPPacket(sport, dport uint16, vtag uint32, chunkType, flags uint8, value []byte) []byte {
	clen := 4 + len(value)
	b := make([]byte, 12+(clen+3)&^3)
	binary.BigEndian.PutUint16(b[0:], sport)
	binary.BigEndian.PutUint16(b[2:], dport)
	binary.BigEndian.PutUint32(b[4:], vtag)
	b[12] = chunkType
	b[13] = flags
	binary.BigEndian.PutUint16(b[14:], uint16(clen))
	copy(b[16:], value)
	// RFC 9260 appendix A: CRC32c over the packet with a zero checksum
	// field, stored little-endian.
	binary.LittleEndian.PutUint32(b[8:], crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)))
	return b
}

// SCTPInit returns the value of an INIT chunk (initiate tag, a_rwnd,
// streams, initial TSN) with the given tag.
func SCTPInit(tag uint32) []byte {
	v := make([]byte, 16)
	binary.BigEndian.PutUint32(v[0:], tag)
	binary.BigEndian.PutUint32(v[4:], 65535)
	binary.BigEndian.PutUint16(v[8:], 1)
	binary.BigEndian.PutUint16(v[10:], 1)
	binary.BigEndian.PutUint32(v[12:], tag)
	return v
}

// RawListener receives the IPv4 packets of one protocol that reach a
// namespace (a raw socket sees every packet of its protocol the stack
// delivers locally, headers included).
type RawListener struct {
	fd int
	ns ns.NetNS
}

// ListenRaw opens a raw IPv4 socket for proto inside n. Close it.
func ListenRaw(n ns.NetNS, proto int) (*RawListener, error) {
	var fd int
	err := n.Do(func(ns.NetNS) error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("raw socket (proto %d) in %s: %w", proto, NSName(n), err)
	}
	return &RawListener{fd: fd, ns: n}, nil
}

// Receive waits up to timeout for a packet accepted by match (given the
// whole IPv4 packet) and reports whether one came.
func (r *RawListener) Receive(timeout time.Duration, match func(pkt []byte) bool) (bool, error) {
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 65536)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return false, nil
		}
		tv := unix.NsecToTimeval(left.Nanoseconds())
		if err := unix.SetsockoptTimeval(r.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return false, err
		}
		n, _, err := unix.Recvfrom(r.fd, buf, 0)
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("receive in %s: %w", NSName(r.ns), err)
		}
		if match(buf[:n]) {
			return true, nil
		}
	}
}

// Close closes the socket.
func (r *RawListener) Close() error { return unix.Close(r.fd) }

// SendFrame sends one Ethernet frame, as given, out of interface ifname
// inside n (an AF_PACKET socket: any source MAC, any ethertype).
func SendFrame(n ns.NetNS, ifname string, frame []byte) error {
	return n.Do(func(ns.NetNS) error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("packet socket in %s: %w", NSName(n), err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
		copy(sa.Addr[:], frame[0:6])
		if err := unix.Sendto(fd, frame, 0, sa); err != nil {
			return fmt.Errorf("send frame on %s in %s: %w", ifname, NSName(n), err)
		}
		return nil
	})
}

// ARP operations.
const (
	ARPRequest = 1
	ARPReply   = 2
)

// ARPFrame returns an Ethernet frame (from ethSrc to ethDst) carrying an
// ARP packet for IPv4 over Ethernet.
func ARPFrame(ethDst, ethSrc net.HardwareAddr, op uint16, senderMAC net.HardwareAddr, senderIP net.IP, targetMAC net.HardwareAddr, targetIP net.IP) []byte {
	f := make([]byte, 14+28)
	copy(f[0:6], ethDst)
	copy(f[6:12], ethSrc)
	binary.BigEndian.PutUint16(f[12:], unix.ETH_P_ARP)
	a := f[14:]
	binary.BigEndian.PutUint16(a[0:], 1) // Ethernet
	binary.BigEndian.PutUint16(a[2:], unix.ETH_P_IP)
	a[4], a[5] = 6, 4
	binary.BigEndian.PutUint16(a[6:], op)
	copy(a[8:14], senderMAC)
	copy(a[14:18], senderIP.To4())
	copy(a[18:24], targetMAC)
	copy(a[24:28], targetIP.To4())
	return f
}

// IPv4Frame returns an Ethernet frame carrying an IPv4 packet built as
// SendIPv4 builds it, for frames whose MACs are forged too.
func IPv4Frame(ethDst, ethSrc net.HardwareAddr, src, dst net.IP, proto uint8, payload []byte) []byte {
	f := make([]byte, 14+20+len(payload))
	copy(f[0:6], ethDst)
	copy(f[6:12], ethSrc)
	binary.BigEndian.PutUint16(f[12:], unix.ETH_P_IP)
	pkt := f[14:]
	pkt[0] = 0x45
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	pkt[8] = 64
	pkt[9] = proto
	copy(pkt[12:16], src.To4())
	copy(pkt[16:20], dst.To4())
	binary.BigEndian.PutUint16(pkt[10:], Checksum(pkt[:20]))
	copy(pkt[20:], payload)
	return f
}

// Checksum is the Internet checksum (RFC 1071) of b.
func Checksum(b []byte) uint16 {
	var sum uint32
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
