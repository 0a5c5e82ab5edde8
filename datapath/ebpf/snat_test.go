package ebpf

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cilium "github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/loader"
)

// Names in this file start with snat so they cannot clash with the other
// tests of the package.

func TestAddPortRange(t *testing.T) {
	cases := []struct {
		cur, want string
		changed   bool
	}{
		{"", "61000-65535", true},
		{"8080", "8080,61000-65535", true},
		{"61000-65535", "61000-65535", false},
		{"1000-2000,60000-65535", "1000-2000,60000-65535", false},
		{"61000-62000,62001-65535", "61000-62000,62001-65535", false},
		{"61000-64000", "61000-64000,61000-65535", true},
		{"65535", "65535,61000-65535", true},
	}
	for _, tc := range cases {
		got, changed := addPortRange(tc.cur, 61000, 65535)
		if got != tc.want || changed != tc.changed {
			t.Errorf("addPortRange(%q) = %q, %v; want %q, %v", tc.cur, got, changed, tc.want, tc.changed)
		}
	}
}

func TestNATSettings(t *testing.T) {
	base := New(Config{BPFFSDir: "/nonexistent", StateDir: "/nonexistent"})
	if base.loader.Version != ternbpf.ObjectVersion() {
		t.Errorf("default NAT settings: version %q, want the object version %q", base.loader.Version, ternbpf.ObjectVersion())
	}
	n := DefaultNAT()
	n.PortMin, n.PortMax = 50000, 50100
	other := New(Config{BPFFSDir: "/nonexistent", StateDir: "/nonexistent", NAT: n})
	if !strings.HasPrefix(other.loader.Version, ternbpf.ObjectVersion()+"-") {
		t.Errorf("other NAT settings: version %q, want the object version with a suffix", other.loader.Version)
	}
	specs, err := other.loader.Specs()
	if err != nil {
		t.Fatal(err)
	}
	using := 0
	for _, spec := range specs {
		if spec.Variables[ternbpf.TernVarNatPortMin] == nil {
			continue // an object without NAT (TernSock): nothing to set
		}
		using++
		var lo, hi uint32
		if err := spec.Variables[ternbpf.TernVarNatPortMin].Get(&lo); err != nil {
			t.Fatal(err)
		}
		if err := spec.Variables[ternbpf.TernVarNatPortMax].Get(&hi); err != nil {
			t.Fatal(err)
		}
		if lo != 50000 || hi != 50100 {
			t.Errorf("object variables nat_port_min/max = %d/%d, want 50000/50100", lo, hi)
		}
	}
	if using == 0 {
		t.Error("no object has the NAT port variables")
	}
	n.PortMin = 100
	if _, err := New(Config{NAT: n}).loader.Specs(); err == nil {
		t.Error("port range from 100 accepted")
	}
}

// snatNode is a node namespace with two uplink candidates: eth-like veths
// with 192.0.2.1/24 (default route via .2) and 198.18.0.1/24.
type snatNode struct {
	ns       ns.NetNS
	bpffs    string
	state    string
	up, alt  string
	upIndex  int
	altIndex int
}

