// Package routing connects this node's pods to the pods of the other nodes.
// From the cluster's nodes (name, InternalIP, pod CIDRs: what the node agent
// reads from Node objects) it keeps the node's kernel routes, its VXLAN
// device and, on the eBPF datapath, the datapath's table of remote pod
// CIDRs in line with the desired set, by difference: what is right stays,
// what is missing or different is replaced in place, what is stale goes
// last. Nothing is flushed and rebuilt, so a resync never interrupts
// traffic.
//
// Two modes:
//   - native: a route per remote pod CIDR via that node's InternalIP; the
//     nodes must reach each other directly (one L2 segment, or a fabric
//     that routes the pod CIDRs itself).
//   - vxlan: one VXLAN device in external (collect_md) mode, UDP port 8472
//     (the Linux kernel's and flannel's default, not IANA's 4789), VNI 1.
//     Each remote pod CIDR gets a route via the remote node's InternalIP
//     on that device, with lightweight-tunnel encapsulation to that IP
//     (`ip route … encap ip id 1 dst <node> via <node> dev tern-vxlan
//     onlink`), and a permanent neighbour entry resolves the next hop to
//     the remote device's MAC, which is derived from its node's IP
//     (MACFor), so no node needs to learn another's MAC. The routes' source
//     is the node's InternalIP. The host stack, and with it the iptables
//     datapath, sends through these routes; the eBPF datapath sets the same
//     tunnel key itself (bpf/lib/remote.h), and its table also maps each
//     other node's InternalIP (/32) to the tunnel, so pods reach the other
//     nodes, and the nodes' own traffic is accepted, through it.
//
// Routes are marked with protocol RouteProtocol, which is how Sync tells
// its own routes from everyone else's.
//
// Forged VXLAN: the eBPF datapath's tern_from_tunnel accepts a
// decapsulated packet only from the node that owns its inner source's pod
// CIDR. Without a datapath table (the iptables datapath), Sync keeps an
// iptables chain, TERN-VXLAN-IN, that lets UDP to the VXLAN port in from
// the other nodes' InternalIPs only (filter.go).
package routing

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/datapath"
)

// Modes.
const (
	ModeNative = "native"
	ModeVXLAN  = "vxlan"
)

const (
	// DefaultDevice is the VXLAN device's name (no dot: its link pin on
	// bpffs is named after it, and bpffs refuses dots).
	DefaultDevice = "tern-vxlan"
	// DefaultPort is the VXLAN UDP port: the Linux default (8472).
	DefaultPort = 8472
	// VNI is the VXLAN network identifier of pod traffic (bpf/lib/remote.h
	// TERN_VXLAN_VNI).
	VNI = 1
	// VXLANOverhead is what encapsulation adds to a pod's packet: outer
	// IPv4 (20), UDP (8), VXLAN (8) and the inner Ethernet header (14).
	VXLANOverhead = 50
	// RouteProtocol marks the routes Sync owns (rtnetlink protocol 0x7e,
	// unassigned in /etc/iproute2/rt_protos).
	RouteProtocol netlink.RouteProtocol = 0x7e
	tunnelTTL                           = 64
)

// Node is another node of the cluster (or this one: Sync skips LocalIP).
type Node struct {
	Name     string
	IP       net.IP // InternalIP (IPv4)
	PodCIDRs []net.IPNet
}

// Config says how this node reaches the others.
type Config struct {
	Mode string // ModeNative (default) or ModeVXLAN
	// LocalIP is this node's InternalIP: its own entry in the node list
	// is skipped.
	LocalIP net.IP
	// Uplink is the interface toward the other nodes. VXLAN mode sizes
	// its device from it (MTU - VXLANOverhead); native mode does not
	// need it.
	Uplink string
	Device string // VXLAN device name; DefaultDevice when empty
	Port   int    // VXLAN UDP port; DefaultPort when 0
	// Table is the datapath's remote pod CIDR table (the eBPF datapath),
	// nil when kernel routes alone carry the traffic (iptables).
	Table datapath.RemoteTable
}

