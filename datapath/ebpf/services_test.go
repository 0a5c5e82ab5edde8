package ebpf

import (
	"net"
	"testing"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/loader"
)

// TestServiceState: EnsureNode makes tern_service_cidrs hold exactly the
// configured Service CIDRs (a changed list replaces the old one), attaches
// the uplink's egress program, and forgetStackFlows removes the stack
// flows of a deleted pod's address and nothing else.
func TestServiceState(t *testing.T) {
	n := newSNATNode(t)
	dp := n.datapath(t, "", loader.ModeTCX)
	_, a, _ := net.ParseCIDR("10.96.0.0/12")
	_, b, _ := net.ParseCIDR("172.30.0.0/16")
	dp.cfg.ServiceCIDRs = []net.IPNet{*a, *b}
	n.do(t, dp.EnsureNode)
	m, err := dp.objs.Map(ternbpf.TernMapTernServiceCidrs)
	if err != nil {
		t.Fatal(err)
	}
	if got := snatLen(t, m); got != 2 {
		t.Errorf("tern_service_cidrs holds %d prefixes, want 2", got)
	}
	n.do(t, func() error { return dp.loader.CheckAttached(dp.objs, n.up, n.upIndex, loader.HookUplinkEgress) })

	dp.cfg.ServiceCIDRs = []net.IPNet{*b}
	n.do(t, dp.EnsureNode)
	var v uint8
	if err := m.Lookup(ternbpf.TernLpmV4Key{Prefixlen: 32, Addr: mustKey(t, "172.30.1.1")}, &v); err != nil {
		t.Errorf("172.30.1.1 not in the Service CIDRs: %v", err)
	}
	if err := m.Lookup(ternbpf.TernLpmV4Key{Prefixlen: 32, Addr: mustKey(t, "10.96.0.10")}, &v); err == nil {
		t.Errorf("10.96.0.10 still in the Service CIDRs after the config dropped 10.96.0.0/12")
	}

	flows, err := dp.objs.Map(ternbpf.TernMapTernStackCt)
	if err != nil {
		t.Fatal(err)
	}
	gone, kept, other := mustKey(t, "10.244.1.5"), mustKey(t, "10.244.1.6"), mustKey(t, "192.0.2.2")
	for _, k := range []ternbpf.TernPolicyCtKey{
		{LoAddr: gone, HiAddr: kept, LoPort: 1, HiPort: 2, Proto: 6},
		{LoAddr: kept, HiAddr: other, LoPort: 1, HiPort: 2, Proto: 6},
		{LoAddr: other, HiAddr: gone, LoPort: 1, HiPort: 2, Proto: 17},
	} {
		if err := flows.Put(k, ternbpf.TernPolicyCtEntry{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := dp.forgetStackFlows(func(ip net.IP) bool { return ip.Equal(net.ParseIP("10.244.1.5")) }); err != nil {
		t.Fatal(err)
	}
	if got := snatLen(t, flows); got != 1 {
		t.Errorf("%d stack flows left, want 1 (the one without 10.244.1.5)", got)
	}
}

func mustKey(t *testing.T, ip string) uint32 {
	t.Helper()
	k, err := EndpointKey(net.ParseIP(ip))
	if err != nil {
		t.Fatal(err)
	}
	return k
}
