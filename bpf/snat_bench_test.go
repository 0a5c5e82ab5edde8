package bpf

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// BenchmarkSNAT measures tern_from_pod's masquerade path per packet
// (ns/pkt, timed by the kernel: BPF_PROG_TEST_RUN). The translated packet
// would not pass anti-spoofing again, so each run is a repeat of one on a
// fresh copy of the frame, and the kernel's per-run times are summed.
// Program.Benchmark has no context argument: the pod is registered behind
// the namespace's loopback (ifindex 1), the program's ingress interface.
//
//   - established: a packet of a flow that has its NAT entries;
//   - new: the first packet of a flow (a new source port each run), the
//     port allocation and both inserts included.
func BenchmarkSNAT(b *testing.B) {
	for _, c := range []string{"established", "new"} {
		b.Run(c, func(b *testing.B) {
			w := newNATWorld(b, natOptions{})
			pod := w.a
			pod.ifindex = 1
			register := func() {
				if err := w.maps[TernMapTernEndpoints].Put(natAddr(pod.ip), pod.value()); err != nil {
					b.Fatal(err)
				}
			}
			register()
			err := w.ns.Do(func(ns.NetNS) error {
				lo, err := netlink.LinkByName("lo")
				if err != nil {
					return err
				}
				return netlink.LinkSetUp(lo)
			})
			if err != nil {
				b.Fatal(err)
			}
			// New flows go to 256 servers: the ports of one remote
			// address and port would run out first.
			frame := func(sport uint16) []byte {
				dst := netip.AddrFrom4([4]byte{100, 64, 0, byte(sport)})
				return natPkt{srcMAC: pod.mac, dstMAC: pod.hostMAC, src: pod.ip, dst: dst,
					proto: unix.IPPROTO_UDP, sport: sport, dport: 53, payload: []byte("query")}.frame()
			}
			run := func(f []byte) (time.Duration, error) {
				var (
					d   time.Duration
					v   uint32
					err error
				)
				err = w.ns.Do(func(ns.NetNS) error {
					v, d, err = w.fromPod.Benchmark(f, 1, nil)
					return err
				})
				if err == nil && v != natActRedirect {
					err = fmt.Errorf("verdict %d, want redirect; metrics %v", v, w.metrics(b))
				}
				return d, err
			}
			est := frame(40000)
			if _, err := run(est); err != nil {
				b.Fatal(err)
			}
			var total time.Duration
			sport := 1
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				f := est
				if c == "new" {
					if sport == 30000 {
						b.StopTimer()
						w.reset(b) // room for more flows
						register()
						sport = 1
						b.StartTimer()
					}
					f = frame(uint16(sport))
					sport++
				}
				d, err := run(f)
				if err != nil {
					b.Fatal(err)
				}
				total += d
			}
			b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/pkt")
		})
	}
}

// BenchmarkNATGC measures one garbage-collection pass (tern_nat_gc, which
// also re-arms the timer) over NAT maps of the default size (65,536
// entries each) holding n live pairs: the cost the timer pays every
// interval. Nothing expires, so every run walks the same entries.
func BenchmarkNATGC(b *testing.B) {
	for _, n := range []int{0, 8192, 65536} {
		b.Run(fmt.Sprintf("pairs=%d", n), func(b *testing.B) {
			w := newNATWorld(b, natOptions{})
			now := uint64(time.Now().UnixNano()) // far ahead of CLOCK_MONOTONIC: never idle
			fwd, rev := w.maps[TernMapTernNat], w.maps[TernMapTernNatRev]
			var fks, rks []TernNatTuple
			var fvs, rvs []TernNatEntry
			for i := range n {
				remote := netip.AddrFrom4([4]byte{100, 64, byte(i >> 8), byte(i)})
				fks = append(fks, natTuple(w.a.ip, 5000, remote, 53, unix.IPPROTO_UDP))
				fvs = append(fvs, TernNatEntry{LastSeen: now, Addr: natAddr(natNodeIP), Port: natPort(61000)})
				rks = append(rks, natTuple(remote, 53, natNodeIP, 61000, unix.IPPROTO_UDP))
				rvs = append(rvs, TernNatEntry{LastSeen: now, Addr: natAddr(w.a.ip), Port: natPort(5000)})
			}
			if n > 0 {
				if _, err := fwd.BatchUpdate(fks, fvs, nil); err != nil {
					b.Fatal(err)
				}
				if _, err := rev.BatchUpdate(rks, rvs, nil); err != nil {
					b.Fatal(err)
				}
			}
			var total time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				var (
					ret uint32
					d   time.Duration
					err error
				)
				err = w.ns.Do(func(ns.NetNS) error {
					ret, d, err = w.gc.Benchmark(make([]byte, 14), 1, nil)
					return err
				})
				if err != nil {
					b.Fatal(err)
				}
				if ret != 0 {
					b.Fatalf("removed %d live entries", int32(ret))
				}
				total += d
			}
			b.ReportMetric(float64(total.Microseconds())/float64(b.N), "µs/pass")
		})
	}
}
