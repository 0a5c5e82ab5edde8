package cni

import (
	"fmt"
	"net"

	"github.com/ternlabs/tern/datapath"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/datapath/iptables"
	"github.com/ternlabs/tern/loader"
)

// newDatapath builds the configured datapath. The iptables datapath needs
// the pod subnet and gateway for its bridge; they come from the pod's
// address (subnet may be nil when unknown, e.g. DEL without a record). The
// eBPF datapath gets the SNAT settings and the node's uplink (name,
// ifindex, first IPv4 address), looked up in the namespace the plugin runs
// in, the node's.
func (c *NetConf) newDatapath(subnet *net.IPNet, gateway net.IP) (datapath.Datapath, error) {
	switch c.Datapath {
	case DatapathEBPF:
		cfg := ebpfdp.Config{
			BPFFSDir:           c.BPFFSDir,
			StateDir:           c.StateDir,
			Attach:             c.attachMode,
			Network:            c.Name,
			IPMasq:             c.masquerade(),
			ClusterCIDR:        c.clusterCIDR,
			NonMasqueradeCIDRs: c.nonMasq,
			ServiceCIDRs:       c.serviceCIDR,
			LoadBalancer:       c.Services == ServicesEBPF,
			Acceleration:       ebpfdp.Acceleration(c.NodePortAcceleration),
			PodSubnet:          subnet,
			NAT: ebpfdp.NAT{
				PortMin:           c.natPortMin,
				PortMax:           c.natPortMax,
				MemoryMiB:         c.NATMemoryMiB,
				LBLoopback:        c.lbLoopback,
				PolicyFlowsPerPod: c.PolicyFlowsPerPod,
			},
		}
		// Resolved on every command, but only ADD and STATUS fail when
		// the configured uplink is missing: DEL, CHECK and GC must work
		// on a node that lost it.
		cfg.Uplink, cfg.UplinkErr = ebpfdp.ResolveUplink(c.Uplink)
		if c.Services == ServicesEBPF {
			cfg.HostServicesCgroup = c.hostServicesCgroup()
		}
		return ebpfdp.New(cfg), nil
	case DatapathIPTables:
		if subnet == nil && c.pool != nil {
			subnet, gateway = &c.pool.Subnet, c.pool.Gateway
		}
		if subnet == nil || gateway == nil {
			return nil, fmt.Errorf("iptables datapath: pod subnet and gateway unknown")
		}
		return iptables.New(iptables.Config{
			Network:            c.Name,
			Bridge:             c.Bridge,
			MTU:                c.MTU,
			Subnet:             *subnet,
			Gateway:            gateway,
			ClusterCIDR:        c.clusterCIDR,
			IPMasq:             c.masquerade(),
			NonMasqueradeCIDRs: c.nonMasq,
			ServiceCIDRs:       c.serviceCIDR,
		})
	}
	return nil, fmt.Errorf("unknown datapath %q", c.Datapath)
}

// Bounds of natMemoryMiB, checked by ParseConfig.
const (
	ebpfMinNATMemoryMiB = ebpfdp.MinNATMemoryMiB
	ebpfMaxNATMemoryMiB = ebpfdp.MaxNATMemoryMiB
)

// closeDatapath releases handles some datapaths hold.
func closeDatapath(dp datapath.Datapath) {
	if c, ok := dp.(interface{ Close() }); ok {
		c.Close()
	}
}

// hostServicesCgroup is where the socket programs of services "ebpf"
// attach: the configured directory, else the cgroup2 root. A node without
// a cgroup v2 hierarchy gets none (its pods' Services still work; its own
// processes do not reach them).
func (c *NetConf) hostServicesCgroup() string {
	switch c.HostServicesCgroup {
	case HostServicesNone:
		return ""
	case "":
		root, err := loader.Cgroup2Root()
		if err != nil {
			return ""
		}
		return root
	}
	return c.HostServicesCgroup
}
