package bench

import (
	"bytes"
	"net"
	"reflect"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/reference"
)

// The benchmark flow as the harness makes it: the client pod to the server
// pod, TCP, to ports handed out from firstPort up.
var (
	sweepClientIP = net.IPv4(10, 244, 1, 2).To4()
	sweepServerIP = net.IPv4(10, 244, 1, 3).To4()
	sweepHostIP   = net.IPv4(10, 244, 1, 1).To4() // the pods' gateway on the node
)

// sweepState decodes the manifests the harness writes for n rules (pods,
// then policies), exactly as ternctl apply reads them.
func sweepState(t *testing.T, n int, withAllow bool) *manifest.State {
	t.Helper()
	pods, err := manifestJSON(SweepPods())
	if err != nil {
		t.Fatal(err)
	}
	pols := SweepPolicies(n)
	if !withAllow {
		pols = pols[:len(pols)-1]
	}
	polJSON, err := manifestJSON(pols)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := manifest.Decode(bytes.NewReader(append(pods, polJSON...)))
	if err != nil {
		t.Fatalf("the generated manifests do not decode: %v", err)
	}
	st, err := manifest.NewState().Apply(objs)
	if err != nil {
		t.Fatalf("the generated manifests do not apply: %v", err)
	}
	return st
}

// sweepTopology is the node as the policy store sees it: the client and
// server pods local, the peers on another node, the gateway a host address.
func sweepTopology(st *manifest.State) *policy.Topology {
	topo := policy.TopologyFromState(st, "", nil)
	for ip, ep := range topo.Endpoints {
		ep.Local = false
		topo.Endpoints[ip] = ep
	}
	topo.Endpoints[sweepClientIP.String()] = policy.Endpoint{Namespace: sweepNamespace, Name: "client", Local: true}
	topo.Endpoints[sweepServerIP.String()] = policy.Endpoint{Namespace: sweepNamespace, Name: "server", Local: true}
	topo.Hosts = []net.IP{sweepHostIP}
	return topo
}

func flow(port int) policy.Packet {
	return policy.Packet{SrcIP: sweepClientIP, DstIP: sweepServerIP, Proto: policy.ProtoTCP, DstPort: uint16(port)}
}

// Ports the benchmark uses (the first and far beyond what a run needs) and
// the ends of the allowed range.
var benchPorts = []int{firstPort + 1, firstPort + 500, firstPort + 5000, sweepAllowLo, sweepAllowHi}

func TestSweepPoliciesCounts(t *testing.T) {
	for _, n := range []int{0, 1, 99, 100, 101, 1000, 10000} {
		pols := SweepPolicies(n)
		rules := 0
		names := map[string]bool{}
		for _, p := range pols {
			if names[p.Name] {
				t.Errorf("n=%d: policy %s twice", n, p.Name)
			}
			names[p.Name] = true
			if len(p.Spec.Ingress) > sweepRulesPerPolicy {
				t.Errorf("n=%d: %s has %d rules", n, p.Name, len(p.Spec.Ingress))
			}
			if p.Spec.PodSelector.MatchLabels[sweepLabel] != sweepServerLabel || len(p.Spec.Egress) != 0 {
				t.Errorf("n=%d: %s does not select the server pod for ingress only", n, p.Name)
			}
			rules += len(p.Spec.Ingress)
		}
		if rules != n+1 {
			t.Errorf("n=%d: %d rules, want %d (n and the allowing rule)", n, rules, n+1)
		}
		if want := (n+sweepRulesPerPolicy-1)/sweepRulesPerPolicy + 1; len(pols) != want {
			t.Errorf("n=%d: %d policies, want %d", n, len(pols), want)
		}
		last := pols[len(pols)-1]
		if last.Name != sweepAllowPolicy || len(last.Spec.Ingress) != 1 {
			t.Errorf("n=%d: the last policy is %s with %d rules, want the allowing policy", n, last.Name, len(last.Spec.Ingress))
		}
	}
}

func TestSweepPoliciesDeterministic(t *testing.T) {
	a, b := SweepPolicies(1000), SweepPolicies(1000)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("two generations of 1,000 rules differ")
	}
	ja, _ := manifestJSON(a)
	jb, _ := manifestJSON(SweepPolicies(1000))
	if !bytes.Equal(ja, jb) {
		t.Fatal("the manifests of two generations differ")
	}
	// A larger set extends a smaller one: rule j is the same whatever n.
	small, large := SweepPolicies(150), SweepPolicies(10000)
	for i := 0; i < 2; i++ {
		n := len(small[i].Spec.Ingress)
		if !reflect.DeepEqual(small[i].Spec.Ingress[:n], large[i].Spec.Ingress[:n]) {
			t.Errorf("policy %d: the first rules differ between n=150 and n=10000", i)
		}
	}
	// Every kind of rule is there.
	kinds := map[string]int{}
	for _, p := range large[:len(large)-1] {
		for _, r := range p.Spec.Ingress {
			switch f := r.From[0]; {
			case f.IPBlock != nil:
				kinds["ipBlock"]++
			case f.NamespaceSelector != nil:
				kinds["other peer"]++
			default:
				kinds["other port"]++
			}
		}
	}
	for _, k := range sweepRuleKind {
		if kinds[k] < 3333 {
			t.Errorf("%d rules of kind %q in 10,000", kinds[k], k)
		}
	}
}

