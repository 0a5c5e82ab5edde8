package iptables

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	osexec "os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/internal/policygen"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/reference"
)

// probeTimeout is how long a probe waits before calling the packet dropped.
const probeTimeout = 1500 * time.Millisecond

// policyNode is a node namespace with the iptables datapath of a
// 10.244.1.0/24 network (gateway 10.244.1.1, policygen's pod range) under
// FORWARD DROP.
func policyNode(t *testing.T) (ns.NetNS, *Datapath) {
	t.Helper()
	node := newNS(t)
	d := mustNew(t, Config{
		Network: "tern-" + strings.Trim(nonName.ReplaceAllString(t.Name(), "-"), "-"),
		Bridge:  "tern0",
		Subnet:  *cidr(t, "10.244.1.0/24"),
		Gateway: net.ParseIP("10.244.1.1"),
	})
	do(t, node, d.EnsureNode)
	mustRun(t, node, "iptables", "-w", "-P", "FORWARD", "DROP")
	// Release at the end even when the test fails, and check that nothing
	// of ours is left: no chain, no set (here or in the root namespace).
	t.Cleanup(func() {
		if err := doErr(node, func() error { return d.ReleaseNode(0) }); err != nil {
			t.Errorf("ReleaseNode: %v", err)
		}
		if out, _ := run(node, "iptables-save"); strings.Contains(out, "TERN") {
			t.Errorf("iptables rules left after ReleaseNode:\n%s", out)
		}
		if out, _ := run(node, "ipset", "list", "-n"); strings.TrimSpace(out) != "" {
			t.Errorf("ipsets left in the node after ReleaseNode: %s", out)
		}
		if out, err := osexec.Command("ipset", "list", "-n").CombinedOutput(); err == nil && strings.Contains(string(out), d.pol.names.setPrefix) {
			t.Errorf("ipsets of this test in the root namespace: %s", out)
		}
	})
	return node, d
}

// probe is one connection attempt between two pods.
type probe struct {
	from, to *fakePod
	proto    uint8
	port     uint16
	want     bool
	why      string
}

func (p probe) String() string {
	return fmt.Sprintf("%s -> %s %s/%d", p.from.ep.IP.IP, p.to.ep.IP.IP, map[uint8]string{6: "tcp", 17: "udp"}[p.proto], p.port)
}

// run reports whether the probe's connection got through: TCP connect, or
// a UDP datagram echoed back.
func (p probe) run() (bool, error) {
	addr := net.JoinHostPort(p.to.ep.IP.IP.String(), strconv.Itoa(int(p.port)))
	wild := net.JoinHostPort("0.0.0.0", strconv.Itoa(int(p.port)))
	if p.proto == policy.ProtoTCP {
		l, err := testutil.ListenTCP(p.to.ns, wild)
		if err != nil {
			return false, err
		}
		defer l.Close()
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		var c net.Conn
		err = p.from.ns.Do(func(ns.NetNS) error {
			var err error
			c, err = net.DialTimeout("tcp4", addr, probeTimeout)
			return err
		})
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) || strings.Contains(err.Error(), "timeout") {
				return false, nil
			}
			return false, err
		}
		c.Close()
		return true, nil
	}
	pc, err := testutil.ListenUDP(p.to.ns, wild)
	if err != nil {
		return false, err
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 512)
		for {
			n, peer, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], peer)
		}
	}()
	var c net.Conn
	err = p.from.ns.Do(func(ns.NetNS) error {
		var err error
		c, err = net.Dial("udp4", addr)
		return err
	})
	if err != nil {
		return false, err
	}
	defer c.Close()
	deadline := time.Now().Add(probeTimeout)
	buf := make([]byte, 512)
	for time.Now().Before(deadline) {
		if _, err := c.Write([]byte("probe")); err != nil {
			return false, err
		}
		c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if n, err := c.Read(buf); err == nil && string(buf[:n]) == "probe" {
			return true, nil
		}
	}
	return false, nil
}