// Reconciler keeps one node's cross-node routing. Call its methods in the
// node's network namespace; they are not safe for concurrent use.
type Reconciler struct {
	cfg Config
	// srcIP is the node's InternalIP in VXLAN mode (LocalIP, else the
	// uplink's first address): the source of its encapsulated routes.
	srcIP net.IP
}

// New validates cfg and fills its defaults.
func New(cfg Config) (*Reconciler, error) {
	if cfg.Mode == "" {
		cfg.Mode = ModeNative
	}
	if cfg.Mode != ModeNative && cfg.Mode != ModeVXLAN {
		return nil, fmt.Errorf("routing mode %q is not %q or %q", cfg.Mode, ModeNative, ModeVXLAN)
	}
	if cfg.Device == "" {
		cfg.Device = DefaultDevice
	}
	if cfg.Port == 0 {
		cfg.Port = DefaultPort
	}
	if cfg.Mode == ModeVXLAN && cfg.Uplink == "" {
		return nil, errors.New("routing mode vxlan needs the uplink to size its device")
	}
	if cfg.LocalIP != nil && cfg.LocalIP.To4() == nil {
		return nil, fmt.Errorf("local IP %s is not IPv4", cfg.LocalIP)
	}
	return &Reconciler{cfg: cfg}, nil
}

// MACFor is the MAC of the VXLAN device of the node with InternalIP ip:
// locally administered, unicast, the IP in the last four bytes.
func MACFor(ip net.IP) net.HardwareAddr {
	v4 := ip.To4()
	return net.HardwareAddr{0x0e, 0x7e, v4[0], v4[1], v4[2], v4[3]}
}

// desired is one remote pod CIDR.
type desired struct {
	cidr   net.IPNet
	nodeIP net.IP
}

// plan turns the node list into the remote pod CIDRs, refusing what cannot
// be routed (non-IPv4, one CIDR claimed by two nodes).
func (r *Reconciler) plan(nodes []Node) ([]desired, []net.IP, error) {
	var (
		out   []desired
		ips   []net.IP
		owner = map[string]string{}
	)
	for _, n := range nodes {
		ip := n.IP.To4()
		if ip == nil {
			return nil, nil, fmt.Errorf("node %s: InternalIP %s is not IPv4", n.Name, n.IP)
		}
		if r.cfg.LocalIP != nil && ip.Equal(r.cfg.LocalIP) {
			continue
		}
		ips = append(ips, ip)
		for _, c := range n.PodCIDRs {
			ones, bits := c.Mask.Size()
			if c.IP.To4() == nil || (bits != 32 && bits != 128) {
				return nil, nil, fmt.Errorf("node %s: pod CIDR %s is not IPv4", n.Name, c.String())
			}
			if bits == 128 {
				ones -= 96
			}
			cidr := net.IPNet{IP: c.IP.To4().Mask(net.CIDRMask(ones, 32)), Mask: net.CIDRMask(ones, 32)}
			if prev, ok := owner[cidr.String()]; ok && prev != n.Name {
				return nil, nil, fmt.Errorf("pod CIDR %s claimed by nodes %s and %s", cidr.String(), prev, n.Name)
			}
			owner[cidr.String()] = n.Name
			out = append(out, desired{cidr: cidr, nodeIP: ip})
		}
	}
	return out, ips, nil
}

