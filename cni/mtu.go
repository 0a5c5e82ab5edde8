package cni

import (
	"fmt"

	"github.com/containernetworking/plugins/pkg/netlinksafe"

	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/routing"
)

// podMTU is the MTU of a new pod's veth: the configured one, or in VXLAN
// mode the uplink's MTU minus the encapsulation's overhead, so that a pod's
// full-size packet still fits the underlay once encapsulated. 0 leaves the
// kernel default (native routing: the pod's packets cross the fabric as
// they are).
func (c *NetConf) podMTU() (int, error) {
	if c.MTU != 0 || c.Routing != RoutingVXLAN {
		return c.MTU, nil
	}
	up, err := ebpfdp.ResolveUplink(c.Uplink)
	if err != nil {
		return 0, err
	}
	if up.Ifindex == 0 {
		return 0, fieldErr("uplink", "routing vxlan needs an uplink to size the pod MTU (no default route, none named)")
	}
	lk, err := netlinksafe.LinkByName(up.Name)
	if err != nil {
		return 0, fmt.Errorf("uplink %s: %w", up.Name, err)
	}
	return lk.Attrs().MTU - routing.VXLANOverhead, nil
}
