package ebpf

import (
	"errors"
	"net"
	"os"
	"slices"
	"strings"
	"testing"

	cilium "github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/netlinksafe"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/loader"
	"github.com/ternlabs/tern/policy/compile"
)

func ipc(prefix string, class uint32) compile.IPCacheEntry {
	_, n, err := net.ParseCIDR(prefix)
	if err != nil {
		panic(err)
	}
	return compile.IPCacheEntry{Prefix: *n, Class: class}
}

func allow(k compile.PolicyKey) compile.PolicyEntry {
	return compile.PolicyEntry{Key: k, Verdict: compile.VerdictAllow}
}

// ruleSetA isolates 10.244.3.2 for ingress, allowing TCP 80 from class 2.
func ruleSetA() *compile.RuleSet {
	return &compile.RuleSet{
		Endpoints: map[string]compile.EndpointPolicy{"10.244.3.2": {LocalID: 1, IngressIsolated: true}},
		IPCache:   []compile.IPCacheEntry{ipc("10.244.3.2/32", 3), ipc("10.244.3.3/32", 2), ipc("10.0.0.0/8", 4)},
		Policy: []compile.PolicyEntry{
			allow(compile.PolicyKey{Dir: compile.Ingress, Proto: 6, LocalID: 1, RemoteClass: 2, Port: 80, PortBits: 16}),
			allow(compile.PolicyKey{Dir: compile.Ingress, Proto: 17, LocalID: 1, RemoteClass: 4, Port: 1024, PortBits: 6}),
		},
	}
}

// ruleSetB: a second endpoint, the first one's rules changed.
func ruleSetB() *compile.RuleSet {
	return &compile.RuleSet{
		Endpoints: map[string]compile.EndpointPolicy{
			"10.244.3.2": {LocalID: 1, IngressIsolated: true, EgressIsolated: true},
			"10.244.3.3": {LocalID: 5},
		},
		IPCache: []compile.IPCacheEntry{ipc("10.244.3.2/32", 3), ipc("10.244.3.3/32", 6)},
		Policy: []compile.PolicyEntry{
			allow(compile.PolicyKey{Dir: compile.Ingress, Proto: 6, LocalID: 1, RemoteClass: 6, Port: 80, PortBits: 16}),
			allow(compile.PolicyKey{Dir: compile.Egress, Proto: 0, LocalID: 1, RemoteClass: compile.ClassAny}),
		},
	}
}

func (n *node) policyMaps(t *testing.T) PolicyMaps {
	t.Helper()
	if err := n.dp.open(); err != nil {
		t.Fatal(err)
	}
	pm, err := PolicyMapsOf(n.dp.objs.Maps)
	if err != nil {
		t.Fatal(err)
	}
	return pm
}

func (n *node) apply(t *testing.T, prev, next *compile.RuleSet) {
	t.Helper()
	if err := n.in(func() error { return n.dp.ApplyPolicy(prev, next) }); err != nil {
		t.Fatalf("ApplyPolicy: %v", err)
	}
}

// TestApplyPolicy: on a fresh datapath (no EnsureNode) ApplyPolicy loads
// the maps and writes the rule set; updates leave exactly the new tables;
// nil prev starts from what the maps hold; the empty rule set empties them.
func TestApplyPolicy(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	n.dp.cfg.Network = "net1"
	n.apply(t, nil, ruleSetA())
	checkTables(t, 1, n.policyMaps(t), ruleSetA())
	for _, name := range []string{"tern_ep_policy", "tern_ipcache", "tern_policy", "tern_policy_ct"} {
		if _, err := os.Stat(n.bpffs + "/maps/" + name); err != nil {
			t.Errorf("map %s not pinned: %v", name, err)
		}
	}

	n.apply(t, ruleSetA(), ruleSetB())
	checkTables(t, 2, n.policyMaps(t), ruleSetB())

	// A record lost (prev nil): the maps are the starting point.
	n.apply(t, nil, ruleSetA())
	checkTables(t, 3, n.policyMaps(t), ruleSetA())

	// An endpoint entry removed behind the record's back comes back with
	// the next update, although the delta does not name it.
	pm := n.policyMaps(t)
	k, _ := compile.EndpointKeyOf("10.244.3.2")
	if err := pm.Endpoints.Delete(k); err != nil {
		t.Fatal(err)
	}
	n.apply(t, ruleSetA(), ruleSetA())
	checkTables(t, 4, pm, ruleSetA())

	n.apply(t, ruleSetA(), &compile.RuleSet{})
	checkTables(t, 5, pm, &compile.RuleSet{})

	// Malformed rule sets are refused before anything is written.
	bad := ruleSetA()
	bad.Endpoints["10.244.3.9"] = compile.EndpointPolicy{}
	if err := n.in(func() error { return n.dp.ApplyPolicy(nil, bad) }); err == nil || !strings.Contains(err.Error(), "identity 0") {
		t.Errorf("ApplyPolicy of an endpoint with identity 0: %v", err)
	}
	checkTables(t, 6, pm, &compile.RuleSet{})
}

