package ebpf

import (
	"net"

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
	return forgetFlows(ternbpf.TernMapTernStackCt, m, drop)
}
