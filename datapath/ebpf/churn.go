package ebpf

import (
	"encoding/binary"
	"net"

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
	return forgetFlows(ternbpf.TernMapTernPolicyCt, ct, func(ip net.IP) bool {
		return drop[binary.NativeEndian.Uint32(ip.To4())]
	})
}