// Sync makes this node's routing match nodes (every node of the cluster;
// this node's own entry is skipped). Order: the VXLAN device and its
// decapsulation program, neighbour entries and routes for new or changed
// CIDRs, the datapath's table, and only then stale routes and neighbour
// entries, so that a CIDR never points at a next hop that is not there.
func (r *Reconciler) Sync(nodes []Node) error {
	want, nodeIPs, err := r.plan(nodes)
	if err != nil {
		return err
	}
	var dev netlink.Link
	if r.cfg.Mode == ModeVXLAN {
		if dev, err = r.ensureDevice(); err != nil {
			return err
		}
		if r.cfg.Table != nil {
			if err := r.cfg.Table.AttachTunnel(dev.Attrs().Name, dev.Attrs().Index); err != nil {
				return err
			}
		}
		for _, ip := range nodeIPs {
			n := &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: netlink.FAMILY_V4,
				State: netlink.NUD_PERMANENT, IP: ip, HardwareAddr: MACFor(ip)}
			if err := netlink.NeighSet(n); err != nil {
				return fmt.Errorf("neighbour %s on %s: %w", ip, r.cfg.Device, err)
			}
		}
	}
	have, err := ownRoutes()
	if err != nil {
		return err
	}
	keep := map[string]bool{}
	for _, d := range want {
		keep[d.cidr.String()] = true
		rt := r.route(d, dev)
		if cur, ok := have[d.cidr.String()]; ok && sameRoute(cur, rt) {
			continue
		}
		if err := netlink.RouteReplace(rt); err != nil {
			return fmt.Errorf("route %s via %s: %w", d.cidr.String(), d.nodeIP, err)
		}
	}
	if r.cfg.Table != nil {
		remotes := make([]datapath.Remote, 0, len(want))
		for _, d := range want {
			rm := datapath.Remote{CIDR: d.cidr, NodeIP: d.nodeIP}
			if dev != nil {
				rm.TunnelIfindex = dev.Attrs().Index
			}
			remotes = append(remotes, rm)
		}
		if dev != nil {
			// Each node's own address too (table only, never a kernel
			// route: the underlay reaches it): a pod's packets to
			// another node go through the tunnel, and the node's own
			// traffic to this node's pods is accepted from the tunnel
			// as that node's (bpf/tc_tunnel.c).
			for _, ip := range nodeIPs {
				remotes = append(remotes, datapath.Remote{CIDR: net.IPNet{IP: ip, Mask: net.CIDRMask(32, 32)},
					NodeIP: ip, TunnelIfindex: dev.Attrs().Index})
			}
		}
		if err := r.cfg.Table.SyncRemotes(remotes); err != nil {
			return err
		}
	}
	if dev != nil && r.cfg.Table == nil {
		if err := r.syncVXLANFilter(nodeIPs); err != nil {
			return err
		}
	}
	var errs []error
	for cidr, rt := range have {
		if keep[cidr] {
			continue
		}
		if err := netlink.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("remove route %s: %w", cidr, err))
		}
	}
	if dev != nil {
		if err := removeStaleNeighs(dev, nodeIPs); err != nil {
			errs = append(errs, err)
		}
	} else if err := r.removeDevice(); err != nil {
		// Native mode: a device left from VXLAN mode goes once no
		// route uses it.
		errs = append(errs, err)
	}
	if dev == nil && r.cfg.Table == nil {
		if err := r.removeVXLANFilter(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Teardown removes everything Sync made: table entries, routes, the
// VXLAN device and its program.
func (r *Reconciler) Teardown() error {
	var errs []error
	if r.cfg.Table != nil {
		if err := r.cfg.Table.SyncRemotes(nil); err != nil {
			errs = append(errs, err)
		}
	}
	have, err := ownRoutes()
	if err != nil {
		errs = append(errs, err)
	}
	for cidr, rt := range have {
		if err := netlink.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("remove route %s: %w", cidr, err))
		}
	}
	if err := r.removeDevice(); err != nil {
		errs = append(errs, err)
	}
	if r.cfg.Table == nil {
		if err := r.removeVXLANFilter(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (r *Reconciler) route(d desired, dev netlink.Link) *netlink.Route {
	dst := d.cidr
	rt := &netlink.Route{Dst: &dst, Gw: d.nodeIP, Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}
	if dev != nil {
		rt.LinkIndex = dev.Attrs().Index
		rt.Flags = int(netlink.FLAG_ONLINK)
		rt.Encap = &ipEncap{ID: VNI, Dst: d.nodeIP, TTL: tunnelTTL}
		// The node's own traffic to other nodes' pods leaves with the
		// node's InternalIP, which the other nodes accept from the
		// tunnel as this node's; left to the kernel, the source would
		// be the first local address, e.g. a pods' gateway on lo, to
		// which no answer finds its way back.
		if r.srcIP != nil && !r.srcIP.IsUnspecified() {
			rt.Src = r.srcIP
		}
	}
	return rt
}

// sameRoute compares what Sync sets. The encapsulation is not compared
// (netlink does not decode it); its destination is always the gateway.
func sameRoute(cur netlink.Route, want *netlink.Route) bool {
	if !cur.Gw.Equal(want.Gw) || (want.Src != nil && !cur.Src.Equal(want.Src)) {
		return false
	}
	if want.LinkIndex != 0 {
		return cur.LinkIndex == want.LinkIndex && cur.Flags&int(netlink.FLAG_ONLINK) != 0
	}
	return true
}

// ownRoutes lists the main table's routes with RouteProtocol, by
// destination.
func ownRoutes() (map[string]netlink.Route, error) {
	routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := map[string]netlink.Route{}
	for _, rt := range routes {
		if rt.Dst != nil {
			out[rt.Dst.String()] = rt
		}
	}
	return out, nil
}

// ensureDevice creates the VXLAN device or brings an existing one in line
// (MTU, MAC, up). A link of that name that is not an external VXLAN
// device on the configured port is an error, not something to replace.
func (r *Reconciler) ensureDevice() (netlink.Link, error) {
	up, err := netlinksafe.LinkByName(r.cfg.Uplink)
	if err != nil {
		return nil, fmt.Errorf("uplink %s: %w", r.cfg.Uplink, err)
	}
	mtu := up.Attrs().MTU - VXLANOverhead
	r.srcIP = r.localIP(up)
	mac := MACFor(r.srcIP)
	lk, err := netlinksafe.LinkByName(r.cfg.Device)
	if err != nil {
		if !errors.As(err, &netlink.LinkNotFoundError{}) {
			return nil, fmt.Errorf("VXLAN device %s: %w", r.cfg.Device, err)
		}
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: r.cfg.Device, MTU: mtu, HardwareAddr: mac},
			FlowBased: true,
			Port:      r.cfg.Port,
			Learning:  false,
		}
		if err := netlink.LinkAdd(vx); err != nil {
			return nil, fmt.Errorf("create VXLAN device %s: %w", r.cfg.Device, err)
		}
		if lk, err = netlinksafe.LinkByName(r.cfg.Device); err != nil {
			return nil, fmt.Errorf("VXLAN device %s: %w", r.cfg.Device, err)
		}
	}
	vx, ok := lk.(*netlink.Vxlan)
	if !ok || !vx.FlowBased || vx.Port != r.cfg.Port {
		return nil, fmt.Errorf("link %s exists and is not an external VXLAN device on port %d", r.cfg.Device, r.cfg.Port)
	}
	if lk.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(lk, mtu); err != nil {
			return nil, fmt.Errorf("set MTU of %s: %w", r.cfg.Device, err)
		}
	}
	if !slices.Equal(lk.Attrs().HardwareAddr, mac) {
		if err := netlink.LinkSetHardwareAddr(lk, mac); err != nil {
			return nil, fmt.Errorf("set MAC of %s: %w", r.cfg.Device, err)
		}
	}
	if lk.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(lk); err != nil {
			return nil, fmt.Errorf("set %s up: %w", r.cfg.Device, err)
		}
	}
	return lk, nil
}

