package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	cilium "github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/loader"
)

// The tests build a node: a network namespace with a datapath whose pins
// live on a per-test bpffs. Datapath methods run inside the node namespace,
// as the CNI plugin does. Pods are namespaces joined to the node by veth
// pairs. Nothing touches the root namespace.

var modes = []loader.Mode{loader.ModeTCX, loader.ModeLegacy}

type node struct {
	ns    ns.NetNS
	dp    *Datapath
	bpffs string
	state string
}

func newNode(t *testing.T, mode loader.Mode) *node {
	t.Helper()
	testutil.RequirePrivileged(t)
	n := &node{ns: testutil.NewNetNS(t, "dpnode"), bpffs: testutil.MountBPFFS(t), state: t.TempDir()}
	n.dp = New(Config{BPFFSDir: n.bpffs, StateDir: n.state, Attach: mode})
	t.Cleanup(n.dp.Close)
	n.do(t, func() error {
		// /proc/sys/net belongs to the namespace of the thread opening it.
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	})
	return n
}

// do runs f in the node namespace and fails the test on error.
func (n *node) do(t *testing.T, f func() error) {
	t.Helper()
	if err := n.in(f); err != nil {
		t.Fatal(err)
	}
}

// in runs f in the node namespace.
func (n *node) in(f func() error) error {
	return n.ns.Do(func(ns.NetNS) error { return f() })
}

func (n *node) add(t *testing.T, ep *datapath.Endpoint) {
	t.Helper()
	if err := n.in(func() error { return n.dp.AddEndpoint(ep) }); err != nil {
		t.Fatalf("AddEndpoint %s on %s: %v", ep.IP.IP, ep.HostVeth, err)
	}
	// DEL in case the test fails before its own DEL; DEL is idempotent.
	t.Cleanup(func() {
		if err := n.in(func() error { return n.dp.DelEndpoint(ep) }); err != nil {
			t.Errorf("cleanup: DelEndpoint %s: %v", ep.HostVeth, err)
		}
	})
}

func (n *node) del(t *testing.T, ep *datapath.Endpoint) {
	t.Helper()
	if err := n.in(func() error { return n.dp.DelEndpoint(ep) }); err != nil {
		t.Fatalf("DelEndpoint %s on %s: %v", ep.IP.IP, ep.HostVeth, err)
	}
}

func (n *node) check(ep *datapath.Endpoint) error {
	return n.in(func() error { return n.dp.CheckEndpoint(ep) })
}

// endpoint creates a veth pair in the node (both ends stay there, which is
// all the datapath sees of a pod) and returns the endpoint of its host end.
func (n *node) endpoint(t *testing.T, cidr string) *datapath.Endpoint {
	t.Helper()
	ip, ipnet, err := net.ParseCIDR(cidr)
	if err != nil {
		t.Fatal(err)
	}
	ep := &datapath.Endpoint{HostVeth: testutil.UniqueName("dph"), IfName: "eth0", IP: net.IPNet{IP: ip, Mask: ipnet.Mask}}
	peer := testutil.UniqueName("dpp")
	n.do(t, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = ep.HostVeth
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peer}); err != nil {
			return fmt.Errorf("add veth %s: %w", ep.HostVeth, err)
		}
		host, err := netlinksafe.LinkByName(ep.HostVeth)
		if err != nil {
			return err
		}
		p, err := netlinksafe.LinkByName(peer)
		if err != nil {
			return err
		}
		ep.HostIfindex = host.Attrs().Index
		ep.HostMAC = host.Attrs().HardwareAddr
		ep.PodMAC = p.Attrs().HardwareAddr
		return netlink.LinkSetUp(host)
	})
	return ep
}

func (n *node) delLink(t *testing.T, name string) {
	t.Helper()
	n.do(t, func() error {
		l, err := netlinksafe.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	})
}