// TestApplyRuleSetRollback: a write that fails half-way leaves the maps as
// they were (here the policy trie has room for three entries).
func TestApplyRuleSetRollback(t *testing.T) {
	testutil.RequirePrivileged(t)
	spec, err := ternbpf.LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = cilium.PinNone
	}
	spec.Maps[ternbpf.TernMapTernPolicy].MaxEntries = 3
	coll, err := cilium.NewCollection(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	pm, err := PolicyMapsOf(coll.Maps)
	if err != nil {
		t.Fatal(err)
	}
	if err := ApplyRuleSet(pm, nil, ruleSetA()); err != nil {
		t.Fatal(err)
	}
	big := ruleSetB()
	for p := range uint16(3) {
		big.Policy = append(big.Policy, allow(compile.PolicyKey{Dir: compile.Ingress, Proto: 17, LocalID: 1, RemoteClass: 6, Port: 53 + p, PortBits: 16}))
	}
	err = ApplyRuleSet(pm, ruleSetA(), big)
	if err == nil {
		t.Fatal("ApplyRuleSet beyond the map's size succeeded")
	}
	checkTables(t, 0, pm, ruleSetA())
}

// TestPolicyOwner: one network at a time has its rule set in the node's
// maps; another's ApplyPolicy fails until the owner's last pod is gone.
func TestPolicyOwner(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	n.dp.cfg.Network = "net1"
	other := New(Config{BPFFSDir: n.bpffs, StateDir: n.state, Network: "net2"})
	t.Cleanup(other.Close)

	n.apply(t, nil, ruleSetA())
	err := n.in(func() error { return other.ApplyPolicy(nil, ruleSetB()) })
	if err == nil || !strings.Contains(err.Error(), `network "net1"`) {
		t.Fatalf("ApplyPolicy of a second network: %v, want an error naming net1", err)
	}
	checkTables(t, 1, n.policyMaps(t), ruleSetA())
	// Its ReleaseNode leaves net1's policy alone.
	if err := n.in(func() error { return other.ReleaseNode(0) }); err != nil {
		t.Fatal(err)
	}
	checkTables(t, 2, n.policyMaps(t), ruleSetA())

	// net1's last pod goes: its policy state goes with it.
	if err := n.in(func() error { return n.dp.ReleaseNode(0) }); err != nil {
		t.Fatal(err)
	}
	checkTables(t, 3, n.policyMaps(t), &compile.RuleSet{})
	if _, err := os.Stat(n.dp.ownerPath()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("owner record after ReleaseNode(0): %v", err)
	}
	if err := n.in(func() error { return other.ApplyPolicy(nil, ruleSetB()) }); err != nil {
		t.Fatalf("ApplyPolicy of net2 once net1 released: %v", err)
	}
	checkTables(t, 4, n.policyMaps(t), ruleSetB())

	// A record naming a network with nothing left in the maps is stale:
	// taken over.
	if err := n.in(func() error { return other.ApplyPolicy(ruleSetB(), &compile.RuleSet{}) }); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.dp.ownerPath(), []byte("gone\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	n.apply(t, nil, ruleSetA())
	if owner, _, _ := n.dp.policyOwner(); owner != "net1" {
		t.Errorf("owner after taking over a stale record: %q", owner)
	}
}

// podHooks lists the program IDs at TCX ingress and egress of a veth.
func (n *node) podHooks(t *testing.T, ep *datapath.Endpoint) (ingress, egress []int) {
	t.Helper()
	n.do(t, func() error {
		for _, at := range []cilium.AttachType{cilium.AttachTCXIngress, cilium.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: ep.HostIfindex, Attach: at})
			if err != nil {
				return err
			}
			for _, p := range res.Programs {
				if at == cilium.AttachTCXIngress {
					ingress = append(ingress, int(p.ID))
				} else {
					egress = append(egress, int(p.ID))
				}
			}
		}
		return nil
	})
	return ingress, egress
}

