package iptables

import (
	"fmt"
	"net"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/internal/testutil"
)

// Every privileged test runs in its own anonymous "node" namespace, so the
// bridge can always be tern0 and the subnet always the same; only the
// network names differ (they name the chains) to keep the iptables output
// of one test recognisable.

var nonName = regexp.MustCompile(`[^A-Za-z0-9]+`)

// testConfig returns a config for the network named after the test, with
// pool 10.99.1.0/24 in cluster 10.99.0.0/16.
func testConfig(t *testing.T, ipMasq bool) Config {
	t.Helper()
	return Config{
		Network:     "tern-" + strings.Trim(nonName.ReplaceAllString(t.Name(), "-"), "-"),
		Bridge:      "tern0",
		MTU:         1400,
		Subnet:      *cidr(t, "10.99.1.0/24"),
		Gateway:     net.ParseIP("10.99.1.1"),
		ClusterCIDR: cidr(t, "10.99.0.0/16"),
		IPMasq:      ipMasq,
	}
}

func mustNew(t *testing.T, cfg Config) *Datapath {
	t.Helper()
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestEnsureNodeIdempotentConcurrent calls EnsureNode from ten goroutines
// at once on a fresh node, then twice more, and reads iptables-save: one jump rule per chain
// and one copy of every rule, and chains spelled exactly as iptables prints
// them (so a repeated EnsureNode rewrites nothing and keeps counters).
func TestEnsureNodeIdempotentConcurrent(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	node := newNS(t)
	cfg := testConfig(t, true)
	cfg.NonMasqueradeCIDRs = []net.IPNet{*cidr(t, "172.16.0.0/12"), *cidr(t, "192.168.7.7/32")}
	d := mustNew(t, cfg)
	fwd, nat := ChainNames(cfg.Network)

	// Ten concurrent calls on a fresh node race to create everything
	// (a start barrier lines them up); two more calls find it all in place.
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, 10)
	for range 10 {
		wg.Go(func() {
			<-start
			errs <- doErr(node, d.EnsureNode)
		})
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent EnsureNode: %v", err)
		}
	}
	assertSingleRuleset(t, node, d)
	do(t, node, d.EnsureNode)
	do(t, node, d.EnsureNode)

	assertSingleRuleset(t, node, d)

	wantFwd := []string{
		"-A " + fwd + " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
		"-A " + fwd + " -j " + DispatchChain(cfg.Network),
		"-A " + fwd + " -i tern0 -j ACCEPT",
		"-A " + fwd + " -o tern0 -j ACCEPT",
	}
	wantNat := []string{
		"-A " + nat + " -d 10.99.0.0/16 -j RETURN",
		"-A " + nat + " -d 172.16.0.0/12 -j RETURN",
		"-A " + nat + " -d 192.168.7.7/32 -j RETURN",
		"-A " + nat + " ! -d 224.0.0.0/4 -j MASQUERADE",
	}
	rules := iptablesSave(t, node)
	if got := lines(rulesIn(rules, "filter", fwd)); !slices.Equal(got, wantFwd) {
		t.Errorf("filter %s:\n%s\nwant:\n%s", fwd, strings.Join(got, "\n"), strings.Join(wantFwd, "\n"))
	}
	if got := lines(rulesIn(rules, "nat", nat)); !slices.Equal(got, wantNat) {
		t.Errorf("nat %s:\n%s\nwant:\n%s", nat, strings.Join(got, "\n"), strings.Join(wantNat, "\n"))
	}
	if j := rulesIn(rules, "filter", "FORWARD"); len(j) == 0 || !strings.HasSuffix(j[0].line, "-j "+fwd) {
		t.Errorf("jump to %s is not the first FORWARD rule: %v", fwd, lines(j))
	}
	if j := jumpsIn(rules, "nat", "POSTROUTING", nat); len(j) == 1 && j[0].line != fmt.Sprintf(`-A POSTROUTING -s 10.99.1.0/24 -m comment --comment "tern:%s" -j %s`, cfg.Network, nat) {
		t.Errorf("nat jump rule: %s", j[0].line)
	}

	// The chains read back exactly as rendered: a steady-state EnsureNode
	// finds nothing to rewrite.
	do(t, node, func() error {
		for _, c := range []chain{d.fwdChainSpec(), d.natChainSpec()} {
			cur, exists, err := listChain(c.table, c.name)
			if err != nil {
				return err
			}
			if !exists || !slices.Equal(cur, c.lines()) {
				return fmt.Errorf("chain %s reads back as %q, rendered as %q", c.name, cur, c.lines())
			}
		}
		return nil
	})

	// Node state besides iptables.
	do(t, node, func() error {
		for _, name := range []string{"net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"} {
			v, err := sysctl.Sysctl(name)
			if err != nil {
				return err
			}
			if v != "1" {
				return fmt.Errorf("sysctl %s = %s, want 1", name, v)
			}
		}
		br, err := netlink.LinkByName("tern0")
		if err != nil {
			return err
		}
		if _, ok := br.(*netlink.Bridge); !ok {
			return fmt.Errorf("tern0 is a %s", br.Type())
		}
		if br.Attrs().MTU != 1400 {
			return fmt.Errorf("bridge MTU %d, want 1400", br.Attrs().MTU)
		}
		if br.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("bridge is down")
		}
		addrs, err := netlink.AddrList(br, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != "10.99.1.1/24" {
			return fmt.Errorf("bridge addresses %v, want 10.99.1.1/24", addrs)
		}
		return nil
	})
}