// localIP is LocalIP, or the uplink's first IPv4 address.
func (r *Reconciler) localIP(up netlink.Link) net.IP {
	if r.cfg.LocalIP != nil {
		return r.cfg.LocalIP.To4()
	}
	addrs, err := netlinksafe.AddrList(up, netlink.FAMILY_V4)
	if err == nil {
		for _, a := range addrs {
			if a.Scope == int(netlink.SCOPE_UNIVERSE) {
				return a.IP.To4()
			}
		}
	}
	return net.IPv4zero.To4()
}

func (r *Reconciler) removeDevice() error {
	lk, err := netlinksafe.LinkByName(r.cfg.Device)
	if err != nil {
		if errors.As(err, &netlink.LinkNotFoundError{}) {
			return nil
		}
		return fmt.Errorf("VXLAN device %s: %w", r.cfg.Device, err)
	}
	if vx, ok := lk.(*netlink.Vxlan); !ok || !vx.FlowBased {
		return nil // not ours
	}
	var errs []error
	if r.cfg.Table != nil {
		if err := r.cfg.Table.DetachTunnel(r.cfg.Device); err != nil {
			errs = append(errs, err)
		}
	}
	if err := netlink.LinkDel(lk); err != nil {
		errs = append(errs, fmt.Errorf("remove VXLAN device %s: %w", r.cfg.Device, err))
	}
	return errors.Join(errs...)
}