// progID is the kernel ID of the node's tern_from_pod.
func (n *node) progID(t *testing.T) int {
	t.Helper()
	if err := n.dp.EnsureNode(); err != nil {
		t.Fatal(err)
	}
	p, err := n.dp.objs.Program(ternbpf.TernProgTernFromPod)
	if err != nil {
		t.Fatal(err)
	}
	id, err := loader.ProgramID(p)
	if err != nil {
		t.Fatal(err)
	}
	return int(id)
}

// attached lists the IDs of the programs at tc ingress of ep's host veth,
// TCX and cls_bpf alike; nil when the veth is gone.
func (n *node) attached(t *testing.T, ep *datapath.Endpoint) []int {
	t.Helper()
	var ids []int
	n.do(t, func() error {
		l, err := netlinksafe.LinkByName(ep.HostVeth)
		if err != nil {
			return nil // gone: nothing attached
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: cilium.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("query tcx of %s: %w", ep.HostVeth, err)
		}
		for _, p := range res.Programs {
			ids = append(ids, int(p.ID))
		}
		filters, err := netlinksafe.FilterList(l, netlink.HANDLE_MIN_INGRESS)
		if err != nil {
			return fmt.Errorf("list filters of %s: %w", ep.HostVeth, err)
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				ids = append(ids, bf.Id)
			}
		}
		return nil
	})
	return ids
}

// entries returns the endpoints map as IP -> value.
func (n *node) entries(t *testing.T) map[string]ternbpf.TernEndpoint {
	t.Helper()
	m, err := n.dp.endpoints()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]ternbpf.TernEndpoint{}
	var (
		key uint32
		val ternbpf.TernEndpoint
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		// The key is the address in network order read as a native integer.
		ip := binary.NativeEndian.AppendUint32(nil, key)
		out[net.IP(ip).String()] = val
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func (n *node) pinsAndRecords(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, dir := range []string{filepath.Join(n.bpffs, "links"), filepath.Join(n.state, "bpf-legacy")} {
		entries, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		for _, e := range entries {
			out = append(out, filepath.Join(filepath.Base(dir), e.Name()))
		}
	}
	return out
}

func TestEndpointLifecycle(t *testing.T) {
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			n := newNode(t, mode)
			ep := n.endpoint(t, "10.244.3.2/24")
			n.add(t, ep)
			id := n.progID(t)

			want, err := EndpointValue(ep)
			if err != nil {
				t.Fatal(err)
			}
			if got := n.entries(t); len(got) != 1 || got["10.244.3.2"] != want {
				t.Errorf("endpoints map %+v, want only 10.244.3.2: %+v", got, want)
			}
			if got := n.attached(t, ep); !slices.Equal(got, []int{id}) {
				t.Errorf("programs at ingress of %s: %v, want [%d]", ep.HostVeth, got, id)
			}
			if err := n.check(ep); err != nil {
				t.Errorf("CheckEndpoint: %v", err)
			}

			// A map entry pointing elsewhere is reported.
			m, err := n.dp.endpoints()
			if err != nil {
				t.Fatal(err)
			}
			key, _ := EndpointKey(ep.IP.IP)
			stale := want
			stale.Ifindex++
			if err := m.Put(key, stale); err != nil {
				t.Fatal(err)
			}
			if err := n.check(ep); err == nil || !strings.Contains(err.Error(), "stale") {
				t.Errorf("CheckEndpoint with a stale entry: %v, want a stale error", err)
			}

			// ADD again repairs it, with still a single program attached.
			n.add(t, ep)
			if err := n.check(ep); err != nil {
				t.Errorf("CheckEndpoint after a second ADD: %v", err)
			}
			if got := n.attached(t, ep); !slices.Equal(got, []int{id}) {
				t.Errorf("programs at ingress of %s after a second ADD: %v, want [%d]", ep.HostVeth, got, id)
			}

			n.del(t, ep)
			if got := n.entries(t); len(got) != 0 {
				t.Errorf("endpoints map after DEL: %+v", got)
			}
			if got := n.attached(t, ep); len(got) != 0 {
				t.Errorf("programs at ingress of %s after DEL: %v", ep.HostVeth, got)
			}
			if err := n.check(ep); err == nil {
				t.Error("CheckEndpoint succeeded after DEL")
			}
			n.del(t, ep) // DEL is idempotent
			if got := n.pinsAndRecords(t); len(got) != 0 {
				t.Errorf("left after DEL: %v", got)
			}
		})
	}
}

