package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"testing"

	cilium "github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/policygen"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/reference"
)

// The differential test: random clusters and policies (internal/policygen,
// seeded), compiled, written into real maps with ApplyRuleSet (each seed's
// rule set over the previous seed's, so the incremental path is what gets
// tested; every fifth seed from what the maps hold, prev nil), and every
// generated packet run through the programs with BPF_PROG_TEST_RUN:
// tern_from_pod on the source's veth when the source is a local pod,
// tern_to_pod on the destination's veth when the destination is one (the
// host stack delivering it). The verdict must be policy/reference's. The
// policy conntrack is emptied before every run, so each packet is the
// first of its flow.

const (
	diffSeeds   = 50
	diffPackets = 100
	tcShot      = 2
)

// diffWorld: a namespace with one veth pair per possible local pod, and the
// pod programs loaded unpinned.
type diffWorld struct {
	ns       ns.NetNS
	veths    []diffVeth
	from, to *cilium.Program
	maps     map[string]*cilium.Map
	pm       PolicyMaps
}

type diffVeth struct {
	ifindex       int
	hostMAC, peer net.HardwareAddr
}

func newDiffWorld(t *testing.T, n int) *diffWorld {
	t.Helper()
	testutil.RequirePrivileged(t)
	w := &diffWorld{ns: testutil.NewNetNS(t, "poldiff")}
	err := w.ns.Do(func(ns.NetNS) error {
		for i := range n {
			host, peer := fmt.Sprintf("ph%d", i), fmt.Sprintf("pp%d", i)
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: host}, PeerName: peer}); err != nil {
				return fmt.Errorf("add veth %s: %w", host, err)
			}
			hl, err := netlink.LinkByName(host)
			if err != nil {
				return err
			}
			pl, err := netlink.LinkByName(peer)
			if err != nil {
				return err
			}
			w.veths = append(w.veths, diffVeth{ifindex: hl.Attrs().Index, hostMAC: hl.Attrs().HardwareAddr, peer: pl.Attrs().HardwareAddr})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	spec, err := ternbpf.LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = cilium.PinNone
	}
	coll, err := cilium.NewCollection(spec)
	if err != nil {
		var verr *cilium.VerifierError
		if errors.As(err, &verr) {
			t.Fatalf("load: %+v", verr)
		}
		t.Fatal(err)
	}
	t.Cleanup(coll.Close)
	w.from, w.to, w.maps = coll.Programs[ternbpf.TernProgTernFromPod], coll.Programs[ternbpf.TernProgTernToPod], coll.Maps
	if w.pm, err = PolicyMapsOf(coll.Maps); err != nil {
		t.Fatal(err)
	}
	return w
}

// clear empties a hash-like map.
func (w *diffWorld) clear(t *testing.T, name string) {
	t.Helper()
	if err := clearMap(w.maps[name]); err != nil {
		t.Fatalf("clear %s: %v", name, err)
	}
}

// diffFrame builds the first packet of a flow as an Ethernet frame: a TCP
// SYN, a UDP datagram, an SCTP INIT's common header or an ICMP echo
// request (policy.Packet's port is the destination port; ICMP has none).
func diffFrame(dstMAC, srcMAC net.HardwareAddr, pkt policy.Packet) []byte {
	var l4 []byte
	switch pkt.Proto {
	case policy.ProtoTCP:
		l4 = binary.BigEndian.AppendUint16(nil, 40000)
		l4 = binary.BigEndian.AppendUint16(l4, pkt.DstPort)
		l4 = append(l4, 0, 0, 0, 1, 0, 0, 0, 0, 5<<4, 0x02, 0xff, 0xff, 0, 0, 0, 0)
	case policy.ProtoUDP:
		l4 = binary.BigEndian.AppendUint16(nil, 40000)
		l4 = binary.BigEndian.AppendUint16(l4, pkt.DstPort)
		l4 = append(l4, 0, 12, 0, 0, 'p', 'o', 'l', 'y')
	case policy.ProtoSCTP:
		l4 = binary.BigEndian.AppendUint16(nil, 40000)
		l4 = binary.BigEndian.AppendUint16(l4, pkt.DstPort)
		l4 = append(l4, 0, 0, 0, 0, 0, 0, 0, 0)
	default:
		l4 = []byte{8, 0, 0, 0, 0x12, 0x34, 0, 1} // ICMP echo request
	}
	ip := make([]byte, 20, 20+len(l4))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8] = 64
	ip[9] = pkt.Proto
	copy(ip[12:], pkt.SrcIP.To4())
	copy(ip[16:], pkt.DstIP.To4())
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	f := append(append(append([]byte{}, dstMAC...), srcMAC...), 0x08, 0x00)
	return append(append(f, ip...), l4...)
}

