package ebpf

// NetworkPolicy: ApplyPolicy writes a compiled rule set (package
// policy/compile) into the maps tern_from_pod and tern_to_pod decide by
// (bpf/lib/policy.h):
//
//   - tern_ep_policy: local pod IPv4 -> local identity, isolation flags;
//   - tern_ipcache: IPv4 prefix -> remote class (LPM);
//   - tern_policy: (direction, protocol, local identity, remote class,
//     port prefix) -> verdict (LPM).
//
// Keys and values are written with compile's MarshalBinary encodings, the
// very bytes compile.Simulator decides by, so the Go and C layouts cannot
// drift apart unnoticed (TestPolicyLayoutMatchesBTF checks the C side).
//
// The maps are node-wide while rule sets are per network, and identity and
// class numbers mean different things in two networks' rule sets: one
// network at a time owns the policy maps (recorded in the state directory),
// and another network's ApplyPolicy fails while the owner still has policy
// entries in them. Networks that both need policy take separate bpffsDirs.

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	cilium "github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/netlinksafe"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
	"github.com/ternlabs/tern/policy/compile"
)

var _ datapath.PolicyEnforcer = (*Datapath)(nil)

// PolicyMaps are the maps a rule set lives in.
type PolicyMaps struct {
	Endpoints *cilium.Map // tern_ep_policy
	IPCache   *cilium.Map // tern_ipcache
	Policy    *cilium.Map // tern_policy
}

// PolicyMapsOf picks the policy maps out of a set of maps by name (a
// loaded collection's, or the loader's).
func PolicyMapsOf(m map[string]*cilium.Map) (PolicyMaps, error) {
	pm := PolicyMaps{
		Endpoints: m[ternbpf.TernMapTernEpPolicy],
		IPCache:   m[ternbpf.TernMapTernIpcache],
		Policy:    m[ternbpf.TernMapTernPolicy],
	}
	if pm.Endpoints == nil || pm.IPCache == nil || pm.Policy == nil {
		return PolicyMaps{}, fmt.Errorf("policy maps %s, %s, %s not all loaded",
			ternbpf.TernMapTernEpPolicy, ternbpf.TernMapTernIpcache, ternbpf.TernMapTernPolicy)
	}
	return pm, nil
}

// ApplyPolicy implements datapath.PolicyEnforcer: it moves the policy maps
// from prev to next in compile.Diff's order (allowing entries first,
// isolating ones after, old ones last), so there is no moment of open
// access, and established flows keep their conntrack entries. Every
// endpoint of next is written, changed or not, so an entry DelEndpoint or
// Sweep removed behind the record's back comes back. With prev nil it
// starts from what the maps hold. On error the maps are moved back to prev.
// It loads the programs and maps if the node has none yet.
func (d *Datapath) ApplyPolicy(prev, next *compile.RuleSet) error {
	if next == nil {
		next = &compile.RuleSet{}
	}
	// Refuse what the maps cannot hold (identity 0, bad prefixes) before
	// writing anything: the simulator loads the same encodings.
	if _, err := compile.NewSimulator(next); err != nil {
		return fmt.Errorf("policy rule set: %w", err)
	}
	if err := d.open(); err != nil {
		return err
	}
	pm, err := PolicyMapsOf(d.objs.Maps)
	if err != nil {
		return err
	}
	if err := d.ensurePodEgress(); err != nil {
		return err
	}
	return d.policyHeld(func() error {
		if err := d.claimPolicy(pm); err != nil {
			return err
		}
		if err := ApplyRuleSet(pm, prev, next); err != nil {
			return err
		}
		return d.forgetChurned(prev, next)
	})
}

// ensurePodEgress attaches tern_to_pod to every pod veth that runs
// tern_from_pod without it: pods wired by a version from before
// NetworkPolicy have only the ingress hook, and an upgrade swaps programs
// but adds no attachments. Without it, what the host delivers to such a pod
// would escape its ingress policy.
func (d *Datapath) ensurePodEgress() error {
	ingress, err := d.loader.Attachments(loader.HookPodIngress)
	if err != nil {
		return err
	}
	egress, err := d.loader.Attachments(loader.HookPodEgress)
	if err != nil {
		return err
	}
	for _, ifname := range ingress {
		if slices.Contains(egress, ifname) {
			continue
		}
		lk, err := netlinksafe.LinkByName(ifname)
		if err != nil {
			continue // gone without a DEL: GC's business
		}
		// The way its ingress hook is (auto mode: per pod, see
		// podAttachMode); the configured mode when that is unknown.
		mode := d.cfg.Attach
		if mode == loader.ModeAuto {
			if kind := d.loader.AttachedKind(ifname, lk.Attrs().Index, loader.HookPodIngress); kind != "" {
				mode = kind
			}
		}
		if _, err := d.loader.Attach(d.objs, ifname, lk.Attrs().Index, loader.HookPodEgress, mode); err != nil {
			return fmt.Errorf("attach the pod egress program to %s: %w", ifname, err)
		}
	}
	return nil
}