// TestDelEndpointKeepsReusedIP: after a pod's IP went to a new pod on
// another veth, a (retried) DEL of the old pod must leave the new pod's
// entry alone.
func TestDelEndpointKeepsReusedIP(t *testing.T) {
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			n := newNode(t, mode)
			old := n.endpoint(t, "10.244.3.7/24")
			n.add(t, old)
			cur := n.endpoint(t, "10.244.3.7/24")
			n.add(t, cur)
			id := n.progID(t)

			n.del(t, old)
			if got := n.entries(t)["10.244.3.7"]; got.Ifindex != uint32(cur.HostIfindex) {
				t.Errorf("entry of 10.244.3.7 has ifindex %d after the old pod's DEL, want the new pod's %d", got.Ifindex, cur.HostIfindex)
			}
			if err := n.check(cur); err != nil {
				t.Errorf("CheckEndpoint of the new pod: %v", err)
			}
			if got := n.attached(t, old); len(got) != 0 {
				t.Errorf("old pod's veth still runs %v", got)
			}
			if got := n.attached(t, cur); !slices.Equal(got, []int{id}) {
				t.Errorf("new pod's veth runs %v, want [%d]", got, id)
			}
		})
	}
}

// TestDelEndpointInterfaceGone: DEL after the veth disappeared (the pod's
// namespace was destroyed first) cleans up and stays idempotent.
func TestDelEndpointInterfaceGone(t *testing.T) {
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			n := newNode(t, mode)
			ep := n.endpoint(t, "10.244.3.9/24")
			n.add(t, ep)
			n.delLink(t, ep.HostVeth)

			n.del(t, ep)
			n.del(t, ep)
			if got := n.entries(t); len(got) != 0 {
				t.Errorf("endpoints map after DEL: %+v", got)
			}
			if got := n.pinsAndRecords(t); len(got) != 0 {
				t.Errorf("left after DEL: %v", got)
			}
		})
	}
}

func TestSweep(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	a := n.endpoint(t, "10.244.4.2/24")
	b := n.endpoint(t, "10.244.4.3/24")
	c := n.endpoint(t, "10.244.4.4/24")
	for _, ep := range []*datapath.Endpoint{a, b, c} {
		n.add(t, ep)
	}
	// An endpoint to keep that has no entry is fine.
	missing := &datapath.Endpoint{IP: net.IPNet{IP: net.ParseIP("10.244.4.99"), Mask: net.CIDRMask(24, 32)}}

	if err := n.in(func() error { return n.dp.Sweep([]*datapath.Endpoint{a, c, missing}) }); err != nil {
		t.Fatalf("Sweep: %v", err)
	}
	got := n.entries(t)
	if len(got) != 2 || got["10.244.4.2"].Ifindex != uint32(a.HostIfindex) || got["10.244.4.4"].Ifindex != uint32(c.HostIfindex) {
		t.Errorf("endpoints map after Sweep: %+v, want 10.244.4.2 and 10.244.4.4", got)
	}
	for _, ep := range []*datapath.Endpoint{a, c} {
		if err := n.check(ep); err != nil {
			t.Errorf("CheckEndpoint %s after Sweep: %v", ep.IP.IP, err)
		}
	}
	if err := n.check(b); err == nil {
		t.Errorf("CheckEndpoint %s succeeded after Sweep removed it", b.IP.IP)
	}

	if err := n.in(func() error { return n.dp.Sweep(nil) }); err != nil {
		t.Fatalf("Sweep(nil): %v", err)
	}
	if got := n.entries(t); len(got) != 0 {
		t.Errorf("endpoints map after Sweep(nil): %+v", got)
	}
}

