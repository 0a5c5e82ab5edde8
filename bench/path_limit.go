package bench

import (
	"context"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
)

// limitGateway is the address the limit path's pods route through. Nothing
// owns it: a permanent neighbour entry in the pod maps it to the MAC of
// the host-side veth, so the pod never sends ARP for it.
var limitGateway = net.IPv4(169, 254, 1, 1).To4()

// limitPodIPs are the client and server addresses of the limit path.
var limitPodIPs = [2]net.IP{net.IPv4(10, 99, 0, 2).To4(), net.IPv4(10, 99, 0, 3).To4()}

const limitDescription = "bare veth pair per pod into the node netns, /32 host routes and permanent neighbours, ip_forward=1; no bridge, no netfilter rule, no BPF program: what the kernel can do with nothing in the way"

// setupLimit wires the limit path: per pod a veth pair (eth0 in the pod,
// tl<tag><c|s> in the node), the pod address as a /32 with
// "default via 169.254.1.1 dev eth0 onlink" and a permanent neighbour for
// the gateway, and in the node a /32 route and a permanent neighbour per
// pod.
func (r *runner) setupLimit(ctx context.Context) (*Topology, error) {
	t, err := r.newTopology(PathLimit)
	if err != nil {
		return t, err
	}
	if err := t.Node.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		return t, err
	}
	for i, p := range []*Pod{t.Client, t.Server} {
		host := fmt.Sprintf("tl%s%c", r.tag, "cs"[i])
		if err := wireLimitPod(t.Node, p, host, limitPodIPs[i]); err != nil {
			return t, fmt.Errorf("wire %s pod: %w", p.Name, err)
		}
	}
	t.verifier = &limitVerifier{t: t}
	t.noPolicy = "no CNI plugin: nothing enforces NetworkPolicy on this path"
	return t, r.finish(ctx, t)
}

func wireLimitPod(node *Netns, p *Pod, host string, ip net.IP) error {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: host, MTU: 1500},
		PeerName:      "eth0",
		PeerNamespace: netlink.NsFd(int(p.NS.ns.Fd())),
	}
	if err := node.nl.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s: %w", host, err)
	}
	hostLink, err := node.nl.LinkByName(host)
	if err != nil {
		return err
	}
	podLink, err := p.NS.nl.LinkByName("eth0")
	if err != nil {
		return err
	}
	host32 := &net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)}

	// Pod side.
	if err := p.NS.nl.AddrAdd(podLink, &netlink.Addr{IPNet: host32}); err != nil {
		return fmt.Errorf("address %s: %w", host32, err)
	}
	if err := p.NS.nl.LinkSetUp(podLink); err != nil {
		return err
	}
	if err := p.NS.nl.NeighAdd(&netlink.Neigh{
		LinkIndex: podLink.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: limitGateway, HardwareAddr: hostLink.Attrs().HardwareAddr,
	}); err != nil {
		return fmt.Errorf("gateway neighbour: %w", err)
	}
	if err := p.NS.nl.RouteAdd(&netlink.Route{
		LinkIndex: podLink.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Gw: limitGateway, Flags: int(netlink.FLAG_ONLINK),
	}); err != nil {
		return fmt.Errorf("default route: %w", err)
	}

	// Node side.
	if err := node.nl.LinkSetUp(hostLink); err != nil {
		return err
	}
	if err := node.nl.RouteAdd(&netlink.Route{
		LinkIndex: hostLink.Attrs().Index, Dst: host32, Scope: netlink.SCOPE_LINK,
	}); err != nil {
		return fmt.Errorf("host route %s: %w", host32, err)
	}
	if err := node.nl.NeighAdd(&netlink.Neigh{
		LinkIndex: hostLink.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: ip, HardwareAddr: podLink.Attrs().HardwareAddr,
	}); err != nil {
		return fmt.Errorf("pod neighbour: %w", err)
	}
	p.IP = ip
	p.HostVeth = host
	p.HostIfindex = hostLink.Attrs().Index
	return nil
}
