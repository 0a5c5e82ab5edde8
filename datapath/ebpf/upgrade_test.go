package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	cilium "github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
)

// TestUpgradeUnderTraffic swaps the programs of a node with two pods twice
// (v1 -> v2 -> v3, objects that really differ: their load-time NAT
// constants do) while a TCP stream and a UDP flow run between the pods, and
// checks that nothing was lost: every UDP datagram arrived, the TCP
// connection never retransmitted, no packet met the node's FORWARD DROP
// (where a packet without a program would go), data flowed after each swap, every pod
// hook runs the newest program, and every map (endpoints, NAT, conntrack,
// policy) is the same map as before, contents kept.
func TestUpgradeUnderTraffic(t *testing.T) {
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			n := newNode(t, mode)
			a, aNS := n.pod(t, "10.244.6.2", "10.244.6.1")
			b, bNS := n.pod(t, "10.244.6.3", "10.244.6.1")
			n.do(t, n.dp.EnsureNode)
			n.add(t, a)
			n.add(t, b)
			mapIDs := func(d *Datapath) map[string]cilium.MapID {
				ids := map[string]cilium.MapID{}
				for name, m := range d.objs.Maps {
					info, err := m.Info()
					if err != nil {
						t.Fatal(err)
					}
					ids[name], _ = info.ID()
				}
				return ids
			}
			before := mapIDs(n.dp)
			for _, name := range []string{ternbpf.TernMapTernEndpoints, "tern_nat", "tern_policy_ct", "tern_ipcache"} {
				if _, ok := before[name]; !ok {
					t.Fatalf("map %s not loaded (maps: %v)", name, before)
				}
			}
			oldProg := progIDOf(t, n.dp)
			// A packet that meets no program would go through the node's
			// forwarding, which drops it: a gap in the swap is a loss.
			if _, err := testutil.ExecIn(n.ns, "iptables", "-w", "-I", "FORWARD", "-j", "DROP"); err != nil {
				t.Fatal(err)
			}

			tcp := startStream(t, aNS, bNS, "10.244.6.3")
			udp := startUDPFlow(t, aNS, bNS, "10.244.6.3")
			time.Sleep(300 * time.Millisecond)

			versions := []NAT{DefaultNAT(), DefaultNAT()}
			versions[0].UDP = 61 * time.Second
			versions[1].UDP = 62 * time.Second
			cur := n.dp
			for i, nat := range versions {
				next := New(Config{BPFFSDir: n.bpffs, StateDir: n.state, Attach: mode, NAT: nat})
				t.Cleanup(next.Close)
				n.do(t, next.EnsureNode)
				newProg := progIDOf(t, next)
				if newProg == progIDOf(t, cur) {
					t.Fatalf("upgrade %d: the program was not replaced (id %d)", i+1, newProg)
				}
				sent := tcp.received.Load()
				time.Sleep(300 * time.Millisecond)
				if tcp.received.Load() == sent {
					t.Errorf("upgrade %d: the TCP stream stalled after the swap", i+1)
				}
				cur = next
			}
			lost, got := udp.stop(t)
			retrans := tcp.stop(t)
			if lost != 0 {
				t.Errorf("%d of %d UDP datagrams lost across the upgrades", lost, got+lost)
			}
			if got < 500 {
				t.Errorf("only %d UDP datagrams sent: the flow did not run through the upgrades", got)
			}
			if retrans != 0 {
				t.Errorf("the TCP stream lost %d segments across the upgrades (retransmissions not shown spurious by a D-SACK)", retrans)
			}
			if c := forwardDropCount(t, n); c != 0 {
				t.Errorf("%d packets went through the node's forwarding during the upgrades", c)
			}
			if after := mapIDs(cur); fmt.Sprint(after) != fmt.Sprint(before) {
				t.Errorf("maps replaced by the upgrade: before %v, after %v", before, after)
			}
			if progIDOf(t, cur) == oldProg {
				t.Error("v1's program still loaded as the current one")
			}
			n.do(t, func() error {
				if err := cur.CheckEndpoint(a); err != nil {
					return err
				}
				return cur.CheckEndpoint(b)
			})
		})
	}
}

