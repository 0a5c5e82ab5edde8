package compile

import (
	"maps"
	"slices"
)

// Delta is what changes between two rule sets, table by table. To move the
// datapath from old to new, compile new with Compile(..., old) and apply in
// this order:
//
//  1. PolicyAdds,
//  2. IPCacheUpserts, 3. EndpointUpserts (addresses switch to their new
//     classes and identities, whose entries are already there),
//  4. EndpointDeletes, 5. IPCacheDeletes, 6. PolicyDeletes.
//
// The maps are not updated atomically together, so while this runs a packet
// may be decided with the old or new identity of its local end, the old or
// new class of its remote end, and old and new entries. Because Compile(...,
// old) never gives a number a meaning different from the one it has in old,
// every such decision is one that old or new policies would make for old or
// new labels of the two ends; no entry is ever read as being about another
// identity or class. After step 6 the tables are exactly new's.
type Delta struct {
	PolicyAdds      []PolicyEntry
	IPCacheUpserts  []IPCacheEntry
	EndpointUpserts map[string]EndpointPolicy
	EndpointDeletes []string
	IPCacheDeletes  []IPCacheEntry // with the class they had
	PolicyDeletes   []PolicyEntry
}

// Empty reports whether the delta changes nothing.
func (d Delta) Empty() bool {
	return len(d.PolicyAdds)+len(d.IPCacheUpserts)+len(d.EndpointUpserts)+
		len(d.EndpointDeletes)+len(d.IPCacheDeletes)+len(d.PolicyDeletes) == 0
}

// Diff returns the changes from old to new. A nil rule set is empty. The
// lists are in the rule sets' order (sorted).
func Diff(old, new *RuleSet) Delta {
	if old == nil {
		old = &RuleSet{}
	}
	if new == nil {
		new = &RuleSet{}
	}
	d := Delta{EndpointUpserts: map[string]EndpointPolicy{}}

	oldPol := map[PolicyKey]Verdict{}
	for _, e := range old.Policy {
		oldPol[e.Key] = e.Verdict
	}
	newPol := map[PolicyKey]Verdict{}
	for _, e := range new.Policy {
		newPol[e.Key] = e.Verdict
		if v, ok := oldPol[e.Key]; !ok || v != e.Verdict {
			d.PolicyAdds = append(d.PolicyAdds, e)
		}
	}
	for _, e := range old.Policy {
		if _, ok := newPol[e.Key]; !ok {
			d.PolicyDeletes = append(d.PolicyDeletes, e)
		}
	}

	oldIPC := map[IPCacheKey]uint32{}
	for _, e := range old.IPCache {
		oldIPC[e.Key()] = e.Class
	}
	newIPC := map[IPCacheKey]bool{}
	for _, e := range new.IPCache {
		newIPC[e.Key()] = true
		if cls, ok := oldIPC[e.Key()]; !ok || cls != e.Class {
			d.IPCacheUpserts = append(d.IPCacheUpserts, e)
		}
	}
	for _, e := range old.IPCache {
		if !newIPC[e.Key()] {
			d.IPCacheDeletes = append(d.IPCacheDeletes, e)
		}
	}

	for ip, ep := range new.Endpoints {
		if o, ok := old.Endpoints[ip]; !ok || o != ep {
			d.EndpointUpserts[ip] = ep
		}
	}
	for _, ip := range slices.Sorted(maps.Keys(old.Endpoints)) {
		if _, ok := new.Endpoints[ip]; !ok {
			d.EndpointDeletes = append(d.EndpointDeletes, ip)
		}
	}
	return d
}

// Apply returns rs with the delta applied (for tests and for keeping a copy
// of what is installed). It does not modify rs.
func (d *Delta) Apply(rs *RuleSet) *RuleSet {
	if rs == nil {
		rs = &RuleSet{}
	}
	pol := map[PolicyKey]Verdict{}
	for _, e := range rs.Policy {
		pol[e.Key] = e.Verdict
	}
	for _, e := range d.PolicyAdds {
		pol[e.Key] = e.Verdict
	}
	for _, e := range d.PolicyDeletes {
		delete(pol, e.Key)
	}
	ipc := map[IPCacheKey]IPCacheEntry{}
	for _, e := range rs.IPCache {
		ipc[e.Key()] = e
	}
	for _, e := range d.IPCacheUpserts {
		ipc[e.Key()] = e
	}
	for _, e := range d.IPCacheDeletes {
		delete(ipc, e.Key())
	}
	out := &RuleSet{Endpoints: maps.Clone(rs.Endpoints), Identities: rs.Identities, Classes: rs.Classes}
	if out.Endpoints == nil {
		out.Endpoints = map[string]EndpointPolicy{}
	}
	maps.Copy(out.Endpoints, d.EndpointUpserts)
	for _, ip := range d.EndpointDeletes {
		delete(out.Endpoints, ip)
	}
	for k, v := range pol {
		out.Policy = append(out.Policy, PolicyEntry{Key: k, Verdict: v})
	}
	slices.SortFunc(out.Policy, func(a, b PolicyEntry) int { return comparePolicyKey(a.Key, b.Key) })
	for _, e := range ipc {
		out.IPCache = append(out.IPCache, e)
	}
	slices.SortFunc(out.IPCache, func(a, b IPCacheEntry) int {
		pa, _ := a.prefix()
		pb, _ := b.prefix()
		return comparePrefix(pa, pb)
	})
	return out
}
