package iptables

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/ternlabs/tern/internal/policygen"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
)

func ipnet(s string) net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return *n
}

// goldenRuleSet exercises every rendering case: an any-protocol entry, a
// port range split into prefix blocks, a single port, a whole protocol,
// an any-remote entry, a /0 ipBlock with an except and a pod inside it, a
// host address, and endpoints isolated in one, both and no direction.
func goldenRuleSet() *compile.RuleSet {
	return &compile.RuleSet{
		Endpoints: map[string]compile.EndpointPolicy{
			"10.244.1.10": {LocalID: 1, IngressIsolated: true, EgressIsolated: true},
			"10.244.1.11": {LocalID: 2, IngressIsolated: true},
			"10.244.1.9":  {LocalID: 1, IngressIsolated: true, EgressIsolated: true},
			"10.244.1.12": {LocalID: 3},
		},
		IPCache: []compile.IPCacheEntry{
			{Prefix: ipnet("0.0.0.0/0"), Class: 4},
			{Prefix: ipnet("10.0.0.0/8"), Class: 0},
			{Prefix: ipnet("10.244.1.1/32"), Class: compile.ClassHost},
			{Prefix: ipnet("10.244.1.9/32"), Class: 5},
			{Prefix: ipnet("10.244.1.10/32"), Class: 5},
			{Prefix: ipnet("10.244.1.11/32"), Class: 6},
			{Prefix: ipnet("10.244.1.12/32"), Class: 7},
			{Prefix: ipnet("128.0.0.0/1"), Class: 8},
		},
		Policy: []compile.PolicyEntry{
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 6, LocalID: 1, RemoteClass: 6, Port: 80, PortBits: 15}, Verdict: compile.VerdictAllow},
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 6, LocalID: 2, RemoteClass: compile.ClassAny, Port: 8080, PortBits: 16}, Verdict: compile.VerdictAllow},
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 17, LocalID: 1, RemoteClass: 4}, Verdict: compile.VerdictAllow},
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 132, LocalID: 2, RemoteClass: 5, Port: 1024, PortBits: 6}, Verdict: compile.VerdictAllow},
			{Key: compile.PolicyKey{Dir: compile.Egress, Proto: 0, LocalID: 1, RemoteClass: compile.ClassHost}, Verdict: compile.VerdictAllow},
			{Key: compile.PolicyKey{Dir: compile.Egress, Proto: 0, LocalID: 1, RemoteClass: 7}, Verdict: compile.VerdictAllow},
			{Key: compile.PolicyKey{Dir: compile.Egress, Proto: 17, LocalID: 1, RemoteClass: compile.ClassAny, Port: 53, PortBits: 16}, Verdict: compile.VerdictAllow},
			// Identity 3 is not isolated: its entries need no chain.
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 0, LocalID: 3, RemoteClass: compile.ClassAny}, Verdict: compile.VerdictAllow},
		},
	}
}

