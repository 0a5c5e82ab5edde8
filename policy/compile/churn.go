package compile

import (
	"maps"
	"net"
	"slices"
	"strings"
)

// ChurnedIPs lists the addresses whose pod identity differs between two
// rule sets: a /32 ipcache entry of either whose class names a pod identity
// (namespace and labels) the other does not give that address, e.g. a pod
// deleted and its IP reused by a pod with other labels. A datapath forgets
// the tracked flows of these addresses once the new rule set is in place,
// so no connection opened under the old identity's allowances outlives it.
// Identities are compared by content, not number. Policy changes alone
// never churn an address: they change classes, not identities. With prev
// nil (nothing known of it) there is nothing to compare.
func ChurnedIPs(prev, next *RuleSet) []net.IP {
	if prev == nil || next == nil {
		return nil
	}
	before, after := podIdentities(prev), podIdentities(next)
	var out []net.IP
	for ip, id := range before {
		if after[ip] != id {
			out = append(out, net.ParseIP(ip).To4())
		}
	}
	for ip := range after {
		if _, ok := before[ip]; !ok {
			out = append(out, net.ParseIP(ip).To4())
		}
	}
	slices.SortFunc(out, func(a, b net.IP) int { return strings.Compare(a.String(), b.String()) })
	return out
}

// podIdentities maps each /32 ipcache address whose class is a pod
// identity to that identity's content.
func podIdentities(rs *RuleSet) map[string]string {
	ids := map[uint32]string{}
	for _, id := range rs.Identities {
		var b strings.Builder
		b.WriteString(id.Namespace)
		for _, k := range slices.Sorted(maps.Keys(id.Labels)) {
			b.WriteString("\x00" + k + "=" + id.Labels[k])
		}
		ids[id.ID] = b.String()
	}
	classes := map[uint32]string{}
	for _, c := range rs.Classes {
		if c.Identity != 0 {
			classes[c.ID] = ids[c.Identity]
		}
	}
	out := map[string]string{}
	for _, e := range rs.IPCache {
		if ones, _ := e.Prefix.Mask.Size(); ones != 32 {
			continue
		}
		if id, ok := classes[e.Class]; ok {
			out[e.Prefix.IP.String()] = id
		}
	}
	return out
}