// TestEnsureNodeRepairsJumps plants a duplicate FORWARD jump and a stale
// POSTROUTING jump (from an older subnet); EnsureNode leaves one of each.
func TestEnsureNodeRepairsJumps(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	node := newNS(t)
	cfg := testConfig(t, true)
	d := mustNew(t, cfg)
	fwd, nat := ChainNames(cfg.Network)
	do(t, node, d.EnsureNode)

	mustRun(t, node, "iptables", "-w", "-A", "FORWARD", "-m", "comment", "--comment", "tern:"+cfg.Network, "-j", fwd)
	mustRun(t, node, "iptables", "-w", "-t", "nat", "-I", "POSTROUTING", "-s", "10.98.0.0/24", "-j", nat)
	if n := len(jumpsIn(iptablesSave(t, node), "filter", "FORWARD", fwd)); n != 2 {
		t.Fatalf("planted FORWARD jumps: %d, want 2", n)
	}

	do(t, node, d.EnsureNode)
	assertSingleRuleset(t, node, d)
	if j := jumpsIn(iptablesSave(t, node), "nat", "POSTROUTING", nat); strings.Contains(j[0].line, "10.98.0.0") {
		t.Errorf("stale nat jump kept: %s", j[0].line)
	}

	// Turning masquerading off removes the nat chain and its jump.
	cfg.IPMasq = false
	do(t, node, mustNew(t, cfg).EnsureNode)
	rules := iptablesSave(t, node)
	if n := len(jumpsIn(rules, "nat", "POSTROUTING", nat)); n != 0 {
		t.Errorf("IPMasq off: %d nat jumps left", n)
	}
	if out := mustRun(t, node, "iptables-save", "-t", "nat"); strings.Contains(out, nat) {
		t.Errorf("IPMasq off: nat chain left:\n%s", out)
	}
	if n := len(jumpsIn(rules, "filter", "FORWARD", fwd)); n != 1 {
		t.Errorf("IPMasq off: %d FORWARD jumps, want 1", n)
	}
}