func progIDOf(t *testing.T, d *Datapath) cilium.ProgramID {
	t.Helper()
	p, err := d.objs.Program("tern_from_pod")
	if err != nil {
		t.Fatal(err)
	}
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// stream is a paced TCP stream (1 KiB per millisecond, far below what a
// veth carries, so any retransmission is a drop on the datapath).
type stream struct {
	received atomic.Int64
	conn     net.Conn
	done     chan error
	stopped  atomic.Bool
}

func startStream(t *testing.T, from, to ns.NetNS, ip string) *stream {
	t.Helper()
	l, err := testutil.ListenTCP(to, ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	s := &stream{done: make(chan error, 2)}
	go func() {
		c, err := l.Accept()
		if err != nil {
			s.done <- err
			return
		}
		defer c.Close()
		buf := make([]byte, 64<<10)
		var next uint64
		for {
			k, err := io.ReadFull(c, buf[:1024])
			if err != nil {
				if s.stopped.Load() {
					err = nil
				}
				s.done <- err
				return
			}
			if seq := binary.BigEndian.Uint64(buf[:8]); seq != next {
				s.done <- fmt.Errorf("tcp stream: block %d arrived as block %d", seq, next)
				return
			}
			next++
			s.received.Add(int64(k))
		}
	}()
	c, err := testutil.Dial(from, "tcp4", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s.conn = c
	go func() {
		block := make([]byte, 1024)
		for seq := uint64(0); !s.stopped.Load(); seq++ {
			binary.BigEndian.PutUint64(block, seq)
			if _, err := c.Write(block); err != nil {
				if !s.stopped.Load() {
					s.done <- err
				}
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	return s
}

// stop ends the stream and returns how many of the sender's
// retransmissions were not spurious: a retransmission whose original
// arrived (a tail loss probe after a CPU stall, say) is reported back by
// the receiver as a D-SACK and counted in Dsack_dups.
func (s *stream) stop(t *testing.T) uint32 {
	t.Helper()
	raw, err := s.conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var ierr error
	raw.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if ierr != nil {
		t.Fatal(ierr)
	}
	s.stopped.Store(true)
	s.conn.Close()
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("tcp stream: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("tcp stream receiver did not finish")
	}
	if info.Dsack_dups >= info.Total_retrans {
		return 0
	}
	return info.Total_retrans - info.Dsack_dups
}

// udpFlow sends sequenced datagrams every millisecond; the receiver
// records which arrived.
type udpFlow struct {
	pc      net.PacketConn
	conn    net.Conn
	sent    atomic.Int64
	stopped atomic.Bool
	wg      sync.WaitGroup
	mu      sync.Mutex
	seen    map[uint64]bool
}

func startUDPFlow(t *testing.T, from, to ns.NetNS, ip string) *udpFlow {
	t.Helper()
	pc, err := testutil.ListenUDP(to, ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	f := &udpFlow{pc: pc, seen: map[uint64]bool{}}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		buf := make([]byte, 64)
		for {
			k, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if k >= 8 {
				f.mu.Lock()
				f.seen[binary.BigEndian.Uint64(buf[:8])] = true
				f.mu.Unlock()
			}
		}
	}()
	c, err := testutil.Dial(from, "udp4", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	f.conn = c
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		msg := make([]byte, 32)
		for seq := uint64(0); !f.stopped.Load(); seq++ {
			binary.BigEndian.PutUint64(msg, seq)
			if _, err := c.Write(msg); err != nil && !errors.Is(err, net.ErrClosed) {
				continue
			}
			f.sent.Add(1)
			time.Sleep(time.Millisecond)
		}
	}()
	return f
}

// stop ends the flow, waits for stragglers, and returns how many datagrams
// were lost and how many arrived.
func (f *udpFlow) stop(t *testing.T) (lost, got int) {
	t.Helper()
	f.stopped.Store(true)
	time.Sleep(200 * time.Millisecond)
	f.pc.Close()
	f.conn.Close()
	f.wg.Wait()
	f.mu.Lock()
	defer f.mu.Unlock()
	sent := int(f.sent.Load())
	for seq := range sent {
		if f.seen[uint64(seq)] {
			got++
		} else {
			lost++
		}
	}
	return lost, got
}