// ApplyRuleSet moves the maps from prev (nil: what they hold) to next; see
// ApplyPolicy.
func ApplyRuleSet(pm PolicyMaps, prev, next *compile.RuleSet) error {
	if next == nil {
		next = &compile.RuleSet{}
	}
	if prev == nil {
		cur, err := ReadRuleSet(pm)
		if err != nil {
			return err
		}
		prev = cur
	}
	delta := compile.Diff(prev, next)
	maps.Copy(delta.EndpointUpserts, next.Endpoints)
	if err := writeDelta(pm, delta, false); err != nil {
		back := compile.Diff(next, prev)
		if rerr := writeDelta(pm, back, true); rerr != nil {
			return errors.Join(err, fmt.Errorf("restore the previous rule set: %w", rerr))
		}
		return err
	}
	return nil
}

// writeDelta writes a delta in the order compile.Delta documents. It stops
// at the first error unless bestEffort, which goes on and returns them all
// (restoring after a failure). Deleting what is not there is fine.
func writeDelta(pm PolicyMaps, d compile.Delta, bestEffort bool) error {
	var errs []error
	failed := func(err error) bool {
		errs = append(errs, err)
		return !bestEffort
	}
	for _, e := range d.PolicyAdds {
		if err := pm.Policy.Put(e.Key, compile.PolicyValue{Verdict: e.Verdict}); err != nil && failed(fmt.Errorf("add policy entry %v: %w", e.Key, err)) {
			return errors.Join(errs...)
		}
	}
	for _, e := range d.IPCacheUpserts {
		if err := pm.IPCache.Put(e.Key(), compile.IPCacheValue{Class: e.Class}); err != nil && failed(fmt.Errorf("write ipcache entry %s: %w", e.Prefix.String(), err)) {
			return errors.Join(errs...)
		}
	}
	for _, ip := range slices.Sorted(maps.Keys(d.EndpointUpserts)) {
		k, err := compile.EndpointKeyOf(ip)
		if err == nil {
			err = pm.Endpoints.Put(k, d.EndpointUpserts[ip])
		}
		if err != nil && failed(fmt.Errorf("write endpoint policy %s: %w", ip, err)) {
			return errors.Join(errs...)
		}
	}
	for _, ip := range d.EndpointDeletes {
		k, err := compile.EndpointKeyOf(ip)
		if err == nil {
			err = deleteKey(pm.Endpoints, k)
		}
		if err != nil && failed(fmt.Errorf("delete endpoint policy %s: %w", ip, err)) {
			return errors.Join(errs...)
		}
	}
	for _, e := range d.IPCacheDeletes {
		if err := deleteKey(pm.IPCache, e.Key()); err != nil && failed(fmt.Errorf("delete ipcache entry %s: %w", e.Prefix.String(), err)) {
			return errors.Join(errs...)
		}
	}
	for _, e := range d.PolicyDeletes {
		if err := deleteKey(pm.Policy, e.Key); err != nil && failed(fmt.Errorf("delete policy entry %v: %w", e.Key, err)) {
			return errors.Join(errs...)
		}
	}
	return errors.Join(errs...)
}

func deleteKey(m *cilium.Map, key any) error {
	if err := m.Delete(key); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
		return err
	}
	return nil
}