// assertSingleRuleset checks that every chain and jump rule of d exists
// exactly once.
func assertSingleRuleset(t *testing.T, node ns.NetNS, d *Datapath) {
	t.Helper()
	rules := iptablesSave(t, node)
	fwd, nat := ChainNames(d.cfg.Network)
	if n := len(jumpsIn(rules, "filter", "FORWARD", fwd)); n != 1 {
		t.Errorf("FORWARD jumps to %s: %d, want 1", fwd, n)
	}
	if n := len(jumpsIn(rules, "nat", "POSTROUTING", nat)); n != 1 {
		t.Errorf("POSTROUTING jumps to %s: %d, want 1", nat, n)
	}
	for _, c := range []struct {
		table, chain string
		want         int
	}{
		{"filter", fwd, len(d.fwdChainSpec().rules)},
		{"nat", nat, len(d.natChainSpec().rules)},
	} {
		got := lines(rulesIn(rules, c.table, c.chain))
		if len(got) != c.want {
			t.Errorf("%s %s has %d rules, want %d:\n%s", c.table, c.chain, len(got), c.want, strings.Join(got, "\n"))
		}
		seen := map[string]bool{}
		for _, l := range got {
			if seen[l] {
				t.Errorf("duplicate rule: %s", l)
			}
			seen[l] = true
		}
	}
}

func lines(rules []savedRule) []string {
	var out []string
	for _, r := range rules {
		out = append(out, r.line)
	}
	return out
}

// TestPodToPod wires two pods to the bridge under FORWARD DROP and pings
// pod to pod and pod to gateway; the FORWARD ACCEPT rule counts the
// bridged traffic. Without our jump rule the same ping fails, which proves
// that FORWARD DROP really applies to bridged traffic here.
func TestPodToPod(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	node := newNS(t)
	cfg := testConfig(t, true)
	d := mustNew(t, cfg)
	fwd, _ := ChainNames(cfg.Network)
	gw := cfg.Gateway

	do(t, node, d.EnsureNode)
	a := newPod(t, node, "vetha", cidr(t, "10.99.1.2/24"), gw)
	b := newPod(t, node, "vethb", cidr(t, "10.99.1.3/24"), gw)
	for _, p := range []*fakePod{a, b} {
		do(t, node, func() error { return d.AddEndpoint(p.ep) })
		do(t, node, func() error { return d.CheckEndpoint(p.ep) })
	}
	do(t, node, func() error {
		l, err := netlink.LinkByName("vetha")
		if err != nil {
			return err
		}
		if l.Attrs().MTU != 1400 {
			return fmt.Errorf("host veth MTU %d, want 1400", l.Attrs().MTU)
		}
		return nil
	})
	mustRun(t, node, "iptables", "-w", "-P", "FORWARD", "DROP")

	acceptIn := "-A " + fwd + " -i tern0 -j ACCEPT"
	before := packetsOf(t, iptablesSave(t, node), "filter", acceptIn)

	if err := ping(a.ns, b.ep.IP.IP, 2); err != nil {
		t.Errorf("pod a -> pod b: %v", err)
	}
	if err := ping(b.ns, a.ep.IP.IP, 2); err != nil {
		t.Errorf("pod b -> pod a: %v", err)
	}
	if err := ping(a.ns, gw, 2); err != nil {
		t.Errorf("pod a -> gateway: %v", err)
	}

	after := packetsOf(t, iptablesSave(t, node), "filter", acceptIn)
	if after <= before {
		t.Errorf("counter of %q did not increase: %d -> %d", acceptIn, before, after)
	}

	// Negative control: without the jump, FORWARD DROP stops the pods.
	mustRun(t, node, "iptables", "-w", "-D", "FORWARD", "-m", "comment", "--comment", "tern:"+cfg.Network, "-j", fwd)
	if err := ping(a.ns, b.ep.IP.IP, 1); err == nil {
		t.Errorf("pod a -> pod b succeeded without the FORWARD jump: br_netfilter not in effect?")
	}
}