// TestPolicyKernel applies compiled rule sets of random clusters in a real
// node namespace with pods on the bridge and checks TCP and UDP verdicts
// between them against reference.Allowed. Seeded and bounded: a few
// scenarios, a dozen probes each, run concurrently.
func TestPolicyKernel(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	node, d := policyNode(t)
	// policygen's other node addresses.
	for _, a := range []string{"172.18.0.2/32", "192.0.2.77/32"} {
		mustRun(t, node, "ip", "addr", "add", a, "dev", "lo")
	}

	var prev *compile.RuleSet
	scenarios, probes, denied := 0, 0, 0
	for seed := uint64(1); seed <= 40 && scenarios < 4; seed++ {
		r := rand.New(rand.NewPCG(seed, 0x6b65726e))
		sc, err := policygen.Generate(r, policygen.Sizes{MinNamespaces: 2, MaxNamespaces: 3, MinPods: 4, MaxPods: 7, MinPolicies: 2, MaxPolicies: 6})
		if err != nil {
			t.Fatal(err)
		}
		var local []string
		for _, ip := range slices.Sorted(maps.Keys(sc.Topology.Endpoints)) {
			if sc.Topology.Endpoints[ip].Local {
				local = append(local, ip)
			}
		}
		if len(local) < 3 {
			continue
		}
		rs, err := compile.Compile(sc.State, sc.Topology, prev)
		if err != nil {
			t.Fatal(err)
		}
		isolated := false
		for _, ep := range rs.Endpoints {
			isolated = isolated || ep.IngressIsolated || ep.EgressIsolated
		}
		if !isolated {
			continue
		}
		scenarios++
		do(t, node, func() error { return d.ApplyPolicy(prev, rs) })
		prev = rs

		// Up to four local pods as real namespaces on the bridge.
		r.Shuffle(len(local), func(i, j int) { local[i], local[j] = local[j], local[i] })
		local = local[:min(4, len(local))]
		var pods []*fakePod
		for i, ip := range local {
			p := newPod(t, node, fmt.Sprintf("vp%d-%d", seed, i), cidr(t, ip+"/24"), net.ParseIP("10.244.1.1"))
			do(t, node, func() error { return d.AddEndpoint(p.ep) })
			pods = append(pods, p)
		}

		// A dozen probes with distinct destination sockets.
		var batch []probe
		used := map[string]bool{}
		for len(batch) < 12 {
			from, to := pods[r.IntN(len(pods))], pods[r.IntN(len(pods))]
			if from == to {
				continue // a pod's own IP never leaves its namespace
			}
			pkt := policy.Packet{SrcIP: from.ep.IP.IP, DstIP: to.ep.IP.IP, Proto: []uint8{policy.ProtoTCP, policy.ProtoUDP}[r.IntN(2)]}
			pkt.DstPort = policygen.InterestingPorts[r.IntN(len(policygen.InterestingPorts))]
			if pkt.DstPort == 0 || r.IntN(3) == 0 {
				pkt.DstPort = uint16(1 + r.IntN(65535))
			}
			key := fmt.Sprint(to.ep.IP.IP, pkt.Proto, pkt.DstPort)
			if used[key] {
				continue
			}
			used[key] = true
			dec := reference.Decide(sc.State, sc.Topology, pkt)
			if sim := compile.Simulate(rs, pkt); sim != dec.Allowed {
				t.Fatalf("seed %d: %v: simulator %v, reference %v", seed, pkt, sim, dec.Allowed)
			}
			batch = append(batch, probe{from: from, to: to, proto: pkt.Proto, port: pkt.DstPort, want: dec.Allowed, why: dec.Reason})
		}
		// Pod to host: always allowed.
		host := &fakePod{ns: node, ep: &datapath.Endpoint{IP: net.IPNet{IP: net.ParseIP("10.244.1.1").To4()}}}
		batch = append(batch, probe{from: pods[0], to: host, proto: policy.ProtoTCP, port: 10250, want: true, why: "to host"})

		var wg sync.WaitGroup
		errs := make([]error, len(batch))
		for i, p := range batch {
			wg.Go(func() {
				got, err := testutil.Probe(p.want, p.run)
				switch {
				case err != nil:
					errs[i] = fmt.Errorf("%v: %w", p, err)
				case got != p.want:
					errs[i] = fmt.Errorf("%v: kernel says allowed=%v, reference %v (%s)", p, got, p.want, p.why)
				}
			})
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			out, _ := run(node, "iptables-save")
			sets, _ := run(node, "ipset", "list")
			t.Fatalf("seed %d:\n%v\niptables:\n%s\nipsets:\n%s\nscenario:\n%s", seed, err, out, sets, sc.YAML())
		}
		for _, p := range batch {
			probes++
			if !p.want {
				denied++
			}
		}
		for _, p := range pods {
			do(t, node, func() error { return d.DelEndpoint(p.ep) })
			do(t, node, withLinkDel(p.ep.HostVeth))
		}
	}
	if scenarios < 2 {
		t.Fatalf("only %d usable scenarios", scenarios)
	}
	if denied == 0 || denied == probes {
		t.Errorf("lopsided sample: %d of %d probes denied", denied, probes)
	}
	t.Logf("%d scenarios, %d probes, %d denied", scenarios, probes, denied)

	// Back to no policy: the generation's chains and sets go, the
	// dispatch chain stays empty.
	do(t, node, func() error { return d.ApplyPolicy(prev, &compile.RuleSet{}) })
	save := mustRun(t, node, "iptables-save", "-t", "filter")
	if strings.Contains(save, d.pol.names.chainPrefix) || strings.Contains(save, "-A "+d.pol.names.dispatch) {
		t.Errorf("policy rules left after applying an empty rule set:\n%s", save)
	}
	if out := mustRun(t, node, "ipset", "list", "-n"); strings.TrimSpace(out) != "" {
		t.Errorf("sets left after applying an empty rule set: %s", out)
	}
}