// ReadRuleSet returns what the policy maps hold, as the tables of a rule
// set (no identities or classes: the maps do not know them).
func ReadRuleSet(pm PolicyMaps) (*compile.RuleSet, error) {
	rs := &compile.RuleSet{Endpoints: map[string]compile.EndpointPolicy{}}
	var k, v []byte
	it := pm.Endpoints.Iterate()
	for it.Next(&k, &v) {
		var ep compile.EndpointPolicy
		if len(k) != compile.EndpointKeySize {
			return nil, fmt.Errorf("read %s: key of %d bytes", ternbpf.TernMapTernEpPolicy, len(k))
		}
		if err := ep.UnmarshalBinary(v); err != nil {
			return nil, fmt.Errorf("read %s: %w", ternbpf.TernMapTernEpPolicy, err)
		}
		rs.Endpoints[netip.AddrFrom4([4]byte(k)).String()] = ep
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernEpPolicy, err)
	}
	it = pm.IPCache.Iterate()
	for it.Next(&k, &v) {
		var key compile.IPCacheKey
		var val compile.IPCacheValue
		if err := key.UnmarshalBinary(k); err != nil {
			return nil, fmt.Errorf("read %s: %w", ternbpf.TernMapTernIpcache, err)
		}
		if err := val.UnmarshalBinary(v); err != nil {
			return nil, fmt.Errorf("read %s: %w", ternbpf.TernMapTernIpcache, err)
		}
		rs.IPCache = append(rs.IPCache, compile.IPCacheEntry{
			Prefix: net.IPNet{IP: net.IP(bytes.Clone(key.Addr[:])), Mask: net.CIDRMask(int(key.PrefixLen), 32)},
			Class:  val.Class,
		})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernIpcache, err)
	}
	it = pm.Policy.Iterate()
	for it.Next(&k, &v) {
		var key compile.PolicyKey
		var val compile.PolicyValue
		if err := key.UnmarshalBinary(k); err != nil {
			return nil, fmt.Errorf("read %s: %w", ternbpf.TernMapTernPolicy, err)
		}
		if err := val.UnmarshalBinary(v); err != nil {
			return nil, fmt.Errorf("read %s: %w", ternbpf.TernMapTernPolicy, err)
		}
		rs.Policy = append(rs.Policy, compile.PolicyEntry{Key: key, Verdict: val.Verdict})
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernPolicy, err)
	}
	return rs, nil
}

// policyHeld runs fn holding the node's policy lock, which orders writes
// to the policy maps and the owner record between processes (the policy
// store's lock covers ApplyPolicy only, not DEL and GC).
func (d *Datapath) policyHeld(fn func() error) error {
	lock, err := loader.Lock(filepath.Join(d.cfg.StateDir, "bpf-policy.lock"))
	if err != nil {
		return err
	}
	defer lock.Unlock()
	return fn()
}

func (d *Datapath) ownerPath() string { return filepath.Join(d.cfg.StateDir, "bpf-policy-owner") }

// policyOwner returns the network recorded as owning the policy maps, and
// whether one is.
func (d *Datapath) policyOwner() (string, bool, error) {
	b, err := os.ReadFile(d.ownerPath())
	if errors.Is(err, os.ErrNotExist) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("read policy owner: %w", err)
	}
	return strings.TrimSuffix(string(b), "\n"), true, nil
}

// ownsPolicy reports whether this network may change the policy maps: it
// owns them, nobody does, or the owner has nothing left in them (its
// record outlived its state, e.g. across a reboot that emptied bpffs).
func (d *Datapath) ownsPolicy(pm PolicyMaps) (bool, string, error) {
	owner, ok, err := d.policyOwner()
	if err != nil || !ok || owner == d.cfg.Network {
		return err == nil, owner, err
	}
	used, err := policyInUse(pm)
	return err == nil && !used, owner, err
}

// claimPolicy makes this network the owner of the policy maps, or fails
// when another network's policy is in them.
func (d *Datapath) claimPolicy(pm PolicyMaps) error {
	mine, owner, err := d.ownsPolicy(pm)
	if err != nil {
		return err
	}
	if !mine {
		return fmt.Errorf("the node's eBPF policy maps (%s) hold the NetworkPolicy of network %q: one network per bpffsDir can enforce policy (give network %q its own bpffsDir)",
			d.cfg.BPFFSDir, owner, d.cfg.Network)
	}
	if cur, ok, _ := d.policyOwner(); ok && cur == d.cfg.Network {
		return nil
	}
	if err := os.MkdirAll(d.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("record policy owner: %w", err)
	}
	if err := os.WriteFile(d.ownerPath(), []byte(d.cfg.Network+"\n"), 0o600); err != nil {
		return fmt.Errorf("record policy owner: %w", err)
	}
	return nil
}

// policyInUse reports whether any endpoint or policy entry is in the maps
// (ipcache entries alone isolate nothing).
func policyInUse(pm PolicyMaps) (bool, error) {
	for _, m := range []*cilium.Map{pm.Endpoints, pm.Policy} {
		var k, v []byte
		it := m.Iterate()
		if it.Next(&k, &v) {
			return true, nil
		}
		if err := it.Err(); err != nil {
			return false, fmt.Errorf("iterate policy map: %w", err)
		}
	}
	return false, nil
}