func TestMetricsSumCPUs(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	if err := n.dp.EnsureNode(); err != nil {
		t.Fatal(err)
	}
	m, err := n.dp.objs.Map(ternbpf.TernMapTernMetrics)
	if err != nil {
		t.Fatal(err)
	}
	perCPU := make([]ternbpf.TernMetricValue, cilium.MustPossibleCPU())
	var want ternbpf.TernMetricValue
	for i := range perCPU {
		perCPU[i] = ternbpf.TernMetricValue{Packets: uint64(i + 1), Bytes: uint64(100 * (i + 1))}
		want.Packets += perCPU[i].Packets
		want.Bytes += perCPU[i].Bytes
	}
	if err := m.Put(uint32(ternbpf.TernMetricMETRIC_DROP_SPOOFED), perCPU); err != nil {
		t.Fatal(err)
	}

	got, err := n.dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != int(ternbpf.TernMetricMETRIC_MAX) {
		t.Errorf("%d metrics, want %d: %v", len(got), ternbpf.TernMetricMETRIC_MAX, got)
	}
	for name, v := range got {
		w := ternbpf.TernMetricValue{}
		if name == "drop_spoofed" {
			w = want
		}
		if v != w {
			t.Errorf("metric %s = %+v, want %+v", name, v, w)
		}
	}
}

// pod creates a pod namespace joined to the node by a veth pair, wired the
// way the CNI plugin wires pods: the pod has ip/32 on eth0 and a default
// route via gw onlink, with a permanent neighbour entry resolving gw to the
// host veth's MAC; the node routes ip/32 to the host veth, with a permanent
// neighbour entry for the pod.
func (n *node) pod(t *testing.T, ip, gw string) (*datapath.Endpoint, ns.NetNS) {
	t.Helper()
	podNS := testutil.NewNetNS(t, "dppod")
	podIP, gwIP := net.ParseIP(ip).To4(), net.ParseIP(gw).To4()
	host32 := &net.IPNet{IP: podIP, Mask: net.CIDRMask(32, 32)}
	ep := &datapath.Endpoint{
		HostVeth: testutil.UniqueName("dph"),
		IfName:   "eth0",
		IP:       net.IPNet{IP: podIP, Mask: net.CIDRMask(24, 32)},
		Gateway:  gwIP,
	}
	peer := testutil.UniqueName("dpp")

	n.do(t, func() error {
		la := netlink.NewLinkAttrs()
		la.Name = ep.HostVeth
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peer}); err != nil {
			return fmt.Errorf("add veth %s: %w", ep.HostVeth, err)
		}
		p, err := netlinksafe.LinkByName(peer)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetNsFd(p, int(podNS.Fd())); err != nil {
			return fmt.Errorf("move %s to the pod: %w", peer, err)
		}
		host, err := netlinksafe.LinkByName(ep.HostVeth)
		if err != nil {
			return err
		}
		ep.HostIfindex = host.Attrs().Index
		ep.HostMAC = host.Attrs().HardwareAddr
		return netlink.LinkSetUp(host)
	})

	err := podNS.Do(func(ns.NetNS) error {
		eth0, err := netlinksafe.LinkByName(peer)
		if err != nil {
			return err
		}
		if err := netlink.LinkSetName(eth0, "eth0"); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(eth0); err != nil {
			return err
		}
		ep.PodMAC = eth0.Attrs().HardwareAddr
		idx := eth0.Attrs().Index
		if err := netlink.AddrAdd(eth0, &netlink.Addr{IPNet: host32}); err != nil {
			return fmt.Errorf("add %s: %w", host32, err)
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: idx, Gw: gwIP, Flags: int(netlink.FLAG_ONLINK)}); err != nil {
			return fmt.Errorf("add default via %s onlink: %w", gwIP, err)
		}
		return netlink.NeighAdd(&netlink.Neigh{LinkIndex: idx, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: gwIP, HardwareAddr: ep.HostMAC})
	})
	if err != nil {
		t.Fatalf("pod %s: %v", ip, err)
	}

	n.do(t, func() error {
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: ep.HostIfindex, Dst: host32, Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("add route %s: %w", host32, err)
		}
		return netlink.NeighAdd(&netlink.Neigh{LinkIndex: ep.HostIfindex, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: podIP, HardwareAddr: ep.PodMAC})
	})
	return ep, podNS
}