// removeStaleNeighs removes the permanent neighbour entries on the VXLAN
// device of nodes that are gone.
func removeStaleNeighs(dev netlink.Link, nodeIPs []net.IP) error {
	var (
		neighs []netlink.Neigh
		err    error
	)
	for range 5 {
		neighs, err = netlink.NeighList(dev.Attrs().Index, netlink.FAMILY_V4)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("neighbours of %s: %w", dev.Attrs().Name, err)
	}
	var errs []error
	for _, n := range neighs {
		if n.State&netlink.NUD_PERMANENT == 0 || slices.ContainsFunc(nodeIPs, n.IP.Equal) {
			continue
		}
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove neighbour %s: %w", n.IP, err))
		}
	}
	return errors.Join(errs...)
}

// ipEncap is the lightweight-tunnel IP encapsulation of a route
// (LWTUNNEL_ENCAP_IP, `encap ip`), which netlink does not provide: the
// tunnel metadata an external VXLAN device sends with.
type ipEncap struct {
	ID  uint64
	Dst net.IP
	TTL uint8
}

// Attributes of LWTUNNEL_ENCAP_IP (include/uapi/linux/lwtunnel.h).
const (
	lwtunnelIPID  = 1
	lwtunnelIPDst = 2
	lwtunnelIPTTL = 4
)

func (e *ipEncap) Type() int { return nl.LWTUNNEL_ENCAP_IP }

func (e *ipEncap) Decode([]byte) error {
	return errors.New("decoding an IP encapsulation is not supported")
}

func (e *ipEncap) Encode() ([]byte, error) {
	dst := e.Dst.To4()
	if dst == nil {
		return nil, fmt.Errorf("tunnel destination %s is not IPv4", e.Dst)
	}
	id := binary.BigEndian.AppendUint64(nil, e.ID) // __be64 tunnel id
	var out []byte
	out = append(out, nl.NewRtAttr(lwtunnelIPID, id).Serialize()...)
	out = append(out, nl.NewRtAttr(lwtunnelIPDst, dst).Serialize()...)
	out = append(out, nl.NewRtAttr(lwtunnelIPTTL, []byte{e.TTL}).Serialize()...)
	return out, nil
}

func (e *ipEncap) String() string {
	return fmt.Sprintf("ip id %d dst %s ttl %d", e.ID, e.Dst, e.TTL)
}

func (e *ipEncap) Equal(x netlink.Encap) bool {
	o, ok := x.(*ipEncap)
	return ok && e.ID == o.ID && e.Dst.Equal(o.Dst) && e.TTL == o.TTL
}
