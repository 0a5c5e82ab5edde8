package bpf

import (
	"fmt"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// BenchmarkFromPodRedirect: the same-node fast path, pod to pod without
// policy, as tern_from_pod runs it (anti-spoofing, endpoint lookup, the
// tern_stack_ct lookup, bpf_redirect_peer), kernel-timed with
// BPF_PROG_TEST_RUN (one run per call; the kernel's timing includes a clock
// read around the run): what kube-proxy coexistence costs a packet that
// never touched the host stack. "stack-reply" is an answer of a flow the
// stack delivered, handed back to the stack. The program runs on the
// namespace's loopback (ifindex 1), which the sender's endpoint names, so
// anti-spoofing passes without a veth.
//
//	go test -run XXX -bench BenchmarkFromPodRedirect ./bpf/
func BenchmarkFromPodRedirect(b *testing.B) {
	testutil.RequirePrivileged(b)
	a, z := netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("10.244.1.3")
	for _, c := range []struct {
		name    string
		stack   bool
		verdict uint32
	}{
		{"redirect", false, tcActRedirect},
		{"stack-reply", true, tcActOK},
	} {
		b.Run(c.name, func(b *testing.B) {
			spec, err := LoadTern()
			if err != nil {
				b.Fatal(err)
			}
			for _, m := range spec.Maps {
				m.Pinning = ebpf.PinNone
			}
			coll, err := ebpf.NewCollection(spec)
			if err != nil {
				b.Fatalf("load %+v", err)
			}
			defer coll.Close()
			macA, macZ := []byte{2, 0, 0, 0, 0, 1}, []byte{2, 0, 0, 0, 0, 2}
			host := []byte{2, 0, 0, 0, 1, 1}
			for _, ep := range []struct {
				ip      netip.Addr
				ifindex uint32
				mac     []byte
			}{{a, 1, macA}, {z, 2, macZ}} {
				e := TernEndpoint{Ifindex: ep.ifindex}
				copy(e.PodMac[:], ep.mac)
				copy(e.HostMac[:], host)
				if err := coll.Maps[TernMapTernEndpoints].Put(endpointKey(ep.ip), e); err != nil {
					b.Fatal(err)
				}
			}
			if c.stack {
				k, hi := stackKey(z, 8080, a, 40000, unix.IPPROTO_TCP) // opened by z's client, delivered to a
				e := TernPolicyCtEntry{LastSeen: 1 << 62}              // never idle within the run
				if hi {
					e.Flags = uint16(TernPolicyCtFlagsPOLICY_CT_F_ORIG_HI)
				}
				if err := coll.Maps[TernMapTernStackCt].Put(k, e); err != nil {
					b.Fatal(err)
				}
			}
			frame := natPkt{srcMAC: macA, dstMAC: host, src: a, dst: z,
				proto: unix.IPPROTO_TCP, sport: 40000, dport: 8080, tcpFlags: natTCPAck}.frame()
			world := testutil.NewNetNS(b, "stbench")
			err = world.Do(func(ns.NetNS) error {
				// One run per call: the redirect rewrites the frame (MACs,
				// TTL), and repeated runs would see the rewritten one.
				var total time.Duration
				for range b.N {
					v, d, err := coll.Programs[TernProgTernFromPod].Benchmark(frame, 1, nil)
					if err != nil {
						return err
					}
					if v != c.verdict {
						return fmt.Errorf("verdict %d, want %d", v, c.verdict)
					}
					total += d
				}
				b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/pkt")
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkFromUplinkRemote: a pod of another node (native routing) to a
// pod of this one, as tern_from_uplink runs it, kernel-timed as above:
// "redirect" is the fast path (the tern_stack_ct lookup that finds nothing,
// the receiver's ingress policy without rules, bpf_redirect_peer);
// "stack-reply" an answer to a flow the host stack DNATed to that remote
// pod (kube-proxy, a Service backend on another node), handed to the
// stack. TERN_BENCH_UPLINK_OBJ loads another tern_from_uplink object (an
// older build) for a before/after comparison.
//
//	go test -run XXX -bench BenchmarkFromUplinkRemote ./bpf/
func BenchmarkFromUplinkRemote(b *testing.B) {
	testutil.RequirePrivileged(b)
	remote, local := netip.MustParseAddr("10.244.2.5"), netip.MustParseAddr("10.244.1.3")
	nodeIP := netip.MustParseAddr("192.0.2.1")
	for _, c := range []struct {
		name    string
		stack   bool
		verdict uint32
	}{
		{"redirect", false, tcActRedirect},
		{"stack-reply", true, tcActOK},
	} {
		b.Run(c.name, func(b *testing.B) {
			spec, err := LoadTernUplink()
			if obj := os.Getenv("TERN_BENCH_UPLINK_OBJ"); obj != "" {
				spec, err = ebpf.LoadCollectionSpec(obj)
			}
			if err != nil {
				b.Fatal(err)
			}
			for _, m := range spec.Maps {
				m.Pinning = ebpf.PinNone
			}
			coll, err := ebpf.NewCollection(spec)
			if err != nil {
				b.Fatalf("load %+v", err)
			}
			defer coll.Close()
			e := TernEndpoint{Ifindex: 1}
			copy(e.PodMac[:], []byte{2, 0, 0, 0, 0, 3})
			copy(e.HostMac[:], []byte{2, 0, 0, 0, 1, 1})
			if err := coll.Maps[TernMapTernEndpoints].Put(endpointKey(local), e); err != nil {
				b.Fatal(err)
			}
			if err := coll.Maps[TernMapTernConfig].Put(uint32(0), TernNodeConfig{NodeIp: natAddr(nodeIP)}); err != nil {
				b.Fatal(err)
			}
			rk := TernLpmV4Key{Prefixlen: 24, Addr: natAddr(netip.MustParseAddr("10.244.2.0"))}
			if err := coll.Maps[TernMapTernRemote].Put(rk, TernRemoteNode{NodeIp: natAddr(netip.MustParseAddr("192.0.2.3"))}); err != nil {
				b.Fatal(err)
			}
			if c.stack {
				k, hi := stackKey(local, 40000, remote, 8080, unix.IPPROTO_TCP) // local's flow, DNATed by the stack to remote
				e := TernPolicyCtEntry{LastSeen: 1 << 62}                       // never idle within the run
				if hi {
					e.Flags = uint16(TernPolicyCtFlagsPOLICY_CT_F_ORIG_HI)
				}
				if err := coll.Maps[TernMapTernStackCt].Put(k, e); err != nil {
					b.Fatal(err)
				}
			}
			frame := natPkt{srcMAC: []byte{2, 0, 0, 0, 0, 9}, dstMAC: []byte{2, 0, 0, 0, 1, 9}, src: remote, dst: local,
				proto: unix.IPPROTO_TCP, sport: 8080, dport: 40000, tcpFlags: natTCPAck}.frame()
			world := testutil.NewNetNS(b, "upbench")
			err = world.Do(func(ns.NetNS) error {
				var total time.Duration
				for range b.N {
					v, d, err := coll.Programs[TernUplinkProgTernFromUplink].Benchmark(frame, 1, nil)
					if err != nil {
						return err
					}
					if v != c.verdict {
						return fmt.Errorf("verdict %d, want %d", v, c.verdict)
					}
					total += d
				}
				b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/pkt")
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}