func TestRenderPolicyGolden(t *testing.T) {
	names := newPolicyNames("golden")
	h := networkHash("golden")
	r, err := renderPolicy(goldenRuleSet(), names, genB)
	if err != nil {
		t.Fatal(err)
	}
	wantSets := strings.ReplaceAll(`create TERN-C-H-b1 hash:net family inet maxelem 65536
add TERN-C-H-b1 10.244.1.1/32
create TERN-C-H-b4 hash:net family inet maxelem 65536
add TERN-C-H-b4 0.0.0.0/1
add TERN-C-H-b4 10.0.0.0/8 nomatch
add TERN-C-H-b4 10.244.1.1/32 nomatch
add TERN-C-H-b4 10.244.1.9/32 nomatch
add TERN-C-H-b4 10.244.1.10/32 nomatch
add TERN-C-H-b4 10.244.1.11/32 nomatch
add TERN-C-H-b4 10.244.1.12/32 nomatch
add TERN-C-H-b4 128.0.0.0/1 nomatch
create TERN-C-H-b5 hash:net family inet maxelem 65536
add TERN-C-H-b5 10.244.1.9/32
add TERN-C-H-b5 10.244.1.10/32
create TERN-C-H-b6 hash:net family inet maxelem 65536
add TERN-C-H-b6 10.244.1.11/32
create TERN-C-H-b7 hash:net family inet maxelem 65536
add TERN-C-H-b7 10.244.1.12/32
`, "H", h)
	if got := r.ipsetRestore(); got != wantSets {
		t.Errorf("ipset restore input:\n%s\nwant:\n%s", got, wantSets)
	}
	wantRules := strings.ReplaceAll(`*filter
:TERN-POL-H - [0:0]
:TERN-H-bE1 - [0:0]
:TERN-H-bI1 - [0:0]
:TERN-H-bI2 - [0:0]
-A TERN-H-bE1 -m set --match-set TERN-C-H-b1 dst -j RETURN
-A TERN-H-bE1 -m set --match-set TERN-C-H-b7 dst -j RETURN
-A TERN-H-bE1 -p udp -m udp --dport 53 -j RETURN
-A TERN-H-bE1 -j DROP
-A TERN-H-bI1 -m set --match-set TERN-C-H-b1 src -j RETURN
-A TERN-H-bI1 -p tcp -m set --match-set TERN-C-H-b6 src -m tcp --dport 80:81 -j RETURN
-A TERN-H-bI1 -p udp -m set --match-set TERN-C-H-b4 src -j RETURN
-A TERN-H-bI1 -j DROP
-A TERN-H-bI2 -m set --match-set TERN-C-H-b1 src -j RETURN
-A TERN-H-bI2 -p tcp -m tcp --dport 8080 -j RETURN
-A TERN-H-bI2 -p sctp -m set --match-set TERN-C-H-b5 src -m sctp --dport 1024:2047 -j RETURN
-A TERN-H-bI2 -j DROP
-A TERN-POL-H -s 10.244.1.9/32 -d 10.244.1.9/32 -j RETURN
-A TERN-POL-H -s 10.244.1.9/32 -j TERN-H-bE1
-A TERN-POL-H -d 10.244.1.9/32 -j TERN-H-bI1
-A TERN-POL-H -s 10.244.1.10/32 -d 10.244.1.10/32 -j RETURN
-A TERN-POL-H -s 10.244.1.10/32 -j TERN-H-bE1
-A TERN-POL-H -d 10.244.1.10/32 -j TERN-H-bI1
-A TERN-POL-H -s 10.244.1.11/32 -d 10.244.1.11/32 -j RETURN
-A TERN-POL-H -d 10.244.1.11/32 -j TERN-H-bI2
COMMIT
`, "H", h)
	if got := r.iptablesRestore(names); got != wantRules {
		t.Errorf("iptables-restore input:\n%s\nwant:\n%s", got, wantRules)
	}
	// Class 8 (128.0.0.0/1, taking the /0's other half) is in no policy
	// entry: no set. In class 4's set its half is only a nomatch entry.
	sets, err := classSets(goldenRuleSet().IPCache)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(sets[8]); got != "[128.0.0.0/1]" {
		t.Errorf("class 8 set: %s", got)
	}
}

func TestRenderPolicyErrors(t *testing.T) {
	names := newPolicyNames("x")
	for _, c := range []struct {
		name string
		rs   *compile.RuleSet
	}{
		{"any protocol with ports", &compile.RuleSet{
			Endpoints: map[string]compile.EndpointPolicy{"10.0.0.1": {LocalID: 1, IngressIsolated: true}},
			Policy:    []compile.PolicyEntry{{Key: compile.PolicyKey{Dir: compile.Ingress, LocalID: 1, RemoteClass: compile.ClassAny, Port: 80, PortBits: 16}, Verdict: compile.VerdictAllow}},
		}},
		{"ports of ICMP", &compile.RuleSet{
			Endpoints: map[string]compile.EndpointPolicy{"10.0.0.1": {LocalID: 1, IngressIsolated: true}},
			Policy:    []compile.PolicyEntry{{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 1, LocalID: 1, RemoteClass: compile.ClassAny, Port: 80, PortBits: 16}, Verdict: compile.VerdictAllow}},
		}},
		{"port bits beyond prefix", &compile.RuleSet{
			Endpoints: map[string]compile.EndpointPolicy{"10.0.0.1": {LocalID: 1, IngressIsolated: true}},
			Policy:    []compile.PolicyEntry{{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 6, LocalID: 1, RemoteClass: compile.ClassAny, Port: 81, PortBits: 15}, Verdict: compile.VerdictAllow}},
		}},
		{"entry for the world class", &compile.RuleSet{
			Endpoints: map[string]compile.EndpointPolicy{"10.0.0.1": {LocalID: 1, IngressIsolated: true}},
			Policy:    []compile.PolicyEntry{{Key: compile.PolicyKey{Dir: compile.Ingress, LocalID: 1, RemoteClass: compile.ClassWorld}, Verdict: compile.VerdictAllow}},
		}},
		{"IPv6 endpoint", &compile.RuleSet{Endpoints: map[string]compile.EndpointPolicy{"fd00::1": {LocalID: 1, IngressIsolated: true}}}},
		{"isolated without identity", &compile.RuleSet{Endpoints: map[string]compile.EndpointPolicy{"10.0.0.1": {IngressIsolated: true}}}},
		{"ipcache host bits", &compile.RuleSet{IPCache: []compile.IPCacheEntry{{Prefix: net.IPNet{IP: net.ParseIP("10.0.0.1").To4(), Mask: net.CIDRMask(8, 32)}, Class: 2}}}},
	} {
		if _, err := renderPolicy(c.rs, names, genA); err == nil {
			t.Errorf("%s: rendered without error", c.name)
		}
	}
}