func newSNATNode(t *testing.T) *snatNode {
	t.Helper()
	testutil.RequirePrivileged(t)
	n := &snatNode{ns: testutil.NewNetNS(t, "snatdp"), bpffs: testutil.MountBPFFS(t), state: t.TempDir(), up: "snup0", alt: "snup1"}
	err := n.ns.Do(func(ns.NetNS) error {
		for i, name := range []string{n.up, n.alt} {
			la := netlink.NewLinkAttrs()
			la.Name = name
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: name + "p"}); err != nil {
				return err
			}
			for _, l := range []string{name, name + "p"} {
				lk, err := netlinksafe.LinkByName(l)
				if err != nil {
					return err
				}
				if err := netlink.LinkSetUp(lk); err != nil {
					return err
				}
			}
			lk, err := netlinksafe.LinkByName(name)
			if err != nil {
				return err
			}
			cidr := []string{"192.0.2.1/24", "198.18.0.1/24"}[i]
			addr, _ := netlink.ParseAddr(cidr)
			if err := netlink.AddrAdd(lk, addr); err != nil {
				return err
			}
			if i == 0 {
				n.upIndex = lk.Attrs().Index
				if err := netlink.RouteAdd(&netlink.Route{LinkIndex: n.upIndex, Gw: net.ParseIP("192.0.2.2")}); err != nil {
					return err
				}
			} else {
				n.altIndex = lk.Attrs().Index
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func (n *snatNode) do(t *testing.T, f func() error) {
	t.Helper()
	if err := n.ns.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// datapath resolves uplink (empty: the default route's) in the node and
// returns a masquerading datapath for 10.244.0.0/16.
func (n *snatNode) datapath(t *testing.T, uplink string, mode loader.Mode) *Datapath {
	t.Helper()
	var up Uplink
	n.do(t, func() error {
		var err error
		up, err = ResolveUplink(uplink)
		return err
	})
	_, cluster, _ := net.ParseCIDR("10.244.0.0/16")
	_, nonMasq, _ := net.ParseCIDR("198.51.100.0/24")
	dp := New(Config{
		BPFFSDir: n.bpffs, StateDir: n.state, Attach: mode,
		Uplink: up, IPMasq: true, ClusterCIDR: cluster, NonMasqueradeCIDRs: []net.IPNet{*nonMasq},
	})
	t.Cleanup(dp.Close)
	return dp
}

func (n *snatNode) sysctl(t *testing.T, name string) string {
	t.Helper()
	var v string
	n.do(t, func() error {
		b, err := os.ReadFile("/proc/sys/net/ipv4/" + name)
		v = strings.TrimSpace(string(b))
		return err
	})
	return v
}

func snatConfig(t *testing.T, dp *Datapath) ternbpf.TernNodeConfig {
	t.Helper()
	m, err := dp.objs.Map(ternbpf.TernMapTernConfig)
	if err != nil {
		t.Fatal(err)
	}
	var c ternbpf.TernNodeConfig
	if err := m.Lookup(uint32(0), &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func snatLen(t *testing.T, m *cilium.Map) int {
	t.Helper()
	var (
		k, v []byte
		n    int
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestSNATNode follows a node's SNAT state through its life: EnsureNode
// resolves and prepares it (uplink program, node config, no-masquerade
// CIDRs, sysctls) idempotently; endpoints get the masquerade flag and a
// gateway address on lo; DEL removes the pod's NAT entries only; a new
// uplink takes over from the old; the last ReleaseNode takes it all down.
func TestSNATNode(t *testing.T) {
	for _, mode := range []loader.Mode{loader.ModeTCX, loader.ModeLegacy} {
		t.Run(string(mode), func(t *testing.T) {
			n := newSNATNode(t)
			dp := n.datapath(t, "", mode)
			if dp.cfg.Uplink.Name != n.up || dp.cfg.Uplink.Ifindex != n.upIndex || !dp.cfg.Uplink.IP.Equal(net.ParseIP("192.0.2.1")) {
				t.Fatalf("default-route uplink resolved to %+v, want %s (%d) 192.0.2.1", dp.cfg.Uplink, n.up, n.upIndex)
			}
			n.do(t, func() error {
				if _, err := ResolveUplink("nosuchdev0"); err == nil || !strings.Contains(err.Error(), "nosuchdev0") {
					t.Errorf("ResolveUplink of a missing interface: %v", err)
				}
				return nil
			})

			for range 2 { // idempotent
				n.do(t, dp.EnsureNode)
			}
			n.do(t, func() error {
				return dp.loader.CheckAttached(dp.objs, n.up, n.upIndex, loader.HookUplinkIngress)
			})
			if c := snatConfig(t, dp); c.UplinkIfindex != uint32(n.upIndex) || c.NodeIp != binary.NativeEndian.Uint32(net.ParseIP("192.0.2.1").To4()) {
				t.Errorf("node config %+v", c)
			}
			nomasq, _ := dp.objs.Map(ternbpf.TernMapTernNomasq)
			if got := snatLen(t, nomasq); got != 2 {
				t.Errorf("tern_nomasq holds %d prefixes, want 2", got)
			}
			// No Service table applied, no frontend: the uplink programs
			// skip their frontend lookup (tern_lb_empty, TestLBEmptyFlag).
			lbEmptyMap, _ := dp.objs.Map(ternbpf.TernMapTernLbEmpty)
			var lbEmpty uint32
			if err := lbEmptyMap.Lookup(uint32(0), &lbEmpty); err != nil || lbEmpty != 1 {
				t.Errorf("tern_lb_empty %d (%v) after EnsureNode without frontends, want 1", lbEmpty, err)
			}
			if v := n.sysctl(t, "ip_forward"); v != "1" {
				t.Errorf("ip_forward = %s", v)
			}
			if v := n.sysctl(t, "ip_local_reserved_ports"); v != "61000-65535" {
				t.Errorf("ip_local_reserved_ports = %q, want 61000-65535", v)
			}

			// An endpoint: masquerade flag, gateway on lo.
			ep := &datapath.Endpoint{HostVeth: "snpod0", IP: net.IPNet{IP: net.ParseIP("10.244.1.2").To4(), Mask: net.CIDRMask(24, 32)}, Gateway: net.ParseIP("10.244.1.1").To4()}
			n.do(t, func() error {
				if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: ep.HostVeth}, PeerName: "snpod0p"}); err != nil {
					return err
				}
				h, err := netlinksafe.LinkByName(ep.HostVeth)
				if err != nil {
					return err
				}
				p, err := netlinksafe.LinkByName("snpod0p")
				if err != nil {
					return err
				}
				ep.HostIfindex, ep.HostMAC, ep.PodMAC = h.Attrs().Index, h.Attrs().HardwareAddr, p.Attrs().HardwareAddr
				return dp.AddEndpoint(ep)
			})
			n.do(t, func() error { return dp.CheckEndpoint(ep) })
			epMap, _ := dp.objs.Map(ternbpf.TernMapTernEndpoints)
			var val ternbpf.TernEndpoint
			key, _ := EndpointKey(ep.IP.IP)
			if err := epMap.Lookup(key, &val); err != nil || val.Flags&uint32(ternbpf.TernEndpointFlagsENDPOINT_F_MASQ) == 0 {
				t.Errorf("endpoint %+v (%v): want the masquerade flag", val, err)
			}

			// NAT entries of this pod and of another address.
			natMap, _ := dp.objs.Map(ternbpf.TernMapTernNat)
			revMap, _ := dp.objs.Map(ternbpf.TernMapTernNatRev)
			ip := func(s string) uint32 { return binary.NativeEndian.Uint32(net.ParseIP(s).To4()) }
			for i, pod := range []string{"10.244.1.2", "10.244.1.3"} {
				natPort := uint16(61000 + i)
				fk := ternbpf.TernNatTuple{Saddr: ip(pod), Daddr: ip("203.0.113.1"), Sport: 1, Dport: 2, Proto: 6}
				rk := ternbpf.TernNatTuple{Saddr: ip("203.0.113.1"), Daddr: ip("192.0.2.1"), Sport: 2, Dport: natPort, Proto: 6}
				if err := natMap.Put(fk, ternbpf.TernNatEntry{Addr: ip("192.0.2.1"), Port: natPort}); err != nil {
					t.Fatal(err)
				}
				if err := revMap.Put(rk, ternbpf.TernNatEntry{Addr: ip(pod), Port: 1}); err != nil {
					t.Fatal(err)
				}
			}
			n.do(t, func() error { return dp.DelEndpoint(ep) })
			if a, b := snatLen(t, natMap), snatLen(t, revMap); a != 1 || b != 1 {
				t.Errorf("after DEL: %d forward, %d reverse entries, want the other address's 1 and 1", a, b)
			}

			// Another uplink takes over.
			dp2 := n.datapath(t, n.alt, mode)
			n.do(t, dp2.EnsureNode)
			n.do(t, func() error {
				if err := dp2.loader.CheckAttached(dp2.objs, n.alt, n.altIndex, loader.HookUplinkIngress); err != nil {
					t.Errorf("new uplink: %v", err)
				}
				if err := dp2.loader.CheckAttached(dp2.objs, n.up, n.upIndex, loader.HookUplinkIngress); err == nil {
					t.Errorf("the old uplink still has the program")
				}
				return nil
			})
			if c := snatConfig(t, dp2); c.UplinkIfindex != uint32(n.altIndex) {
				t.Errorf("node config after the uplink change: %+v", c)
			}

			// The last endpoint is gone: everything goes.
			n.do(t, func() error { return dp2.ReleaseNode(0) })
			if c := snatConfig(t, dp2); c != (ternbpf.TernNodeConfig{}) {
				t.Errorf("node config after release: %+v", c)
			}
			if a, b := snatLen(t, natMap), snatLen(t, revMap); a != 0 || b != 0 {
				t.Errorf("after release: %d forward, %d reverse entries", a, b)
			}
			if pins, _ := filepath.Glob(filepath.Join(n.bpffs, "links", "*")); len(pins) != 0 {
				t.Errorf("link pins after release: %v", pins)
			}
			if recs, _ := os.ReadDir(filepath.Join(n.state, "bpf-legacy")); len(recs) != 0 {
				t.Errorf("legacy records after release: %v", recs)
			}
			n.do(t, func() error {
				if err := checkGatewayAddr(ep.Gateway); err == nil {
					t.Errorf("gateway address still on lo after release")
				}
				return nil
			})
		})
	}
}

// TestSNATReleaseKeepsOtherNetworks: ReleaseNode(0) of one network leaves
// the SNAT state alone while another network's endpoint is in the map.
func TestSNATReleaseKeepsOtherNetworks(t *testing.T) {
	n := newSNATNode(t)
	dp := n.datapath(t, "", loader.ModeTCX)
	n.do(t, dp.EnsureNode)
	m, err := dp.endpoints()
	if err != nil {
		t.Fatal(err)
	}
	key, _ := EndpointKey(net.ParseIP("10.245.0.2"))
	if err := m.Put(key, ternbpf.TernEndpoint{Ifindex: 1}); err != nil {
		t.Fatal(err)
	}
	n.do(t, func() error { return dp.ReleaseNode(0) })
	if c := snatConfig(t, dp); c.UplinkIfindex != uint32(n.upIndex) {
		t.Errorf("node config cleared while another network has an endpoint: %+v", c)
	}
	n.do(t, func() error { return dp.loader.CheckAttached(dp.objs, n.up, n.upIndex, loader.HookUplinkIngress) })
	if err := m.Delete(key); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
		t.Fatal(err)
	}
	n.do(t, func() error { return dp.ReleaseNode(0) })
	// Detaching is asynchronous for an unpinned TCX link: wait a little.
	deadline := time.Now().Add(2 * time.Second)
	for {
		err := n.ns.Do(func(ns.NetNS) error {
			return dp.loader.CheckAttached(dp.objs, n.up, n.upIndex, loader.HookUplinkIngress)
		})
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("uplink program still attached after the last release")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
