package testutil

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// trafficTimeout bounds each traffic helper. Use the helpers only towards
// addresses inside namespaces the test created.
const trafficTimeout = 5 * time.Second

// Ping sends count echo requests (0.2 s apart) from inside from to ip and
// succeeds only when all count replies arrive within 4 s.
func Ping(from ns.NetNS, ip string, count int) error {
	if count < 1 {
		count = 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
	defer cancel()
	out, err := execIn(ctx, from, "ping", "-n", "-c", strconv.Itoa(count), "-W", "1", "-i", "0.2", "-w", "4", ip)
	if err != nil {
		return fmt.Errorf("ping %s from %s: %w\n%s", ip, NSName(from), err, out)
	}
	return nil
}

// ListenTCP returns a TCP listener whose socket lives in namespace n. An
// IPv4 or IPv6 literal host picks tcp4 or tcp6.
func ListenTCP(n ns.NetNS, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func(ns.NetNS) error {
		var err error
		l, err = net.Listen(networkFor("tcp", addr), addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen tcp %s in %s: %w", addr, NSName(n), err)
	}
	return l, nil
}

// ListenUDP returns a UDP socket bound in namespace n, as ListenTCP.
func ListenUDP(n ns.NetNS, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func(ns.NetNS) error {
		var err error
		pc, err = net.ListenPacket(networkFor("udp", addr), addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen udp %s in %s: %w", addr, NSName(n), err)
	}
	return pc, nil
}

// Dial connects from inside namespace n (network "tcp", "udp", ...; addr
// with a literal IP), giving up after 5 s. The socket stays in n.
func Dial(n ns.NetNS, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func(ns.NetNS) error {
		var err error
		d := net.Dialer{Timeout: trafficTimeout}
		c, err = d.Dial(network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s from %s: %w", network, addr, NSName(n), err)
	}
	return c, nil
}

// networkFor returns base+"4" or base+"6" when addr's host is an IP literal
// of that family, base otherwise.
func networkFor(base, addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return base
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return base
	}
	if ip.Unmap().Is4() {
		return base + "4"
	}
	return base + "6"
}

// wildcardFor returns the any-address of ip's family, for a listener that
// accepts whatever address of its namespace ip is.
func wildcardFor(ip string) (string, error) {
	a, err := netip.ParseAddr(ip)
	if err != nil {
		return "", fmt.Errorf("not an IP literal: %q", ip)
	}
	if a.Unmap().Is4() {
		return "0.0.0.0", nil
	}
	return "::", nil
}

// TCPTransfer listens on a free port in to, connects to ip:port from inside
// from, sends nbytes of patterned data and checks that the server counted
// the same bytes with the same SHA-256. Bounded by 5 s.
func TCPTransfer(from, to ns.NetNS, ip string, nbytes int) error {
	deadline := time.Now().Add(trafficTimeout)
	wildcard, err := wildcardFor(ip)
	if err != nil {
		return fmt.Errorf("tcp transfer: %w", err)
	}
	l, err := ListenTCP(to, net.JoinHostPort(wildcard, "0"))
	if err != nil {
		return fmt.Errorf("tcp transfer: %w", err)
	}
	defer l.Close()
	if err := l.(*net.TCPListener).SetDeadline(deadline); err != nil {
		return fmt.Errorf("tcp transfer: %w", err)
	}
	addr := net.JoinHostPort(ip, strconv.Itoa(l.Addr().(*net.TCPAddr).Port))

	srvErr := make(chan error, 1)
	go func() { srvErr <- serveDigest(l, deadline) }()

	cliErr := sendAndVerify(from, addr, nbytes, deadline)
	l.Close() // unblocks Accept if the client never connected
	if err := errors.Join(cliErr, <-srvErr); err != nil {
		return fmt.Errorf("tcp transfer %d bytes %s -> %s (%s): %w", nbytes, NSName(from), addr, NSName(to), err)
	}
	return nil
}

// digestLen is the server's reply: SHA-256 then the byte count (big endian).
const digestLen = sha256.Size + 8

// serveDigest accepts one connection, reads it to EOF and answers with the
// SHA-256 and length of what it read.
func serveDigest(l net.Listener, deadline time.Time) error {
	c, err := l.Accept()
	if err != nil {
		return fmt.Errorf("server: accept: %w", err)
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return fmt.Errorf("server: read after %d bytes: %w", n, err)
	}
	reply := binary.BigEndian.AppendUint64(h.Sum(nil), uint64(n))
	if _, err := c.Write(reply); err != nil {
		return fmt.Errorf("server: write digest: %w", err)
	}
	return nil
}

func sendAndVerify(from ns.NetNS, addr string, nbytes int, deadline time.Time) error {
	c, err := Dial(from, "tcp", addr)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	defer c.Close()
	if err := c.SetDeadline(deadline); err != nil {
		return fmt.Errorf("client: %w", err)
	}

	// A 251-byte cycle (prime) so shifted or repeated chunks change the hash.
	chunk := make([]byte, 64*1024)
	h := sha256.New()
	for sent := 0; sent < nbytes; {
		m := min(len(chunk), nbytes-sent)
		for i := range m {
			chunk[i] = byte((sent + i) % 251)
		}
		if _, err := c.Write(chunk[:m]); err != nil {
			return fmt.Errorf("client: write after %d bytes: %w", sent, err)
		}
		h.Write(chunk[:m])
		sent += m
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("client: close write: %w", err)
	}

	reply := make([]byte, digestLen)
	if _, err := io.ReadFull(c, reply); err != nil {
		return fmt.Errorf("client: read digest: %w", err)
	}
	want := binary.BigEndian.AppendUint64(h.Sum(nil), uint64(nbytes))
	if !bytes.Equal(reply, want) {
		return fmt.Errorf("client: server got %d bytes with sha256 %s, sent %d with %s",
			binary.BigEndian.Uint64(reply[sha256.Size:]), hex.EncodeToString(reply[:sha256.Size]),
			nbytes, hex.EncodeToString(want[:sha256.Size]))
	}
	return nil
}

// udpDatagrams is how many distinct datagrams UDPEcho must see echoed.
const udpDatagrams = 3

// UDPEcho runs an echo server on a free UDP port in to and sends a few
// distinct datagrams from inside from to ip:port, resending each until its
// echo comes back. Bounded by 5 s.
func UDPEcho(from, to ns.NetNS, ip string) error {
	deadline := time.Now().Add(trafficTimeout)
	wildcard, err := wildcardFor(ip)
	if err != nil {
		return fmt.Errorf("udp echo: %w", err)
	}
	pc, err := ListenUDP(to, net.JoinHostPort(wildcard, "0"))
	if err != nil {
		return fmt.Errorf("udp echo: %w", err)
	}
	addr := net.JoinHostPort(ip, strconv.Itoa(pc.LocalAddr().(*net.UDPAddr).Port))

	srvDone := make(chan struct{})
	go func() {
		defer close(srvDone)
		buf := make([]byte, 2048)
		for {
			n, peer, err := pc.ReadFrom(buf)
			if err != nil {
				return // closed
			}
			pc.WriteTo(buf[:n], peer)
		}
	}()
	defer func() {
		pc.Close()
		<-srvDone
	}()

	c, err := Dial(from, networkFor("udp", addr), addr)
	if err != nil {
		return fmt.Errorf("udp echo: %w", err)
	}
	defer c.Close()

	buf := make([]byte, 2048)
	for i := range udpDatagrams {
		msg := []byte(fmt.Sprintf("tern-udp-echo %d %s", i, randomBase36(8)))
		if err := echoOnce(c, msg, buf, deadline); err != nil {
			return fmt.Errorf("udp echo %s -> %s (%s): datagram %d: %w", NSName(from), addr, NSName(to), i, err)
		}
	}
	return nil
}

// echoOnce sends msg and waits up to 500 ms for it to come back, resending
// until the deadline. Echoes of earlier datagrams are skipped.
func echoOnce(c net.Conn, msg, buf []byte, deadline time.Time) error {
	var lastErr error
	for time.Now().Before(deadline) {
		if _, err := c.Write(msg); err != nil {
			lastErr = err // e.g. ECONNREFUSED from an earlier ICMP error
			time.Sleep(100 * time.Millisecond)
			continue
		}
		wait := time.Now().Add(500 * time.Millisecond)
		if wait.After(deadline) {
			wait = deadline
		}
		if err := c.SetReadDeadline(wait); err != nil {
			return err
		}
		for {
			n, err := c.Read(buf)
			if err != nil {
				lastErr = err
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					time.Sleep(100 * time.Millisecond) // ICMP error: do not spin
				}
				break
			}
			if bytes.Equal(buf[:n], msg) {
				return nil
			}
		}
	}
	if lastErr == nil {
		lastErr = errors.New("no echo")
	}
	return fmt.Errorf("no echo before timeout: %w", lastErr)
}

// AllowedProbeWindow is how long Probe retries a connection attempt that is
// expected to succeed. On a busy 2-vCPU machine one attempt can miss its
// timeout for reasons that have nothing to do with the datapath (an ARP
// resolution, a scheduler stall); a denied verdict must hold on every
// attempt anyway, so retrying an expected success loses no strength.
const AllowedProbeWindow = 5 * time.Second

// Probe runs attempt, which reports whether a connection got through. When
// want is true it retries failed attempts until one succeeds or
// AllowedProbeWindow has passed; when want is false one attempt decides
// (its own timeout is the wait for a packet that must not come).
func Probe(want bool, attempt func() (bool, error)) (bool, error) {
	deadline := time.Now().Add(AllowedProbeWindow)
	for {
		got, err := attempt()
		if err != nil || got || !want || time.Now().After(deadline) {
			return got, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}
