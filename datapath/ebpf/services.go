package ebpf

import (
	"errors"
	"fmt"
	"net"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// syncServiceCIDRs makes tern_service_cidrs hold exactly the configured
// Service CIDRs (services: "kube-proxy"). The map is node-wide, like
// tern_nomasq: networks sharing a bpffsDir should agree on it. Pod traffic
// to these ranges is left to the host stack, where kube-proxy's DNAT is;
// its replies come back through the stack (bpf/lib/stack.h).
func (d *Datapath) syncServiceCIDRs() error {
	m, err := d.objs.Map(ternbpf.TernMapTernServiceCidrs)
	if err != nil {
		return err
	}
	return syncLPMSet(m, d.cfg.ServiceCIDRs, "service CIDR")
}

// forgetStackFlows deletes the tern_stack_ct flows with an address drop
// selects at either end: a reused pod IP must not send its answers to the
// host stack for a flow of the pod it replaced.
func (d *Datapath) forgetStackFlows(drop func(ip net.IP) bool) error {
	if err := d.open(); err != nil {
		return err
	}
	m, err := d.objs.Map(ternbpf.TernMapTernStackCt)
	if err != nil {
		return err
	}
	var (
		key   ternbpf.TernPolicyCtKey
		val   ternbpf.TernPolicyCtEntry
		stale []ternbpf.TernPolicyCtKey
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		if drop(natIP(key.LoAddr)) || drop(natIP(key.HiAddr)) {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernStackCt, err)
	}
	var errs []error
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete from %s: %w", ternbpf.TernMapTernStackCt, err))
		}
	}
	return errors.Join(errs...)
}