// TestNameLengths: the longest names (largest identity and class numbers)
// fit the kernel's limits.
func TestNameLengths(t *testing.T) {
	n := newPolicyNames("some-network-name-that-is-long")
	for _, d := range []compile.Direction{compile.Ingress, compile.Egress} {
		if c := n.chain(genB, d, ^uint32(0)); len(c) > maxChainLen {
			t.Errorf("chain %s: %d > %d", c, len(c), maxChainLen)
		}
	}
	if s := n.set(genB, ^uint32(0)-1); len(s) > maxSetLen {
		t.Errorf("set %s: %d > %d", s, len(s), maxSetLen)
	}
	if len(n.dispatch) > maxChainLen {
		t.Errorf("dispatch %s too long", n.dispatch)
	}
	for _, name := range []string{n.chain(genA, compile.Ingress, 7), n.set(genB, 9)} {
		if n.genOf(name) == 0 {
			t.Errorf("genOf(%s) = 0", name)
		}
	}
	if g := n.genOf(n.dispatch); g != 0 {
		t.Errorf("genOf(dispatch) = %c", g)
	}
}

// hashNetTest is a model of ipset hash:net membership: the entry with the
// longest prefix containing the address decides; a nomatch entry means not
// in the set; no entry means not in the set.
func hashNetTest(entries []setEntry, a netip.Addr) bool {
	best := -1
	in := false
	for _, e := range entries {
		if e.prefix.Contains(a) && e.prefix.Bits() > best {
			best, in = e.prefix.Bits(), !e.nomatch
		}
	}
	return in
}

// lpmClass is the class of the longest ipcache prefix containing a, world
// if none.
func lpmClass(ipcache []compile.IPCacheEntry, a netip.Addr) uint32 {
	best, cls := -1, compile.ClassWorld
	for _, e := range ipcache {
		p, _ := ipcachePrefix(e)
		if p.Contains(a) && p.Bits() > best {
			best, cls = p.Bits(), e.Class
		}
	}
	return cls
}

// probeAddrs returns the addresses worth testing for an ipcache: both ends
// of every prefix and their outside neighbours, plus random ones.
func probeAddrs(r *rand.Rand, ipcache []compile.IPCacheEntry, n int) []netip.Addr {
	out := []netip.Addr{netip.MustParseAddr("0.0.0.0"), netip.MustParseAddr("255.255.255.255"), netip.MustParseAddr("127.255.255.255"), netip.MustParseAddr("128.0.0.0")}
	for _, e := range ipcache {
		p, _ := ipcachePrefix(e)
		first := p.Masked().Addr()
		v := addrU32(first)
		last := v | (uint32(1)<<(32-p.Bits()) - 1)
		if p.Bits() == 0 {
			last = ^uint32(0)
		}
		for _, x := range []uint32{v, last, v - 1, last + 1} {
			out = append(out, u32Addr(x))
		}
	}
	for range n {
		out = append(out, u32Addr(r.Uint32()))
	}
	return out
}