// skbCtx is the head of struct __sk_buff up to ifindex (BPF_PROG_TEST_RUN
// honours ifindex, looked up in the calling thread's namespace).
type skbCtx struct {
	Len, PktType, Mark, QueueMapping, Protocol, VlanPresent, VlanTCI, VlanProto, Priority, IngressIfindex, Ifindex uint32
}

// run runs prog on frame as if it arrived at ifindex; the caller is inside
// w.ns.
func (w *diffWorld) run(prog *cilium.Program, ifindex int, frame []byte) (uint32, error) {
	return prog.Run(&cilium.RunOptions{Data: frame, Context: skbCtx{Ifindex: uint32(ifindex)}})
}

func TestPolicyDifferential(t *testing.T) {
	w := newDiffWorld(t, policygen.DefaultSizes.MaxPods)
	var prev *compile.RuleSet
	runs := 0
	for seed := uint64(1); seed <= diffSeeds; seed++ {
		r := rand.New(rand.NewPCG(seed, 0x7e57))
		sc, err := policygen.Generate(r, policygen.DefaultSizes)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if seed%5 == 0 {
			prev = nil // start from what the maps hold
		}
		next, err := compile.Compile(sc.State, sc.Topology, prev)
		if err != nil {
			t.Fatalf("seed %d: compile: %v", seed, err)
		}
		if err := ApplyRuleSet(w.pm, prev, next); err != nil {
			t.Fatalf("seed %d: apply: %v", seed, err)
		}
		prev = next
		checkTables(t, seed, w.pm, next)

		// The local pods are endpoints behind the veths, in IP order.
		w.clear(t, ternbpf.TernMapTernEndpoints)
		vethOf := map[string]diffVeth{}
		for _, ip := range slices.Sorted(func(yield func(string) bool) {
			for ip, ep := range sc.Topology.Endpoints {
				if ep.Local && !yield(ip) {
					return
				}
			}
		}) {
			v := w.veths[len(vethOf)]
			vethOf[ip] = v
			key, _ := EndpointKey(net.ParseIP(ip))
			val := ternbpf.TernEndpoint{Ifindex: uint32(v.ifindex)}
			copy(val.PodMac[:], v.peer)
			copy(val.HostMac[:], v.hostMAC)
			if err := w.maps[ternbpf.TernMapTernEndpoints].Put(key, val); err != nil {
				t.Fatal(err)
			}
		}

		sim, err := compile.NewSimulator(next)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		failed := false
		for i, pkt := range policygen.Packets(r, sc, diffPackets) {
			want := reference.Decide(sc.State, sc.Topology, pkt)
			if got := sim.Allowed(pkt); got != want.Allowed {
				t.Errorf("seed %d packet %d %v: the simulator says %v, the reference %v (%s)", seed, i, pkt, got, want.Allowed, want.Reason)
			}
			src, srcLocal := vethOf[addr(pkt.SrcIP)]
			dst, dstLocal := vethOf[addr(pkt.DstIP)]
			type hook struct {
				name    string
				prog    *cilium.Program
				ifindex int
				frame   []byte
			}
			var hooks []hook
			if srcLocal {
				hooks = append(hooks, hook{"tern_from_pod on the source's veth", w.from, src.ifindex, diffFrame(src.hostMAC, src.peer, pkt)})
			}
			if dstLocal {
				// Delivered by the host stack (from the node, another
				// node, outside, or a local pod's packet the stack routed).
				hooks = append(hooks, hook{"tern_to_pod on the destination's veth", w.to, dst.ifindex, diffFrame(dst.peer, dst.hostMAC, pkt)})
			}
			if len(hooks) == 0 && !want.Allowed {
				t.Errorf("seed %d packet %d %v: no local end, but the reference denies it (%s)", seed, i, pkt, want.Reason)
			}
			for _, h := range hooks {
				w.clear(t, ternbpf.TernMapTernPolicyCt)
				w.clear(t, ternbpf.TernMapTernPolicyCtOther)
				var verdict uint32
				err := w.ns.Do(func(ns.NetNS) error {
					var err error
					verdict, err = w.run(h.prog, h.ifindex, h.frame)
					return err
				})
				if err != nil {
					t.Fatalf("seed %d packet %d: run %s: %v", seed, i, h.name, err)
				}
				runs++
				if h.prog == w.from && pkt.DstIP.To4() != nil && pkt.DstIP.To4()[0] == 127 {
					// Loopback destinations are dropped before policy
					// (CVE-2020-8558 class), whatever policy says.
					if verdict != tcShot {
						t.Errorf("seed %d packet %d %v: %s passed a packet to 127/8 (verdict %d)", seed, i, pkt, h.name, verdict)
					}
					continue
				}
				if got := verdict != tcShot; got != want.Allowed {
					t.Errorf("seed %d packet %d %v: %s allows=%v (verdict %d), reference allows=%v: %s",
						seed, i, pkt, h.name, got, verdict, want.Allowed, want.Reason)
					failed = true
				}
			}
		}
		if failed {
			t.Logf("seed %d scenario:\n%s", seed, sc.YAML())
		}
	}
	t.Logf("%d seeds, %d program runs", diffSeeds, runs)
}