// TestMasquerade pings from a pod to an "external" host that has no route
// back to the pod subnet: the reply only finds its way when the node
// masquerades.
func TestMasquerade(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	for _, tc := range []struct {
		name    string
		ipMasq  bool
		nonMasq []string
		reaches bool
	}{
		{name: "masquerade", ipMasq: true, reaches: true},
		{name: "no-masquerade", ipMasq: false, reaches: false},
		{name: "non-masquerade-cidr", ipMasq: true, nonMasq: []string{"192.168.77.0/24"}, reaches: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			node := newNS(t)
			ext := newNS(t)
			cfg := testConfig(t, tc.ipMasq)
			for _, c := range tc.nonMasq {
				cfg.NonMasqueradeCIDRs = append(cfg.NonMasqueradeCIDRs, *cidr(t, c))
			}
			d := mustNew(t, cfg)
			_, nat := ChainNames(cfg.Network)

			addVeth(t, node, ext, "ext0", "eth0")
			do(t, node, func() error { return configureIface("ext0", cidr(t, "192.168.77.1/24"), nil) })
			do(t, ext, func() error { return configureIface("eth0", cidr(t, "192.168.77.2/24"), nil) })

			do(t, node, d.EnsureNode)
			pod := newPod(t, node, "vethm", cidr(t, "10.99.1.2/24"), cfg.Gateway)
			do(t, node, func() error { return d.AddEndpoint(pod.ep) })
			mustRun(t, node, "iptables", "-w", "-P", "FORWARD", "DROP")

			extIP := net.ParseIP("192.168.77.2")
			count := 2
			if !tc.reaches {
				count = 1
			}
			err := ping(pod.ns, extIP, count)
			if tc.reaches && err != nil {
				t.Fatalf("pod -> external: %v", err)
			}
			if !tc.reaches {
				if err == nil {
					t.Fatalf("pod -> external succeeded without masquerading")
				}
				return
			}

			masq := "-A " + nat + " ! -d 224.0.0.0/4 -j MASQUERADE"
			if n := packetsOf(t, iptablesSave(t, node), "nat", masq); n == 0 {
				t.Errorf("masquerade rule counted no packet")
			}
			do(t, node, func() error {
				flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4)
				if err != nil {
					return fmt.Errorf("list conntrack: %w", err)
				}
				for _, f := range flows {
					if f.Forward.SrcIP.Equal(pod.ep.IP.IP) && f.Forward.DstIP.Equal(extIP) &&
						f.Reverse.DstIP.Equal(net.ParseIP("192.168.77.1")) {
						return nil
					}
				}
				return fmt.Errorf("no conntrack entry %s -> %s translated to 192.168.77.1 among %d flows", pod.ep.IP.IP, extIP, len(flows))
			})
		})
	}
}

