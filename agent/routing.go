package agent

import (
	"fmt"
	"net"
	"sort"

	corev1 "k8s.io/api/core/v1"

	"github.com/ternlabs/tern/cni"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/routing"
)

// nodeRouter keeps this node's routes to the other nodes' pod CIDRs
// (package routing) in line with the Node objects: every sync hands it the
// cluster's nodes, and routing changes only what differs.
type nodeRouter struct {
	r       *routing.Reconciler
	release func()
}

// newNodeRouter builds the routing of conf's network: its mode, the
// uplink (default: the interface of the default route), this node's
// InternalIP (nil: the uplink's first address) and, on the eBPF datapath,
// the datapath's table of remote pod CIDRs.
func newNodeRouter(conf *cni.NetConf, localIP net.IP) (*nodeRouter, error) {
	uplink := conf.Uplink
	if uplink == "" && conf.Routing == cni.RoutingVXLAN {
		up, err := ebpfdp.ResolveUplink("")
		if err != nil {
			return nil, fmt.Errorf("routing: %w", err)
		}
		uplink = up.Name
	}
	table, release, err := conf.RemoteTable()
	if err != nil {
		return nil, fmt.Errorf("routing: %w", err)
	}
	cfg := routing.Config{Mode: conf.Routing, LocalIP: localIP, Uplink: uplink}
	if table != nil {
		cfg.Table = table
	}
	r, err := routing.New(cfg)
	if err != nil {
		release()
		return nil, err
	}
	return &nodeRouter{r: r, release: release}, nil
}

// routingNodes turns Node objects into routing's node list, leaving out
// this node (self) and nodes without an IPv4 InternalIP or pod CIDR (not
// routable yet: they come in with the update that gives them one).
// Sorted by name, so equal inputs give equal lists.
func routingNodes(nodes []*corev1.Node, self string) []routing.Node {
	var out []routing.Node
	for _, n := range nodes {
		if n.Name == self {
			continue
		}
		ip := internalIP(n)
		if ip == nil {
			continue
		}
		var cidrs []net.IPNet
		for _, s := range nodePodCIDRs(n) {
			if _, c, err := net.ParseCIDR(s); err == nil && c.IP.To4() != nil {
				cidrs = append(cidrs, *c)
			}
		}
		if len(cidrs) == 0 {
			continue
		}
		out = append(out, routing.Node{Name: n.Name, IP: ip, PodCIDRs: cidrs})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// internalIP is the node's first IPv4 InternalIP address, nil without one.
func internalIP(n *corev1.Node) net.IP {
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip := net.ParseIP(a.Address); ip != nil && ip.To4() != nil {
			return ip.To4()
		}
	}
	return nil
}

func nodePodCIDRs(n *corev1.Node) []string {
	if len(n.Spec.PodCIDRs) > 0 {
		return n.Spec.PodCIDRs
	}
	if n.Spec.PodCIDR != "" {
		return []string{n.Spec.PodCIDR}
	}
	return nil
}
