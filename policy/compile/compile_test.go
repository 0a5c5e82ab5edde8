package compile_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/reference"
)

func mustState(t testing.TB, yaml string) *manifest.State {
	t.Helper()
	objs, err := manifest.Decode(strings.NewReader(yaml))
	if err != nil {
		t.Fatal(err)
	}
	st, err := manifest.NewState().Apply(objs)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func entry(prefix string, class uint32) compile.IPCacheEntry {
	_, n, err := net.ParseCIDR(prefix)
	if err != nil {
		panic(err)
	}
	return compile.IPCacheEntry{Prefix: *n, Class: class}
}

const webPod = `
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: web, labels: {app: web}}
spec:
  containers:
  - name: main
    ports: [{name: http, containerPort: 8080}]
`

// TestCompileExample pins the whole output for a small input, as a worked
// example of the tables.
func TestCompileExample(t *testing.T) {
	st := mustState(t, webPod+`
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: allow-web}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.8/29]}
    ports:
    - {port: 80, endPort: 81}
    - {port: http}
    - {protocol: UDP}
`)
	topo := &policy.Topology{
		Endpoints: map[string]policy.Endpoint{"10.244.1.10": {Namespace: "prod", Name: "web", Local: true}},
		Hosts:     []net.IP{net.ParseIP("10.244.1.1")},
	}
	rs, err := compile.Compile(st, topo, nil)
	if err != nil {
		t.Fatal(err)
	}
	const L, blockClass, podClass = 1, 2, 3
	want := &compile.RuleSet{
		Endpoints: map[string]compile.EndpointPolicy{"10.244.1.10": {LocalID: L, IngressIsolated: true}},
		IPCache: []compile.IPCacheEntry{
			entry("10.244.1.1/32", compile.ClassHost),
			entry("10.244.1.10/32", podClass),
			entry("192.0.2.0/24", blockClass),
			entry("192.0.2.8/29", compile.ClassWorld), // the except: back to the world
		},
		Policy: []compile.PolicyEntry{
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 6, LocalID: L, RemoteClass: blockClass, Port: 80, PortBits: 15}, Verdict: compile.VerdictAllow},   // 80-81
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 6, LocalID: L, RemoteClass: blockClass, Port: 8080, PortBits: 16}, Verdict: compile.VerdictAllow}, // http on web
			{Key: compile.PolicyKey{Dir: compile.Ingress, Proto: 17, LocalID: L, RemoteClass: blockClass}, Verdict: compile.VerdictAllow},                          // every UDP port
		},
		Identities: []compile.Identity{{ID: L, Namespace: "prod", Labels: map[string]string{"app": "web"}, NamedPorts: []compile.NamedPort{{Name: "http", Protocol: "TCP", Port: 8080}}}},
		Classes: []compile.Class{
			{ID: blockClass, Blocks: []string{"192.0.2.0/24 except 192.0.2.8/29"}},
			{ID: podClass, Identity: L},
		},
	}
	if !reflect.DeepEqual(rs, want) {
		got, _ := json.MarshalIndent(rs, "", " ")
		exp, _ := json.MarshalIndent(want, "", " ")
		t.Fatalf("got\n%s\nwant\n%s", got, exp)
	}
}