func addr(ip net.IP) string {
	a, ok := policy.Addr(ip)
	if !ok {
		return ""
	}
	return a.String()
}

// checkTables compares the maps with the rule set's tables.
func checkTables(t *testing.T, seed uint64, pm PolicyMaps, rs *compile.RuleSet) {
	t.Helper()
	got, err := ReadRuleSet(pm)
	if err != nil {
		t.Fatalf("seed %d: %v", seed, err)
	}
	if len(got.Endpoints) != len(rs.Endpoints) {
		t.Errorf("seed %d: %d endpoint entries, want %d", seed, len(got.Endpoints), len(rs.Endpoints))
	}
	for ip, ep := range rs.Endpoints {
		if got.Endpoints[ip] != ep {
			t.Errorf("seed %d: endpoint %s is %+v, want %+v", seed, ip, got.Endpoints[ip], ep)
		}
	}
	ipc := func(es []compile.IPCacheEntry) []string {
		var out []string
		for _, e := range es {
			p := netip.MustParsePrefix(e.Prefix.String())
			out = append(out, fmt.Sprintf("%s=%d", p, e.Class))
		}
		slices.Sort(out)
		return out
	}
	if g, w := ipc(got.IPCache), ipc(rs.IPCache); !slices.Equal(g, w) {
		t.Errorf("seed %d: ipcache %v, want %v", seed, g, w)
	}
	pol := func(es []compile.PolicyEntry) []string {
		var out []string
		for _, e := range es {
			b, _ := e.Key.MarshalBinary()
			out = append(out, fmt.Sprintf("%x=%d", b, e.Verdict))
		}
		slices.Sort(out)
		return out
	}
	if g, w := pol(got.Policy), pol(rs.Policy); !slices.Equal(g, w) {
		t.Errorf("seed %d: %d policy entries, want %d", seed, len(g), len(w))
	}
}
