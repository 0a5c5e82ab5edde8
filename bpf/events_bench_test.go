package bpf

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// BenchmarkEvents measures what events cost per packet (ns/pkt, timed by
// the kernel: BPF_PROG_TEST_RUN with repeat, Program.Benchmark), on two
// paths, each with its kind of event off and on:
//
//   - pass: tern_to_pod letting a packet into a pod without policy state
//     (the fast path: it leaves the packet unchanged, so the repeats all
//     take the same path). Its event is a trace (pass_to_pod), off by
//     default: "off" is the cost every packet pays, "on-limited" the trace
//     flag on at the default rate (all but the first burst suppressed by
//     the token bucket), "on-unlimited" at a rate the bucket never stops
//     (the ring buffer, which nothing reads, fills after a few thousand
//     events: bpf_ringbuf_output fails and counts the loss);
//   - drop: tern_from_pod dropping a spoofed packet, whose event is on by
//     default: "off" with EVENT_F_NO_DROP, "on-limited" the default.
//
// The programs run on the loopback of a fresh namespace (ifindex 1), as
// in BenchmarkPolicy.
func BenchmarkEvents(b *testing.B) {
	testutil.RequirePrivileged(b)
	pod, other := netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("10.244.1.3")
	remote := netip.MustParseAddr("10.244.2.7")
	paths := []struct {
		name    string
		fromPod bool
		frame   []byte
		verdict uint32
		off, on uint32 // event flags
	}{
		{"pass", false, natPkt{srcMAC: []byte{2, 0, 0, 0, 1, 1}, dstMAC: []byte{2, 0, 0, 0, 0, 1}, src: remote, dst: pod, proto: unix.IPPROTO_TCP, sport: 40000, dport: 80, tcpFlags: natTCPAck}.frame(),
			tcActOK, 0, uint32(TernEventFlagsEVENT_F_TRACE)},
		{"drop", true, natPkt{srcMAC: []byte{2, 0, 0, 0, 0, 1}, dstMAC: []byte{2, 0, 0, 0, 1, 1}, src: other, dst: remote, proto: unix.IPPROTO_TCP, sport: 40000, dport: 80, tcpFlags: natTCPAck}.frame(),
			tcActShot, uint32(TernEventFlagsEVENT_F_NO_DROP), 0},
	}
	for _, path := range paths {
		for _, c := range []struct {
			name string
			on   bool
			rate uint32
		}{
			{"off", false, 0},
			{"on-limited", true, 0},
			{"on-unlimited", true, 1_000_000_000},
		} {
			if path.name == "drop" && c.rate != 0 {
				continue
			}
			b.Run(fmt.Sprintf("%s/%s", path.name, c.name), func(b *testing.B) {
				progs, maps := benchLoad(b, false)
				prog := progs[TernProgTernToPod]
				if path.fromPod {
					prog = progs[TernProgTernFromPod]
				}
				e := TernEndpoint{Ifindex: 1, PodMac: [6]byte{2, 0, 0, 0, 0, 1}, HostMac: [6]byte{2, 0, 0, 0, 1, 1}}
				if err := maps[TernMapTernEndpoints].Put(endpointKey(pod), e); err != nil {
					b.Fatal(err)
				}
				flags := path.off
				if c.on {
					flags = path.on
				}
				if err := maps[TernMapTernEventConfig].Put(uint32(0), TernEventConfig{Flags: flags, Rate: c.rate, Burst: c.rate}); err != nil {
					b.Fatal(err)
				}
				world := testutil.NewNetNS(b, "evbench")
				err := world.Do(func(ns.NetNS) error {
					v, per, err := prog.Benchmark(path.frame, b.N, b.ResetTimer)
					if err != nil {
						return err
					}
					if v != path.verdict {
						return fmt.Errorf("verdict %d, want %d", v, path.verdict)
					}
					b.ReportMetric(float64(per.Nanoseconds()), "ns/pkt")
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
				var perCPU []TernEventLimiter
				if err := maps[TernMapTernEventLimiter].Lookup(uint32(0), &perCPU); err != nil {
					b.Fatal(err)
				}
				var sent, suppressed, lost uint64
				for _, l := range perCPU {
					sent, suppressed, lost = sent+l.Sent, suppressed+l.Suppressed, lost+l.Lost
				}
				if c.on != (sent+suppressed+lost > 0) {
					b.Fatalf("events on %v, but sent %d suppressed %d lost %d", c.on, sent, suppressed, lost)
				}
				b.ReportMetric(float64(sent), "sent")
			})
		}
	}
}