// TestHostInsideBlock: a host address inside an ipBlock gets a class of its
// own that carries the block (as every address inside one does), plus
// explicit allow entries in both directions, so that it is as allowed as a
// class-1 host: traffic between a pod and its node always passes.
func TestHostInsideBlock(t *testing.T) {
	st := mustState(t, webPod+`
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: p}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  egress: [{to: [{ipBlock: {cidr: 172.18.0.0/16}}]}]
`)
	topo := &policy.Topology{
		Endpoints: map[string]policy.Endpoint{"10.244.1.10": {Namespace: "prod", Name: "web", Local: true}},
		Hosts:     []net.IP{net.ParseIP("172.18.0.2"), net.ParseIP("10.244.1.1")},
	}
	rs, err := compile.Compile(st, topo, nil)
	if err != nil {
		t.Fatal(err)
	}
	var hostClass uint32
	for _, c := range rs.Classes {
		if c.Host {
			hostClass = c.ID
		}
	}
	if hostClass < 2 {
		t.Fatalf("no host class with blocks: %+v", rs.Classes)
	}
	wantKey := compile.PolicyKey{Dir: compile.Ingress, Proto: compile.ProtoAny, LocalID: 1, RemoteClass: hostClass}
	if !slices.ContainsFunc(rs.Policy, func(e compile.PolicyEntry) bool { return e.Key == wantKey }) {
		t.Errorf("no ingress allow entry for the host class: %+v", rs.Policy)
	}
	for _, r := range []uint32{hostClass, compile.ClassHost} {
		wantKey := compile.PolicyKey{Dir: compile.Egress, Proto: compile.ProtoAny, LocalID: 1, RemoteClass: r}
		if !slices.ContainsFunc(rs.Policy, func(e compile.PolicyEntry) bool { return e.Key == wantKey }) {
			t.Errorf("no egress allow entry for host class %d: %+v", r, rs.Policy)
		}
	}
	pkt := func(src, dst string) policy.Packet {
		return policy.Packet{SrcIP: net.ParseIP(src), DstIP: net.ParseIP(dst), Proto: 6, DstPort: 10250}
	}
	for _, c := range []struct {
		p    policy.Packet
		want bool
	}{
		{pkt("172.18.0.2", "10.244.1.10"), true},  // host (in a block) to pod
		{pkt("10.244.1.1", "10.244.1.10"), true},  // host (class 1) to pod
		{pkt("172.18.0.9", "10.244.1.10"), false}, // not a host, ingress closed
		{pkt("10.244.1.10", "172.18.0.2"), true},  // egress to the host, by ipBlock
		{pkt("10.244.1.10", "10.244.1.1"), true},  // egress to the other host: always allowed
		{pkt("10.244.1.10", "172.18.0.9"), true},  // egress by ipBlock
		{pkt("10.244.1.10", "192.0.2.1"), false},  // egress: no rule
	} {
		if got := compile.Simulate(rs, c.p); got != c.want {
			t.Errorf("%v: got %v, want %v", c.p, got, c.want)
		}
		if got := reference.Allowed(st, topo, c.p); got != c.want {
			t.Errorf("reference %v: got %v, want %v", c.p, got, c.want)
		}
	}
}

// TestLayouts pins the binary encodings the eBPF maps use.
func TestLayouts(t *testing.T) {
	ne := binary.NativeEndian
	k := compile.PolicyKey{Dir: compile.Egress, Proto: 17, LocalID: 0x01020304, RemoteClass: 0xA0B0C0D0, Port: 0x1234 & 0xFFF0, PortBits: 12}
	b, _ := k.MarshalBinary()
	want := ne.AppendUint32(nil, 92)
	want = append(want, 1, 17)
	want = ne.AppendUint32(want, 0x01020304)
	want = ne.AppendUint32(want, 0xA0B0C0D0)
	want = append(want, 0x12, 0x30) // port, network order
	if !bytes.Equal(b, want) || len(b) != compile.PolicyKeySize {
		t.Errorf("policy key = %x, want %x", b, want)
	}
	var back compile.PolicyKey
	if err := back.UnmarshalBinary(b); err != nil || back != k {
		t.Errorf("policy key round trip: %+v, %v", back, err)
	}
	if v, _ := (compile.PolicyValue{Verdict: compile.VerdictAllow}).MarshalBinary(); !bytes.Equal(v, []byte{1, 0, 0, 0}) {
		t.Errorf("policy value = %x", v)
	}

	e := entry("192.0.2.0/24", 7)
	ib, _ := e.Key().MarshalBinary()
	if want := append(ne.AppendUint32(nil, 24), 192, 0, 2, 0); !bytes.Equal(ib, want) {
		t.Errorf("ipcache key = %x, want %x", ib, want)
	}
	if v, _ := (compile.IPCacheValue{Class: 7}).MarshalBinary(); !bytes.Equal(v, ne.AppendUint32(nil, 7)) {
		t.Errorf("ipcache value = %x", v)
	}

	ek, _ := compile.EndpointKeyOf("10.244.1.5")
	if b, _ := ek.MarshalBinary(); !bytes.Equal(b, []byte{10, 244, 1, 5}) {
		t.Errorf("endpoint key = %x", b)
	}
	ev, _ := compile.EndpointPolicy{LocalID: 9, EgressIsolated: true}.MarshalBinary()
	if want := ne.AppendUint32(ne.AppendUint32(nil, 9), compile.EndpointEgressBit); !bytes.Equal(ev, want) {
		t.Errorf("endpoint value = %x, want %x", ev, want)
	}
}