// releasePolicy removes the network's policy state when its last pod is
// gone (ReleaseNode(0)): every entry of the policy maps, the policy
// conntrack and the owner record. Another network's policy stays.
func (d *Datapath) releasePolicy() error {
	pm, err := PolicyMapsOf(d.objs.Maps)
	if err != nil {
		return err
	}
	return d.policyHeld(func() error {
		mine, _, err := d.ownsPolicy(pm)
		if err != nil || !mine {
			return err
		}
		var errs []error
		// Isolation first, then what it referred to: the same order as
		// an update that removes everything.
		for _, name := range []string{ternbpf.TernMapTernEpPolicy, ternbpf.TernMapTernIpcache, ternbpf.TernMapTernPolicy,
			ternbpf.TernMapTernPolicyCt, ternbpf.TernMapTernPolicyCtOther, ternbpf.TernMapTernPolicyCtQuota,
			ternbpf.TernMapTernPolicyFrag} {
			m, err := d.objs.Map(name)
			if err == nil {
				err = clearMap(m)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("clear %s: %w", name, err))
			}
		}
		if len(errs) == 0 {
			if err := os.Remove(d.ownerPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove policy owner record: %w", err))
			}
		}
		return errors.Join(errs...)
	})
}

// clearMap deletes every entry of a hash-like map.
func clearMap(m *cilium.Map) error {
	var (
		k, v []byte
		keys [][]byte
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, bytes.Clone(k))
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, key := range keys {
		if err := deleteKey(m, key); err != nil {
			return err
		}
	}
	return nil
}

// forgetPolicyEndpoints removes the tern_ep_policy entries of the addresses
// drop selects, their flow counts (tern_policy_ct_quota) and the policy
// conntrack entries with such an address at either end: a reused IP must start with no state of the pod it had. The
// endpoint entries only while this network owns the maps.
func (d *Datapath) forgetPolicyEndpoints(drop func(ip net.IP) bool) error {
	if err := d.open(); err != nil {
		return err
	}
	pm, err := PolicyMapsOf(d.objs.Maps)
	if err != nil {
		return err
	}
	quota, err := d.objs.Map(ternbpf.TernMapTernPolicyCtQuota)
	if err != nil {
		return err
	}
	ctNames := []string{ternbpf.TernMapTernPolicyCt, ternbpf.TernMapTernPolicyCtOther}
	var cts []*cilium.Map
	for _, name := range ctNames {
		ct, err := d.objs.Map(name)
		if err != nil {
			return err
		}
		cts = append(cts, ct)
	}
	return d.policyHeld(func() error {
		var errs []error
		mine, _, err := d.ownsPolicy(pm)
		if err != nil {
			return err
		}
		if mine {
			var (
				key   uint32
				val   ternbpf.TernEpPolicy
				stale []uint32
			)
			it := pm.Endpoints.Iterate()
			for it.Next(&key, &val) {
				if drop(natIP(key)) {
					stale = append(stale, key)
				}
			}
			if err := it.Err(); err != nil {
				errs = append(errs, fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernEpPolicy, err))
			}
			for _, k := range stale {
				if err := deleteKey(pm.Endpoints, k); err != nil {
					errs = append(errs, fmt.Errorf("delete endpoint policy %s: %w", natIP(k), err))
				}
			}
		}
		for i, ct := range cts {
			errs = append(errs, forgetFlows(ctNames[i], ct, drop))
		}
		errs = append(errs, forgetQuotas(quota, drop))
		return errors.Join(errs...)
	})
}

// forgetFlows deletes the entries of a policy conntrack map with an address
// drop selects at either end.
func forgetFlows(name string, ct *cilium.Map, drop func(ip net.IP) bool) error {
	var (
		key   ternbpf.TernPolicyCtKey
		val   ternbpf.TernPolicyCtEntry
		stale []ternbpf.TernPolicyCtKey
		errs  []error
	)
	it := ct.Iterate()
	for it.Next(&key, &val) {
		if drop(natIP(key.LoAddr)) || drop(natIP(key.HiAddr)) {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		errs = append(errs, fmt.Errorf("iterate %s: %w", name, err))
	}
	for _, k := range stale {
		if err := deleteKey(ct, k); err != nil {
			errs = append(errs, fmt.Errorf("delete from %s: %w", name, err))
		}
	}
	return errors.Join(errs...)
}

// forgetQuotas deletes the flow counts of the addresses drop selects.
func forgetQuotas(quota *cilium.Map, drop func(ip net.IP) bool) error {
	var (
		key   uint32
		val   ternbpf.TernPolicyCtQuota
		stale []uint32
		errs  []error
	)
	it := quota.Iterate()
	for it.Next(&key, &val) {
		if drop(natIP(key)) {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		errs = append(errs, fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernPolicyCtQuota, err))
	}
	for _, k := range stale {
		if err := deleteKey(quota, k); err != nil {
			errs = append(errs, fmt.Errorf("delete from %s: %w", ternbpf.TernMapTernPolicyCtQuota, err))
		}
	}
	return errors.Join(errs...)
}