func addrU32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func u32Addr(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// TestClassSetsLPM checks, on random rule sets from policygen, that
// hash:net membership (modelled in Go) of every class's set equals
// longest-prefix match on the ipcache, for edge and random addresses.
func TestClassSetsLPM(t *testing.T) {
	checked := 0
	for seed := uint64(1); seed <= 300; seed++ {
		r := rand.New(rand.NewPCG(seed, 0x1b5e7))
		sc, err := policygen.Generate(r, policygen.DefaultSizes)
		if err != nil {
			t.Fatal(err)
		}
		rs, err := compile.Compile(sc.State, sc.Topology, nil)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		sets, err := classSets(rs.IPCache)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		for cls, entries := range sets {
			for _, e := range entries {
				if e.prefix.Bits() == 0 {
					t.Fatalf("seed %d: class %d set holds /0, which hash:net refuses", seed, cls)
				}
			}
		}
		for _, a := range probeAddrs(r, rs.IPCache, 100) {
			want := lpmClass(rs.IPCache, a)
			matched := 0
			for cls, entries := range sets {
				if cls == compile.ClassWorld {
					continue // "no entry" is the world too: never a set (renderPolicy refuses it)
				}
				in := hashNetTest(entries, a)
				if in != (cls == want) {
					t.Fatalf("seed %d: %s: in set of class %d = %v, but LPM class is %d\nset: %v\nipcache: %v", seed, a, cls, in, want, entries, rs.IPCache)
				}
				if in {
					matched++
				}
			}
			if matched > 1 {
				t.Fatalf("seed %d: %s in %d sets", seed, a, matched)
			}
			checked++
		}
	}
	t.Logf("%d address lookups checked", checked)
	if checked == 0 {
		t.Error("no address lookup checked")
	}
}

// evalRendered decides a packet the way the kernel runs the rendered
// rules: the dispatch chain's jumps in order, each chain's rules in order
// until RETURN or DROP, set matches by the hash:net model. It parses the
// rendered arguments, so it also checks their spelling.
func evalRendered(t *testing.T, r *policyRules, sets map[string][]setEntry, pkt policy.Packet) bool {
	t.Helper()
	src, _ := policy.Addr(pkt.SrcIP)
	dst, _ := policy.Addr(pkt.DstIP)
	chains := map[string][][]string{}
	for _, c := range r.chains {
		chains[c.name] = c.rules
	}
	for _, rule := range r.dispatch {
		// "-s X -d X -j RETURN": the pod reaching itself leaves the
		// dispatch chain, and the forward chain accepts it.
		if len(rule) == 6 && rule[0] == "-s" && rule[2] == "-d" && rule[4] == "-j" && rule[5] == "RETURN" {
			if rule[1] != rule[3] {
				t.Fatalf("dispatch rule %q", rule)
			}
			if netip.MustParsePrefix(rule[1]).Contains(src) && netip.MustParsePrefix(rule[3]).Contains(dst) {
				return true
			}
			continue
		}
		if len(rule) != 4 || rule[2] != "-j" {
			t.Fatalf("dispatch rule %q", rule)
		}
		p := netip.MustParsePrefix(rule[1])
		switch rule[0] {
		case "-s":
			if !p.Contains(src) {
				continue
			}
		case "-d":
			if !p.Contains(dst) {
				continue
			}
		default:
			t.Fatalf("dispatch rule %q", rule)
		}
		body, ok := chains[rule[3]]
		if !ok {
			t.Fatalf("jump to missing chain %s", rule[3])
		}
		if !runChain(t, body, sets, pkt, src, dst) {
			return false
		}
	}
	return true
}

// runChain reports whether the chain returns (true) or drops (false).
func runChain(t *testing.T, rules [][]string, sets map[string][]setEntry, pkt policy.Packet, src, dst netip.Addr) bool {
	t.Helper()
	for _, rule := range rules {
		match := true
		var target string
		for i := 0; i < len(rule); i++ {
			switch rule[i] {
			case "-p":
				want := map[string]uint8{"tcp": 6, "udp": 17, "sctp": 132}[rule[i+1]]
				if want == 0 {
					n, err := strconv.Atoi(rule[i+1])
					if err != nil {
						t.Fatalf("rule %q: protocol", rule)
					}
					want = uint8(n)
				}
				match = match && pkt.Proto == want
				i++
			case "-m":
				switch rule[i+1] {
				case "set":
					if rule[i+2] != "--match-set" {
						t.Fatalf("rule %q", rule)
					}
					entries, ok := sets[rule[i+3]]
					if !ok {
						t.Fatalf("rule %q: set %s not created", rule, rule[i+3])
					}
					a := src
					if rule[i+4] == "dst" {
						a = dst
					} else if rule[i+4] != "src" {
						t.Fatalf("rule %q", rule)
					}
					match = match && hashNetTest(entries, a)
					i += 4
				case "tcp", "udp", "sctp":
					if rule[i+2] != "--dport" {
						t.Fatalf("rule %q", rule)
					}
					lo, hi, _ := strings.Cut(rule[i+3], ":")
					if hi == "" {
						hi = lo
					}
					l, err1 := strconv.Atoi(lo)
					h, err2 := strconv.Atoi(hi)
					if err1 != nil || err2 != nil || l > h {
						t.Fatalf("rule %q: ports", rule)
					}
					match = match && int(pkt.DstPort) >= l && int(pkt.DstPort) <= h
					i += 3
				default:
					t.Fatalf("rule %q: match %s", rule, rule[i+1])
				}
			case "-j":
				target = rule[i+1]
				i++
			default:
				t.Fatalf("rule %q: %s", rule, rule[i])
			}
		}
		if !match {
			continue
		}
		switch target {
		case "RETURN":
			return true
		case "DROP":
			return false
		default:
			t.Fatalf("rule %q: target %s", rule, target)
		}
	}
	t.Fatalf("chain fell off its end: %q", rules)
	return false
}

// TestRenderedMatchesSimulator renders random compiled rule sets and runs
// the rendered rules in a Go model of iptables and hash:net: every packet
// gets the verdict of compile.Simulate (the eBPF datapath's specification)
// and of the reference evaluator.
func TestRenderedMatchesSimulator(t *testing.T) {
	names := newPolicyNames("model")
	packets, allowed := 0, 0
	var prev *compile.RuleSet
	for seed := uint64(1); seed <= 200; seed++ {
		r := rand.New(rand.NewPCG(seed, 0xface))
		sc, err := policygen.Generate(r, policygen.DefaultSizes)
		if err != nil {
			t.Fatal(err)
		}
		rs, err := compile.Compile(sc.State, sc.Topology, prev)
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		prev = rs
		gen := []byte{genA, genB}[seed%2]
		rendered, err := renderPolicy(rs, names, gen)
		if err != nil {
			t.Fatalf("seed %d: render: %v", seed, err)
		}
		sets := map[string][]setEntry{}
		all, _ := classSets(rs.IPCache)
		for _, s := range rendered.sets {
			if !slices.Equal(s.entries, all[classOfSet(t, names, s.name)]) {
				t.Fatalf("seed %d: set %s entries differ from classSets", seed, s.name)
			}
			sets[s.name] = s.entries
		}
		sim, err := compile.NewSimulator(rs)
		if err != nil {
			t.Fatal(err)
		}
		for _, pkt := range policygen.Packets(r, sc, 200) {
			want := sim.Allowed(pkt)
			if got := evalRendered(t, rendered, sets, pkt); got != want {
				t.Fatalf("seed %d: %v: rendered rules say %v, simulator %v\n%s%s\nscenario:\n%s",
					seed, pkt, got, want, rendered.ipsetRestore(), rendered.iptablesRestore(names), sc.YAML())
			}
			packets++
			if want {
				allowed++
			}
		}
	}
	t.Logf("%d packets, %d allowed", packets, allowed)
	// Both verdicts must be exercised, or agreement proves little.
	if packets == 0 || allowed < packets/20 || allowed > packets*19/20 {
		t.Errorf("lopsided sample: %d of %d packets allowed", allowed, packets)
	}
}

func classOfSet(t *testing.T, names policyNames, set string) uint32 {
	t.Helper()
	n, err := strconv.ParseUint(set[len(names.setPrefix)+1:], 10, 32)
	if err != nil {
		t.Fatalf("set name %s: %v", set, err)
	}
	return uint32(n)
}