// bigState makes one pod and n policies that select it, each with distinct
// ipBlocks, port ranges and selectors.
func bigState(t testing.TB, n int) (*manifest.State, *policy.Topology) {
	var b strings.Builder
	b.WriteString(webPod)
	b.WriteString("---\napiVersion: v1\nkind: Pod\nmetadata: {namespace: prod, name: client, labels: {app: client}}\nspec: {containers: [{name: c}]}\n")
	// client may send anywhere: its egress is allowed by the last of the
	// four lookups, so a packet from it denied at ingress takes all 12.
	b.WriteString("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: prod, name: open}\nspec: {podSelector: {matchLabels: {app: client}}, egress: [{}]}\n")
	for i := range n {
		fmt.Fprintf(&b, `---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: p%d}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 10.%d.%d.0/24, except: [10.%d.%d.128/25]}}, {podSelector: {matchLabels: {app: x%d}}}]
    ports: [{port: %d, endPort: %d}, {protocol: UDP, port: %d}]
  egress:
  - to: [{ipBlock: {cidr: 172.16.%d.%d/32}}]
    ports: [{protocol: SCTP, port: %d}]
`, i, 1+i/256, i%256, 1+i/256, i%256, i, 1000+i, 1000+i+i%37, 2000+i, i/256, i%256, 3000+i)
	}
	topo := &policy.Topology{
		Endpoints: map[string]policy.Endpoint{
			"10.244.1.10": {Namespace: "prod", Name: "web", Local: true},
			"10.244.1.11": {Namespace: "prod", Name: "client", Local: true},
		},
		Hosts: []net.IP{net.ParseIP("10.244.1.1")},
	}
	return mustState(t, b.String()), topo
}

// TestLookupsIndependentOfRules: the per-packet work of the datapath is a
// fixed number of map lookups (at most 12) whatever the number of rules,
// and the LPM emulation's probes are bounded by the key widths.
func TestLookupsIndependentOfRules(t *testing.T) {
	pkts := []policy.Packet{
		{SrcIP: net.ParseIP("10.244.1.11"), DstIP: net.ParseIP("10.244.1.10"), Proto: 6, DstPort: 1},     // egress allowed by the 4th lookup, ingress denied: every lookup
		{SrcIP: net.ParseIP("10.3.4.5"), DstIP: net.ParseIP("10.244.1.10"), Proto: 17, DstPort: 2003},    // ingress allowed
		{SrcIP: net.ParseIP("10.244.1.10"), DstIP: net.ParseIP("172.16.0.3"), Proto: 132, DstPort: 3003}, // egress allowed
		{SrcIP: net.ParseIP("10.244.1.1"), DstIP: net.ParseIP("10.244.1.10"), Proto: 6, DstPort: 22},     // host
	}
	worst := map[int]compile.Stats{}
	for _, n := range []int{1, 10, 1000} {
		st, topo := bigState(t, n)
		rs, err := compile.Compile(st, topo, nil)
		if err != nil {
			t.Fatal(err)
		}
		sim, err := compile.NewSimulator(rs)
		if err != nil {
			t.Fatal(err)
		}
		var w compile.Stats
		for _, p := range pkts {
			ok, s := sim.Decide(p)
			if ok != reference.Allowed(st, topo, p) {
				t.Fatalf("n=%d %v: simulate %v disagrees with reference", n, p, ok)
			}
			w.Lookups = max(w.Lookups, s.Lookups)
			w.Probes = max(w.Probes, s.Probes)
		}
		worst[n] = w
		t.Logf("%d policies: %d policy entries, %d ipcache entries, worst packet %d lookups, %d LPM probes",
			n, len(rs.Policy), len(rs.IPCache), w.Lookups, w.Probes)
	}
	for n, w := range worst {
		if w.Lookups != 12 {
			t.Errorf("n=%d: worst case %d lookups, want exactly 12", n, w.Lookups)
		}
		// 2 ipcache lookups over <= 33 prefix lengths, 8 policy lookups
		// over <= 17.
		if w.Probes > 2*33+8*17 {
			t.Errorf("n=%d: %d probes", n, w.Probes)
		}
	}
}