// TestCheckEndpoint breaks one piece of the wiring at a time and expects
// CheckEndpoint to name it; EnsureNode and AddEndpoint repair each.
func TestCheckEndpoint(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	node := newNS(t)
	cfg := testConfig(t, true)
	d := mustNew(t, cfg)
	fwd, nat := ChainNames(cfg.Network)
	do(t, node, d.EnsureNode)
	pod := newPod(t, node, "vethc", cidr(t, "10.99.1.2/24"), cfg.Gateway)
	do(t, node, func() error { return d.AddEndpoint(pod.ep) })
	do(t, node, func() error { return d.CheckEndpoint(pod.ep) })

	withLink := func(name string, f func(netlink.Link) error) func() error {
		return func() error {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			return f(l)
		}
	}
	for _, tc := range []struct {
		name    string
		breakIt func() error
		want    string
	}{
		{"detached", withLink("vethc", netlink.LinkSetNoMaster), "host veth vethc is not attached to bridge tern0"},
		{"hairpin", withLink("vethc", func(l netlink.Link) error { return netlink.LinkSetHairpin(l, false) }), "hairpin mode is off on host veth vethc"},
		{"down", withLink("vethc", netlink.LinkSetDown), "host veth vethc is down"},
		{"fwd-jump", iptablesCmd("-D", "FORWARD", "-m", "comment", "--comment", "tern:"+cfg.Network, "-j", fwd), "jump rule from FORWARD to " + fwd},
		{"nat-jump", iptablesCmd("-t", "nat", "-D", "POSTROUTING", "-s", "10.99.1.0/24", "-m", "comment", "--comment", "tern:"+cfg.Network, "-j", nat), "jump rule from POSTROUTING to " + nat},
		{"antispoof-chain", nftCmd("delete element bridge "+nftTable(cfg.Network)+` ports { "vethc" }`,
			"delete chain bridge "+nftTable(cfg.Network)+" port_vethc"), "anti-spoofing chain port_vethc of host veth vethc is missing"},
		{"antispoof-element", nftCmd("delete element bridge " + nftTable(cfg.Network) + ` ports { "vethc" }`),
			"host veth vethc has no element in map ports"},
		{"gateway", withLink("tern0", func(l netlink.Link) error {
			return netlink.AddrDel(l, &netlink.Addr{IPNet: cidr(t, "10.99.1.1/24")})
		}), "bridge tern0 does not have gateway address 10.99.1.1/24"},
	} {
		do(t, node, tc.breakIt)
		err := doErr(node, func() error { return d.CheckEndpoint(pod.ep) })
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: CheckEndpoint = %v, want error containing %q", tc.name, err, tc.want)
		}
		do(t, node, d.EnsureNode)
		do(t, node, func() error { return d.AddEndpoint(pod.ep) })
		if err := doErr(node, func() error { return d.CheckEndpoint(pod.ep) }); err != nil {
			t.Errorf("%s: after repair: %v", tc.name, err)
		}
	}

	// A veth that is gone, and one that was replaced under the same name.
	missing := *pod.ep
	missing.HostVeth = "vethnone"
	if err := doErr(node, func() error { return d.CheckEndpoint(&missing) }); err == nil || !strings.Contains(err.Error(), "host veth vethnone does not exist") {
		t.Errorf("missing veth: CheckEndpoint = %v", err)
	}
	replaced := *pod.ep
	replaced.HostIfindex = pod.ep.HostIfindex + 1000
	if err := doErr(node, func() error { return d.CheckEndpoint(&replaced) }); err == nil || !strings.Contains(err.Error(), "ifindex") {
		t.Errorf("replaced veth: CheckEndpoint = %v", err)
	}
}

// nftCmd returns a function applying an nft script, one command a line, in
// the current namespace.
func nftCmd(lines ...string) func() error {
	return func() error {
		cmd := exec.Command("nft", "-f", "-")
		cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nft %q: %w: %s", lines, err, out)
		}
		return nil
	}
}

