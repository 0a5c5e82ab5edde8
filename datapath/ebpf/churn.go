package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/policy/compile"
)

// forgetChurned removes the policy conntrack entries of every address whose
// pod identity changed between prev and next (compile.ChurnedIPs: a remote
// pod's IP reused by a pod with other labels). It runs after next is in the
// maps, so the flows' next packets are decided again, under the identity
// the address has now: no flow keeps an allowance of the pod that had the
// address before. Called with the policy lock held.
func (d *Datapath) forgetChurned(prev, next *compile.RuleSet) error {
	ips := compile.ChurnedIPs(prev, next)
	if len(ips) == 0 {
		return nil
	}
	drop := map[uint32]bool{}
	for _, ip := range ips {
		if v4 := ip.To4(); v4 != nil {
			drop[binary.NativeEndian.Uint32(v4)] = true
		}
	}
	ct, err := d.objs.Map(ternbpf.TernMapTernPolicyCt)
	if err != nil {
		return err
	}
	var (
		key   ternbpf.TernPolicyCtKey
		val   ternbpf.TernPolicyCtEntry
		stale []ternbpf.TernPolicyCtKey
	)
	it := ct.Iterate()
	for it.Next(&key, &val) {
		if drop[key.LoAddr] || drop[key.HiAddr] {
			stale = append(stale, key)
		}
	}
	var errs []error
	if err := it.Err(); err != nil {
		errs = append(errs, fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernPolicyCt, err))
	}
	for _, k := range stale {
		if err := deleteKey(ct, k); err != nil {
			errs = append(errs, fmt.Errorf("delete from %s: %w", ternbpf.TernMapTernPolicyCt, err))
		}
	}
	return errors.Join(errs...)
}