// TestStableNumbers: compiling with the installed rule set keeps the
// numbers of what did not change and never reuses a number that is going
// away, so Diff is small and safe to apply.
func TestStableNumbers(t *testing.T) {
	base := webPod + `
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: db, labels: {app: db}}
spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: p}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}, {ipBlock: {cidr: 192.0.2.0/24}}]}]
`
	topo := &policy.Topology{Endpoints: map[string]policy.Endpoint{
		"10.244.1.10": {Namespace: "prod", Name: "web", Local: true},
		"10.244.1.11": {Namespace: "prod", Name: "db", Local: true},
	}}
	old, err := compile.Compile(mustState(t, base), topo, nil)
	if err != nil {
		t.Fatal(err)
	}
	// A new pod whose identity sorts before every existing one, and web
	// relabelled (a new identity; its old number must not be reused).
	changed := strings.Replace(base, "labels: {app: web}}", "labels: {app: web, v: '2'}}", 1) + `
---
apiVersion: v1
kind: Pod
metadata: {namespace: aaa, name: first, labels: {app: a}}
spec: {containers: [{name: c}]}
`
	topo.Endpoints["10.244.1.5"] = policy.Endpoint{Namespace: "aaa", Name: "first", Local: true}
	st := mustState(t, changed)
	cur, err := compile.Compile(st, topo, old)
	if err != nil {
		t.Fatal(err)
	}
	if old.Endpoints["10.244.1.11"] != cur.Endpoints["10.244.1.11"] {
		t.Errorf("db's endpoint entry changed: %+v -> %+v", old.Endpoints["10.244.1.11"], cur.Endpoints["10.244.1.11"])
	}
	oldWeb, newWeb := old.Endpoints["10.244.1.10"].LocalID, cur.Endpoints["10.244.1.10"].LocalID
	if oldWeb == newWeb {
		t.Errorf("relabelled web kept identity %d", oldWeb)
	}
	oldIDs := map[uint32]bool{}
	for _, id := range old.Identities {
		oldIDs[id.ID] = true
	}
	if oldIDs[cur.Endpoints["10.244.1.5"].LocalID] || oldIDs[newWeb] {
		t.Errorf("a new identity took a number the installed rule set uses: %+v", cur.Identities)
	}
	oldCls := map[uint32]compile.Class{}
	for _, c := range old.Classes {
		oldCls[c.ID] = c
	}
	for _, c := range cur.Classes {
		if o, ok := oldCls[c.ID]; ok && !reflect.DeepEqual(o.Blocks, c.Blocks) {
			t.Errorf("class %d changed meaning: %+v -> %+v", c.ID, o, c)
		}
	}
	d := compile.Diff(old, cur)
	// The block's entry and db's ingress entry from the block stay.
	for _, e := range d.IPCacheUpserts {
		if e.Prefix.String() == "192.0.2.0/24" {
			t.Errorf("unchanged block entry rewritten: %+v", e)
		}
	}
	if len(d.PolicyAdds) != 1 || len(d.PolicyDeletes) != 1 {
		t.Errorf("want one policy entry replaced (web's class), got +%v -%v", d.PolicyAdds, d.PolicyDeletes)
	}
	if got := d.Apply(old); !sameTables(got, cur) {
		t.Errorf("Diff applied to old is not new")
	}
	if !compile.Diff(cur, cur).Empty() {
		t.Errorf("Diff of a rule set with itself is not empty")
	}
	// Every intermediate state of the documented order decides as either
	// old or new for each packet: here, simply check the final one.
	sim, _ := compile.NewSimulator(d.Apply(old))
	p := policy.Packet{SrcIP: net.ParseIP("10.244.1.10"), DstIP: net.ParseIP("10.244.1.11"), Proto: 6, DstPort: 5432}
	if sim.Allowed(p) != reference.Allowed(st, topo, p) {
		t.Errorf("applied delta decides %v differently from the reference", p)
	}
}