// forwardDropCount returns the packet counter of the node's FORWARD DROP
// rule.
func forwardDropCount(t *testing.T, n *node) uint64 {
	t.Helper()
	out, err := testutil.ExecIn(n.ns, "iptables", "-w", "-L", "FORWARD", "-v", "-n", "-x")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == "DROP" {
			c, err := strconv.ParseUint(f[0], 10, 64)
			if err != nil {
				t.Fatalf("parse %q: %v", line, err)
			}
			return c
		}
	}
	t.Fatalf("no DROP rule in FORWARD:\n%s", out)
	return 0
}

func redirectPeer(t *testing.T, n *node) uint64 {
	t.Helper()
	m, err := n.dp.Metrics()
	if err != nil {
		t.Fatal(err)
	}
	return m["redirect_peer"].Packets
}

// pingFails sends one echo request and reports an error unless it got no
// reply.
func pingFails(from ns.NetNS, ip string) error {
	if _, err := testutil.ExecIn(from, "ping", "-n", "-c", "1", "-W", "1", ip); err == nil {
		return fmt.Errorf("ping %s from %s succeeded", ip, testutil.NSName(from))
	}
	return nil
}

// TestPodToPodTraffic sends real pings between two pods of a node and shows
// they bypass the node's routing and netfilter: with the datapath attached
// they pass although the node's FORWARD chain drops everything, whose DROP
// rule then counts nothing; without it, the same rule stops them.
func TestPodToPodTraffic(t *testing.T) {
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			n := newNode(t, mode)
			a, aNS := n.pod(t, "10.244.5.2", "10.244.5.1")
			b, bNS := n.pod(t, "10.244.5.3", "10.244.5.1")

			// Control: the node forwards between the pods itself, and
			// FORWARD -j DROP stops that.
			if err := testutil.Ping(aNS, "10.244.5.3", 1); err != nil {
				t.Fatalf("without the datapath, through the node's routing: %v", err)
			}
			if _, err := testutil.ExecIn(n.ns, "iptables", "-w", "-I", "FORWARD", "-j", "DROP"); err != nil {
				t.Fatal(err)
			}
			if err := pingFails(aNS, "10.244.5.3"); err != nil {
				t.Fatalf("FORWARD -j DROP in place, no datapath: %v", err)
			}
			if c := forwardDropCount(t, n); c == 0 {
				t.Fatal("FORWARD DROP rule counted nothing for a forwarded ping")
			}
			if _, err := testutil.ExecIn(n.ns, "iptables", "-w", "-Z", "FORWARD"); err != nil {
				t.Fatal(err)
			}

			n.add(t, a)
			n.add(t, b)
			before := redirectPeer(t, n)
			if err := testutil.Ping(aNS, "10.244.5.3", 3); err != nil {
				t.Errorf("pod a -> pod b: %v", err)
			}
			if err := testutil.Ping(bNS, "10.244.5.2", 3); err != nil {
				t.Errorf("pod b -> pod a: %v", err)
			}
			if c := forwardDropCount(t, n); c != 0 {
				t.Errorf("FORWARD DROP rule counted %d packets: pod traffic went through the node's forwarding", c)
			}
			// 2 × 3 requests and as many replies.
			if got := redirectPeer(t, n) - before; got < 12 {
				t.Errorf("redirect_peer grew by %d, want at least 12", got)
			}
		})
	}
}