// iptablesCmd returns a function running iptables -w args in the current
// namespace.
func iptablesCmd(args ...string) func() error {
	return func() error {
		out, err := exec.Command("iptables", append([]string{"-w"}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
}

// TestReleaseNode runs two networks side by side on one node: DelEndpoint
// is idempotent, ReleaseNode(1) keeps everything, ReleaseNode(0) removes
// exactly its own network's chains, jump rules and bridge.
func TestReleaseNode(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	node := newNS(t)
	cfgA := testConfig(t, true)
	cfgB := testConfig(t, true)
	cfgB.Network += "-b"
	cfgB.Bridge = "tern1"
	cfgB.Subnet = *cidr(t, "10.99.2.0/24")
	cfgB.Gateway = net.ParseIP("10.99.2.1")
	a, b := mustNew(t, cfgA), mustNew(t, cfgB)
	fwdA, natA := ChainNames(cfgA.Network)
	fwdB, natB := ChainNames(cfgB.Network)

	do(t, node, a.EnsureNode)
	do(t, node, b.EnsureNode)
	pod := newPod(t, node, "vethr", cidr(t, "10.99.1.2/24"), cfgA.Gateway)
	do(t, node, func() error { return a.AddEndpoint(pod.ep) })

	do(t, node, func() error { return a.ReleaseNode(1) })
	do(t, node, func() error { return a.CheckEndpoint(pod.ep) })

	// DEL: detach, again, then again once the CNI layer deleted the veth.
	do(t, node, func() error { return a.DelEndpoint(pod.ep) })
	if out := mustRun(t, node, "nft", "list", "table", "bridge", nftTable(cfgA.Network)); strings.Contains(out, "vethr") {
		t.Errorf("anti-spoofing state of vethr left after DelEndpoint:\n%s", out)
	}
	do(t, node, func() error {
		l, err := netlink.LinkByName("vethr")
		if err != nil {
			return err
		}
		if l.Attrs().MasterIndex != 0 {
			return fmt.Errorf("vethr still has master %d after DelEndpoint", l.Attrs().MasterIndex)
		}
		return nil
	})
	do(t, node, func() error { return a.DelEndpoint(pod.ep) })
	do(t, node, withLinkDel("vethr"))
	do(t, node, func() error { return a.DelEndpoint(pod.ep) })

	do(t, node, func() error { return a.ReleaseNode(0) })
	do(t, node, func() error { return a.ReleaseNode(0) })

	save := mustRun(t, node, "iptables-save")
	for _, gone := range []string{fwdA, natA, "tern:" + cfgA.Network + `"`} {
		if strings.Contains(save, gone) {
			t.Errorf("%s left after ReleaseNode(0):\n%s", gone, save)
		}
	}
	for _, kept := range []string{fwdB, natB} {
		if !strings.Contains(save, kept) {
			t.Errorf("other network's %s removed:\n%s", kept, save)
		}
	}
	do(t, node, func() error {
		if _, err := netlink.LinkByName("tern0"); err == nil {
			return fmt.Errorf("bridge tern0 still exists")
		}
		if _, err := netlink.LinkByName("tern1"); err != nil {
			return fmt.Errorf("other network's bridge: %w", err)
		}
		return nil
	})

	if tables := mustRun(t, node, "nft", "list", "tables"); strings.Contains(tables, nftTable(cfgA.Network)) {
		t.Errorf("anti-spoofing table left after ReleaseNode(0):\n%s", tables)
	}
	do(t, node, func() error { return b.ReleaseNode(0) })
	if save := mustRun(t, node, "iptables-save"); strings.Contains(save, "TERN-") || strings.Contains(save, "tern:") {
		t.Errorf("rules left after releasing both networks:\n%s", save)
	}
	if tables := mustRun(t, node, "nft", "list", "tables"); strings.Contains(tables, "bridge tern_") {
		t.Errorf("anti-spoofing tables left after releasing both networks:\n%s", tables)
	}
}

func withLinkDel(name string) func() error {
	return func() error {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		return netlink.LinkDel(l)
	}
}

// TestAddEndpointNoBridge: AddEndpoint before EnsureNode fails cleanly.
func TestAddEndpointNoBridge(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	node := newNS(t)
	d := mustNew(t, testConfig(t, false))
	pod := newPod(t, node, "vethn", cidr(t, "10.99.1.2/24"), net.ParseIP("10.99.1.1"))
	err := doErr(node, func() error { return d.AddEndpoint(pod.ep) })
	if err == nil || !strings.Contains(err.Error(), "bridge tern0 does not exist") {
		t.Errorf("AddEndpoint without bridge = %v", err)
	}
	if err := doErr(node, func() error { return d.CheckEndpoint(pod.ep) }); err == nil || !strings.Contains(err.Error(), "bridge tern0 does not exist") {
		t.Errorf("CheckEndpoint without bridge = %v", err)
	}
	// DEL and release of a node that never was are no-ops.
	do(t, node, func() error { return d.DelEndpoint(pod.ep) })
	do(t, node, func() error { return d.ReleaseNode(0) })
}

func TestStatus(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()

	node := newNS(t)
	d := mustNew(t, testConfig(t, true))
	do(t, node, d.Status)
}

func TestChainNames(t *testing.T) {
	fwd, nat := ChainNames("k8s-pod-network")
	fwd2, nat2 := ChainNames("k8s-pod-network")
	if fwd != fwd2 || nat != nat2 {
		t.Fatalf("ChainNames is not deterministic")
	}
	if !regexp.MustCompile(`^TERN-FWD-[0-9a-f]{8}$`).MatchString(fwd) || !regexp.MustCompile(`^TERN-NAT-[0-9a-f]{8}$`).MatchString(nat) {
		t.Errorf("ChainNames = %s, %s", fwd, nat)
	}
	if fwd[len("TERN-FWD-"):] != nat[len("TERN-NAT-"):] {
		t.Errorf("hashes differ: %s, %s", fwd, nat)
	}
	if other, _ := ChainNames("k8s-pod-network2"); other == fwd {
		t.Errorf("two networks share chain %s", fwd)
	}
	if len(fwd) > 28 {
		t.Errorf("chain name %s longer than iptables allows", fwd)
	}
}

func TestNew(t *testing.T) {
	ok := func() Config {
		return Config{
			Network: "n",
			Subnet:  *cidr(t, "10.0.1.0/24"),
			Gateway: net.ParseIP("10.0.1.1"),
		}
	}
	d, err := New(ok())
	if err != nil {
		t.Fatal(err)
	}
	if d.cfg.Bridge != DefaultBridge {
		t.Errorf("default bridge %q", d.cfg.Bridge)
	}
	// Host bits of the subnet are dropped, and a nil ClusterCIDR means the
	// subnet itself is not masqueraded.
	c := ok()
	c.Subnet = *cidr(t, "10.0.1.7/24")
	d, err = New(c)
	if err != nil {
		t.Fatal(err)
	}
	if got := d.natChainSpec().lines()[0]; !strings.HasSuffix(got, "-d 10.0.1.0/24 -j RETURN") {
		t.Errorf("first nat rule %q", got)
	}
	// A cluster CIDR that does not cover the subnet still leaves it alone.
	c = ok()
	c.ClusterCIDR = cidr(t, "10.8.0.0/16")
	d, _ = New(c)
	if got := d.natChainSpec().lines(); len(got) != 3 || !strings.Contains(got[1], "10.0.1.0/24") {
		t.Errorf("nat rules %q", got)
	}

	for name, mutate := range map[string]func(*Config){
		"no network":        func(c *Config) { c.Network = "" },
		"long bridge":       func(c *Config) { c.Bridge = "a-very-long-bridge" },
		"ipv6 subnet":       func(c *Config) { c.Subnet = *cidr6(t, "fd00::/64") },
		"gateway outside":   func(c *Config) { c.Gateway = net.ParseIP("10.0.2.1") },
		"no gateway":        func(c *Config) { c.Gateway = nil },
		"negative MTU":      func(c *Config) { c.MTU = -1 },
		"ipv6 cluster CIDR": func(c *Config) { c.ClusterCIDR = cidr6(t, "fd00::/48") },
	} {
		c := ok()
		mutate(&c)
		if _, err := New(c); err == nil {
			t.Errorf("%s: New accepted %+v", name, c)
		}
	}
}

func cidr6(t *testing.T, s string) *net.IPNet {
	t.Helper()
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestSplitWords(t *testing.T) {
	for in, want := range map[string][]string{
		`-A FORWARD -m comment --comment "tern:net" -j TERN-FWD-1`: {"-A", "FORWARD", "-m", "comment", "--comment", "tern:net", "-j", "TERN-FWD-1"},
		`-A X -m comment --comment "a b \"c\"" -j Y`:               {"-A", "X", "-m", "comment", "--comment", `a b "c"`, "-j", "Y"},
		`  -P  FORWARD ACCEPT `:                                    {"-P", "FORWARD", "ACCEPT"},
		`--comment ""`:                                             {"--comment", ""},
	} {
		got, err := splitWords(in)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("splitWords(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := splitWords(`"open`); err == nil {
		t.Errorf("unterminated quote accepted")
	}
}