func TestRuleSetJSON(t *testing.T) {
	st, topo := bigState(t, 5)
	rs, err := compile.Compile(st, topo, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(rs)
	if err != nil {
		t.Fatal(err)
	}
	var back compile.RuleSet
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(rs, &back) {
		t.Errorf("round trip differs:\n%s", b)
	}
	if !strings.Contains(string(b), `"prefix":"10.1.0.0/24"`) {
		t.Errorf("ipcache prefixes not written as CIDR strings: %s", b)
	}
	// Compiling twice gives the same bytes.
	rs2, _ := compile.Compile(st, topo, nil)
	b2, _ := json.Marshal(rs2)
	if !bytes.Equal(b, b2) {
		t.Errorf("compile is not deterministic")
	}
}

func TestSimulatorRejects(t *testing.T) {
	ok := entry("10.0.0.0/8", 2)
	bad := []*compile.RuleSet{
		{Endpoints: map[string]compile.EndpointPolicy{"10.0.0.1": {LocalID: 0}}},
		{Endpoints: map[string]compile.EndpointPolicy{"fe80::1": {LocalID: 1}}},
		{IPCache: []compile.IPCacheEntry{{Prefix: net.IPNet{IP: net.ParseIP("10.0.0.1").To4(), Mask: net.CIDRMask(8, 32)}, Class: 2}}},
		{IPCache: []compile.IPCacheEntry{ok, {Prefix: ok.Prefix, Class: compile.ClassAny}}},
		{Policy: []compile.PolicyEntry{{Key: compile.PolicyKey{Dir: 2, LocalID: 1}}}},
		{Policy: []compile.PolicyEntry{{Key: compile.PolicyKey{Proto: 6, LocalID: 1, Port: 81, PortBits: 15}}}},
		{Policy: []compile.PolicyEntry{{Key: compile.PolicyKey{Proto: 0, LocalID: 1, Port: 80, PortBits: 16}}}},
		{Policy: []compile.PolicyEntry{{Key: compile.PolicyKey{Proto: 6, LocalID: 1, PortBits: 17}}}},
	}
	for i, rs := range bad {
		if _, err := compile.NewSimulator(rs); err == nil {
			t.Errorf("rule set %d accepted", i)
		}
	}
}

func TestCompileRejectsBadTopology(t *testing.T) {
	for _, topo := range []*policy.Topology{
		{Endpoints: map[string]policy.Endpoint{"10.0.0.01": {Namespace: "a", Name: "b"}}},
		{Endpoints: map[string]policy.Endpoint{"10.0.0.1": {Namespace: "a"}}},
		{Endpoints: map[string]policy.Endpoint{"10.0.0.1": {Namespace: "a", Name: "b"}}, Hosts: []net.IP{net.ParseIP("10.0.0.1")}},
		{Hosts: []net.IP{net.ParseIP("fe80::1")}},
	} {
		if _, err := compile.Compile(manifest.NewState(), topo, nil); err == nil {
			t.Errorf("topology %+v accepted", topo)
		}
	}
}

// BenchmarkCompile: a full compilation for n policies (each with its own
// ipBlock with an except, a port range and a selector), from scratch and
// against the previous rule set.
func BenchmarkCompile(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		st, topo := bigState(b, n)
		prev, err := compile.Compile(st, topo, nil)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			for b.Loop() {
				if _, err := compile.Compile(st, topo, prev); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(prev.Policy)), "entries")
		})
	}
}

// BenchmarkSimulate: the per-packet decision does not grow with the rules.
func BenchmarkSimulate(b *testing.B) {
	p := policy.Packet{SrcIP: net.ParseIP("10.244.1.11"), DstIP: net.ParseIP("10.244.1.10"), Proto: 6, DstPort: 1}
	for _, n := range []int{10, 1000} {
		st, topo := bigState(b, n)
		rs, err := compile.Compile(st, topo, nil)
		if err != nil {
			b.Fatal(err)
		}
		sim, err := compile.NewSimulator(rs)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			for b.Loop() {
				sim.Allowed(p)
			}
		})
	}
}