// TestPolicyEndpointLifecycle: AddEndpoint attaches tern_to_pod at egress
// (both modes), CheckEndpoint notices it missing, DelEndpoint detaches it
// and removes the pod's policy entry and conntrack entries, and ReleaseNode
// after the last pod empties the policy maps.
func TestPolicyEndpointLifecycle(t *testing.T) {
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			n := newNode(t, mode)
			ep := n.endpoint(t, "10.244.3.2/24")
			keep := n.endpoint(t, "10.244.3.3/24")
			rs := ruleSetB()
			n.apply(t, nil, rs)
			n.add(t, ep)
			n.add(t, keep)
			if err := n.check(ep); err != nil {
				t.Fatalf("CheckEndpoint: %v", err)
			}
			if mode == loader.ModeTCX {
				p, err := n.dp.objs.Program(ternbpf.TernProgTernToPod)
				if err != nil {
					t.Fatal(err)
				}
				id, _ := loader.ProgramID(p)
				if _, eg := n.podHooks(t, ep); !slices.Equal(eg, []int{int(id)}) {
					t.Errorf("tcx egress of %s runs %v, want tern_to_pod %d", ep.HostVeth, eg, id)
				}
			}

			// Egress detached behind our back: CHECK reports it.
			n.do(t, func() error { return n.dp.loader.Detach(ep.HostVeth, loader.HookPodEgress) })
			if err := n.check(ep); err == nil || !strings.Contains(err.Error(), "tern_to_pod") {
				t.Errorf("CheckEndpoint without the egress program: %v", err)
			}
			// ApplyPolicy puts it back (pods wired before policy existed).
			n.apply(t, rs, rs)
			if err := n.check(ep); err != nil {
				t.Errorf("CheckEndpoint after ApplyPolicy re-attached egress: %v", err)
			}

			ct, err := n.dp.objs.Map(ternbpf.TernMapTernPolicyCt)
			if err != nil {
				t.Fatal(err)
			}
			a, _ := EndpointKey(ep.IP.IP)
			b, _ := EndpointKey(keep.IP.IP)
			w, _ := EndpointKey(net.ParseIP("8.8.8.8"))
			for _, k := range []ternbpf.TernPolicyCtKey{
				{LoAddr: a, HiAddr: b, LoPort: 1, HiPort: 2, Proto: 6},
				{LoAddr: w, HiAddr: a, LoPort: 1, HiPort: 2, Proto: 17},
				{LoAddr: w, HiAddr: b, LoPort: 1, HiPort: 2, Proto: 17},
			} {
				if err := ct.Put(k, ternbpf.TernPolicyCtEntry{LastSeen: 1}); err != nil {
					t.Fatal(err)
				}
			}

			n.del(t, ep)
			got, err := ReadRuleSet(n.policyMaps(t))
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := got.Endpoints["10.244.3.2"]; ok || len(got.Endpoints) != 1 {
				t.Errorf("endpoint policy after DEL of 10.244.3.2: %+v", got.Endpoints)
			}
			if c := countEntries(t, ct); c != 1 {
				t.Errorf("policy conntrack after DEL: %d entries, want only 10.244.3.3's", c)
			}
			if in, eg := n.podHooks(t, ep); len(in)+len(eg) != 0 {
				t.Errorf("programs left on %s: ingress %v egress %v", ep.HostVeth, in, eg)
			}

			// GC of everything: the rest goes.
			if err := n.in(func() error { return n.dp.Sweep(nil) }); err != nil {
				t.Fatal(err)
			}
			if got, _ := ReadRuleSet(n.policyMaps(t)); len(got.Endpoints) != 0 {
				t.Errorf("endpoint policy after Sweep(nil): %+v", got.Endpoints)
			}
			if c := countEntries(t, ct); c != 0 {
				t.Errorf("policy conntrack after Sweep(nil): %d entries", c)
			}
			n.del(t, keep)
			if err := n.in(func() error { return n.dp.ReleaseNode(0) }); err != nil {
				t.Fatal(err)
			}
			checkTables(t, 0, n.policyMaps(t), &compile.RuleSet{})
			if got := n.pinsAndRecords(t); len(got) != 0 {
				t.Errorf("left after DEL: %v", got)
			}
			n.do(t, func() error {
				_, err := netlinksafe.LinkByName(ep.HostVeth)
				return err
			})
		})
	}
}

func countEntries(t *testing.T, m *cilium.Map) int {
	t.Helper()
	var k, v []byte
	c := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		c++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return c
}