func TestSweepAllowingRuleAllowsTheBenchmarkFlow(t *testing.T) {
	for _, n := range PolicyRuleCounts {
		st := sweepState(t, n, true)
		topo := sweepTopology(st)
		for _, port := range benchPorts {
			if d := reference.Decide(st, topo, flow(port)); !d.Allowed {
				t.Errorf("n=%d: the benchmark flow to port %d is denied: %s", n, port, d.Reason)
			}
		}
		// The server is isolated: the probe port is denied.
		if d := reference.Decide(st, topo, flow(sweepDeniedPort)); d.Allowed {
			t.Errorf("n=%d: the probe to port %d is allowed: %s", n, sweepDeniedPort, d.Reason)
		}
	}
}

func TestSweepNonMatchingRulesDoNotMatch(t *testing.T) {
	for _, n := range PolicyRuleCounts {
		if n == 0 {
			continue
		}
		// Without the allowing policy, nothing may let the benchmark flow
		// (or the probe) through: not one of the n rules matches it.
		st := sweepState(t, n, false)
		topo := sweepTopology(st)
		for _, port := range append(benchPorts, sweepDeniedPort) {
			if d := reference.Decide(st, topo, flow(port)); d.Allowed {
				t.Errorf("n=%d: a non-matching rule lets the benchmark flow to port %d through: %s", n, port, d.Reason)
			}
		}
	}
	// Rule by rule, for every rule of the first policies: the rule alone
	// (with its peer present) does not match the flow, and does match
	// traffic of its own (so it is a real rule, not an empty one).
	st := sweepState(t, 0, false)
	topo := sweepTopology(st)
	for j := 0; j < 3*sweepPeers*2; j++ {
		r := sweepRule(j)
		one, err := st.Apply([]manifest.Object{sweepPolicy("one", []networkingv1.NetworkPolicyIngressRule{r})})
		if err != nil {
			t.Fatal(err)
		}
		for _, port := range benchPorts {
			if reference.Allowed(one, topo, flow(port)) {
				t.Fatalf("rule %d (%s) matches the benchmark flow to port %d", j, sweepRuleKind[j%3], port)
			}
		}
		own := policy.Packet{DstIP: sweepServerIP, Proto: policy.ProtoTCP, DstPort: uint16(r.Ports[0].Port.IntValue())}
		switch j % 3 {
		case 0:
			own.SrcIP = sweepClientIP
		case 1:
			own.SrcIP = sweepPeerIP((j / 3) % sweepPeers)
		default:
			own.SrcIP = net.IPv4(198, 18, byte((j/3)%sweepBlocks), 7).To4()
		}
		if !reference.Allowed(one, topo, own) {
			t.Fatalf("rule %d (%s) does not even match its own traffic %s", j, sweepRuleKind[j%3], own)
		}
	}
}

// Each rule compiles to exactly one policy entry of the server (none is
// covered by another or by the allowing rule), so the figures are per
// rule.
func TestSweepRulesCompileOneEntryEach(t *testing.T) {
	for _, n := range PolicyRuleCounts {
		st := sweepState(t, n, true)
		rs, err := compile.Compile(st, sweepTopology(st), nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(rs.Policy); got != n+1 {
			t.Errorf("n=%d: %d policy entries, want %d", n, got, n+1)
		}
		server := rs.Endpoints[sweepServerIP.String()]
		if !server.IngressIsolated || server.EgressIsolated {
			t.Errorf("n=%d: server %+v, want isolated for ingress only", n, server)
		}
		if rs.Endpoints[sweepClientIP.String()].IngressIsolated || rs.Endpoints[sweepClientIP.String()].EgressIsolated {
			t.Errorf("n=%d: the client is isolated", n)
		}
		// The allowing entry comes last in key order: iptables tests a new
		// flow against every other entry first.
		if last := rs.Policy[len(rs.Policy)-1].Key; last.RemoteClass != compile.ClassAny || last.Proto != policy.ProtoTCP || last.Port != sweepAllowLo {
			t.Errorf("n=%d: last entry %v is not the allowing rule", n, last)
		}
	}
}

func TestSweepPorts(t *testing.T) {
	seen := map[int]bool{}
	for i := 0; i < 20000; i++ {
		p := sweepPort(i)
		if seen[p] {
			t.Fatalf("port %d twice", p)
		}
		seen[p] = true
		if p == sweepDeniedPort || (p >= sweepAllowLo && p <= sweepAllowHi) || p < 1024 || p > 65535 {
			t.Fatalf("sweepPort(%d) = %d", i, p)
		}
	}
	if firstPort < sweepAllowLo || firstPort+5000 > sweepAllowHi {
		t.Fatalf("the benchmark's ports %d… are not inside the allowed range %d–%d", firstPort, sweepAllowLo, sweepAllowHi)
	}
}