// policyState is what of the node's filter table and sets the policy
// owns, for before/after comparisons.
func policyState(t *testing.T, node ns.NetNS, d *Datapath) string {
	t.Helper()
	var keep []string
	for _, l := range strings.Split(mustRun(t, node, "iptables", "-w", "-S"), "\n") {
		if strings.Contains(l, "TERN-") {
			keep = append(keep, l)
		}
	}
	// Sets: elements in hash order, random initvals: normalise.
	var sets []string
	for _, l := range strings.Split(strings.TrimSpace(mustRun(t, node, "ipset", "save")), "\n") {
		if i := strings.Index(l, " hashsize "); strings.HasPrefix(l, "create ") && i > 0 {
			l = l[:i]
		}
		sets = append(sets, l)
	}
	slices.Sort(sets)
	return strings.Join(keep, "\n") + "\n" + strings.Join(sets, "\n")
}

// TestApplyPolicyFailureChangesNothing: a rule set that cannot be rendered,
// and an update that fails in the kernel, leave the rule set in force as
// it was; leftovers of an interrupted update are cleaned up by the next
// one; generations alternate.
func TestApplyPolicyFailureChangesNothing(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	node, d := policyNode(t)
	names := d.pol.names
	rs1 := goldenRuleSet()
	do(t, node, func() error { return d.ApplyPolicy(nil, rs1) })
	before := policyState(t, node, d)
	if !strings.Contains(before, names.chain(genA, compile.Ingress, 2)) || !strings.Contains(before, "create "+names.set(genA, 4)) {
		t.Fatalf("first update is not generation a:\n%s", before)
	}

	bad := goldenRuleSet()
	bad.Policy = append(bad.Policy, compile.PolicyEntry{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 1, LocalID: 2, RemoteClass: 5, Port: 7, PortBits: 16}, Verdict: compile.VerdictAllow})
	if err := doErr(node, func() error { return d.ApplyPolicy(rs1, bad) }); err == nil {
		t.Fatal("unrenderable rule set applied")
	}
	if after := policyState(t, node, d); after != before {
		t.Fatalf("failed update changed the node:\n%s\nbefore:\n%s", after, before)
	}

	// A leftover set of generation b (an update interrupted before its
	// swap) that a foreign rule uses: the update cannot clear it, so it
	// fails before changing anything.
	inUse := []string{"INPUT", "-m", "set", "--match-set", names.set(genB, 98), "src", "-j", "ACCEPT"}
	mustRun(t, node, "ipset", "create", names.set(genB, 98), "hash:net")
	mustRun(t, node, "iptables", append([]string{"-w", "-I"}, inUse...)...)
	t.Cleanup(func() { _, _ = run(node, "iptables", append([]string{"-w", "-D"}, inUse...)...) })
	planted := policyState(t, node, d)
	rs2 := goldenRuleSet()
	rs2.Policy = rs2.Policy[1:]
	if err := doErr(node, func() error { return d.ApplyPolicy(rs1, rs2) }); err == nil {
		t.Fatal("update succeeded although a leftover set is in use")
	}
	if after := policyState(t, node, d); after != planted {
		t.Fatalf("failed update changed the node:\n%s\nbefore:\n%s", after, planted)
	}
	mustRun(t, node, "iptables", append([]string{"-w", "-D"}, inUse...)...)

	// Unreferenced leftovers of generation b are cleared by the update.
	mustRun(t, node, "iptables", "-w", "-N", names.chain(genB, compile.Ingress, 99))
	mustRun(t, node, "iptables", "-w", "-A", names.chain(genB, compile.Ingress, 99), "-m", "set", "--match-set", names.set(genB, 98), "src", "-j", "DROP")
	mustRun(t, node, "ipset", "create", names.set(genB, 99), "hash:net")
	do(t, node, func() error { return d.ApplyPolicy(rs1, rs2) })
	after := policyState(t, node, d)
	for _, gone := range []string{names.chain(genB, compile.Ingress, 99), names.set(genB, 99), names.set(genB, 98), names.setPrefix + "a", names.chainPrefix + "a"} {
		if strings.Contains(after, gone) {
			t.Errorf("%s left after the update:\n%s", gone, after)
		}
	}
	if !strings.Contains(after, "-A "+names.dispatch+" -d 10.244.1.11/32 -j "+names.chain(genB, compile.Ingress, 2)) {
		t.Errorf("dispatch chain does not jump to generation b:\n%s", after)
	}
	// And back to a.
	do(t, node, func() error { return d.ApplyPolicy(rs2, rs1) })
	if s := policyState(t, node, d); s != before {
		t.Errorf("rule set 1 again renders differently:\n%s\nfirst time:\n%s", s, before)
	}
}
