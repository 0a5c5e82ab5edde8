// Package iptables is Tern's fallback datapath: pods hang off a Linux
// bridge, and a pair of iptables chains per network lets their traffic
// through a FORWARD DROP policy and masquerades what leaves the cluster.
//
// It is a first-class mode for nodes without eBPF and the baseline the ebpf
// datapath is benchmarked against.
//
// Every method runs in the network namespace of the node, on the calling OS
// thread: the caller must have locked it (ns.Do does). Netlink sockets, the
// /proc/sys files and the iptables processes all inherit that namespace.
//
// Node-wide state, per network:
//
//   - the bridge (Config.Bridge) holding Gateway/prefix of Subnet;
//   - net.ipv4.ip_forward=1 and net.bridge.bridge-nf-call-iptables=1;
//   - filter chain TERN-FWD-<hash>, jumped to from FORWARD (first rule),
//     accepting replies (conntrack), dropping pods' packets to a Service
//     CIDR that kube-proxy left untranslated, sending new connections through the
//     NetworkPolicy dispatch chain TERN-POL-<hash> (see policy.go), then
//     accepting what enters or leaves the bridge;
//   - with NetworkPolicy in force, ipsets TERN-C-<hash>-* and chains
//     TERN-<hash>-* (policy.go);
//   - nftables table bridge tern_<hash>: per host veth, anti-spoofing of
//     IPv4 and ARP and a drop of every other ethertype (antispoof.go);
//   - with IPMasq, nat chain TERN-NAT-<hash>, jumped to from POSTROUTING for
//     sources in Subnet, returning for cluster and non-masquerade
//     destinations and masquerading the rest (multicast excepted).
//
// <hash> is the first 8 hex digits of the SHA-256 of the network name, so
// several networks coexist on one node.
package iptables

import (
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/datapath"
)

// DefaultBridge is the bridge name used when Config.Bridge is empty.
const DefaultBridge = "tern0"

// Config describes one network's datapath on a node.
type Config struct {
	Network            string     // CNI network name; names the chains and tags the jump rules
	Bridge             string     // bridge name, DefaultBridge when empty
	MTU                int        // bridge and host veth MTU; 0 leaves the kernel's default
	Subnet             net.IPNet  // the node's pod pool, e.g. 10.244.1.0/24
	Gateway            net.IP     // assigned to the bridge as Gateway/prefix of Subnet
	ClusterCIDR        *net.IPNet // destinations never masqueraded; nil means Subnet
	IPMasq             bool       // masquerade pod traffic leaving ClusterCIDR
	NonMasqueradeCIDRs []net.IPNet
	// ServiceCIDRs are the ranges kube-proxy's ClusterIPs come from: a
	// pod's packet still addressed to one in FORWARD had no kube-proxy
	// rule (no such Service or port) and is dropped, as the eBPF datapath
	// drops it at the uplink; masqueraded, it would leave the node and
	// anything out there could answer for the ClusterIP.
	ServiceCIDRs []net.IPNet
}

// Datapath is the bridge-and-iptables datapath of one network.
type Datapath struct {
	cfg      Config
	fwdChain string
	natChain string
	comment  string
	nftTable string // bridge-family table: anti-spoofing and L2 isolation (antispoof.go)
	pol      *Policy
}

var _ datapath.Datapath = (*Datapath)(nil)

// New validates cfg and returns the datapath. It touches nothing.
func New(cfg Config) (*Datapath, error) {
	if cfg.Network == "" {
		return nil, errors.New("iptables datapath: network name is empty")
	}
	if cfg.Bridge == "" {
		cfg.Bridge = DefaultBridge
	}
	if len(cfg.Bridge) > 15 {
		return nil, fmt.Errorf("iptables datapath: bridge name %q is longer than 15 bytes", cfg.Bridge)
	}
	if cfg.MTU < 0 {
		return nil, fmt.Errorf("iptables datapath: negative MTU %d", cfg.MTU)
	}
	subnet, err := ipv4Net(cfg.Subnet)
	if err != nil {
		return nil, fmt.Errorf("iptables datapath: subnet: %w", err)
	}
	cfg.Subnet = subnet
	gw := cfg.Gateway.To4()
	if gw == nil {
		return nil, fmt.Errorf("iptables datapath: gateway %q is not an IPv4 address", cfg.Gateway)
	}
	if !subnet.Contains(gw) {
		return nil, fmt.Errorf("iptables datapath: gateway %s is outside subnet %s", gw, &subnet)
	}
	cfg.Gateway = gw
	if cfg.ClusterCIDR != nil {
		cc, err := ipv4Net(*cfg.ClusterCIDR)
		if err != nil {
			return nil, fmt.Errorf("iptables datapath: cluster CIDR: %w", err)
		}
		cfg.ClusterCIDR = &cc
	}
	nonMasq := make([]net.IPNet, 0, len(cfg.NonMasqueradeCIDRs))
	for _, n := range cfg.NonMasqueradeCIDRs {
		nn, err := ipv4Net(n)
		if err != nil {
			return nil, fmt.Errorf("iptables datapath: non-masquerade CIDR: %w", err)
		}
		nonMasq = append(nonMasq, nn)
	}
	cfg.NonMasqueradeCIDRs = nonMasq
	svc := make([]net.IPNet, 0, len(cfg.ServiceCIDRs))
	for _, n := range cfg.ServiceCIDRs {
		nn, err := ipv4Net(n)
		if err != nil {
			return nil, fmt.Errorf("iptables datapath: service CIDR: %w", err)
		}
		svc = append(svc, nn)
	}
	cfg.ServiceCIDRs = svc

	fwd, nat := ChainNames(cfg.Network)
	comment := "tern:" + cfg.Network
	if len(comment) > maxCommentLen {
		comment = comment[:maxCommentLen]
	}
	pol, err := NewPolicy(cfg.Network)
	if err != nil {
		return nil, err
	}
	return &Datapath{cfg: cfg, fwdChain: fwd, natChain: nat, comment: comment, nftTable: nftTable(cfg.Network), pol: pol}, nil
}

// ipv4Net returns n masked to its prefix, or an error if it is not IPv4.
func ipv4Net(n net.IPNet) (net.IPNet, error) {
	ip := n.IP.To4()
	if ip == nil || n.Mask == nil {
		return net.IPNet{}, fmt.Errorf("%q is not an IPv4 prefix", n.String())
	}
	ones, bits := n.Mask.Size()
	if bits != 32 && bits != 128 {
		return net.IPNet{}, fmt.Errorf("%q has an invalid mask", n.String())
	}
	if bits == 128 {
		if ones < 96 {
			return net.IPNet{}, fmt.Errorf("%q has an invalid mask", n.String())
		}
		ones -= 96
	}
	mask := net.CIDRMask(ones, 32)
	return net.IPNet{IP: ip.Mask(mask), Mask: mask}, nil
}

// EnsureNode creates or repairs the bridge, the sysctls, the chains and the
// jump rules. It is idempotent; concurrent calls, from goroutines or from
// processes, are serialised by a file lock around the iptables changes.
func (d *Datapath) EnsureNode() error {
	if err := d.ensureBridge(); err != nil {
		return err
	}
	for _, s := range []struct{ name, value string }{
		{"net.ipv4.ip_forward", "1"},
		{"net.bridge.bridge-nf-call-iptables", "1"},
	} {
		if err := ensureSysctl(s.name, s.value); err != nil {
			return err
		}
	}
	return d.ensureRules()
}

func ensureSysctl(name, value string) error {
	cur, err := sysctl.Sysctl(name)
	if err == nil && strings.TrimSpace(cur) == value {
		return nil
	}
	if _, err := sysctl.Sysctl(name, value); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

func (d *Datapath) ensureBridge() error {
	name := d.cfg.Bridge
	attrs := netlink.NewLinkAttrs()
	attrs.Name = name
	if d.cfg.MTU > 0 {
		attrs.MTU = d.cfg.MTU
	}
	created := false
	err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs})
	switch {
	case err == nil:
		created = true
	case errors.Is(err, errEEXIST):
	default:
		return fmt.Errorf("create bridge %s: %w", name, err)
	}
	br, err := d.bridge()
	if err != nil {
		return err
	}
	if created {
		// Pin the bridge's MAC to the one it was born with. Otherwise the
		// bridge takes the lowest MAC of its ports and changes as pods
		// come and go, invalidating every pod's ARP entry for the gateway.
		if err := netlink.LinkSetHardwareAddr(br, br.Attrs().HardwareAddr); err != nil {
			return fmt.Errorf("pin MAC of bridge %s: %w", name, err)
		}
	}
	if d.cfg.MTU > 0 && br.Attrs().MTU != d.cfg.MTU {
		if err := netlink.LinkSetMTU(br, d.cfg.MTU); err != nil {
			return fmt.Errorf("set MTU %d on bridge %s: %w", d.cfg.MTU, name, err)
		}
	}
	addr := &netlink.Addr{IPNet: d.gatewayNet()}
	if err := netlink.AddrAdd(br, addr); err != nil && !errors.Is(err, errEEXIST) {
		return fmt.Errorf("add address %s to bridge %s: %w", addr.IPNet, name, err)
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(br); err != nil {
			return fmt.Errorf("bring bridge %s up: %w", name, err)
		}
	}
	return nil
}

// bridge returns the configured bridge, an error wrapping errNotFound if it
// does not exist, or an error if the name belongs to some other kind of link.
func (d *Datapath) bridge() (*netlink.Bridge, error) {
	l, err := netlinksafe.LinkByName(d.cfg.Bridge)
	if err != nil {
		if isLinkNotFound(err) {
			return nil, fmt.Errorf("bridge %s does not exist: %w", d.cfg.Bridge, errNotFound)
		}
		return nil, fmt.Errorf("look up bridge %s: %w", d.cfg.Bridge, err)
	}
	br, ok := l.(*netlink.Bridge)
	if !ok {
		return nil, fmt.Errorf("link %s is a %s, not a bridge", d.cfg.Bridge, l.Type())
	}
	return br, nil
}

func (d *Datapath) gatewayNet() *net.IPNet {
	return &net.IPNet{IP: d.cfg.Gateway, Mask: d.cfg.Subnet.Mask}
}

// AddEndpoint attaches the host veth to the bridge, turns hairpin mode on
// (so a pod can reach itself through a service address), sets the MTU and
// brings the veth up. On failure it detaches the veth again.
func (d *Datapath) AddEndpoint(ep *datapath.Endpoint) (err error) {
	br, err := d.bridge()
	if err != nil {
		return fmt.Errorf("add endpoint %s: %w", ep.HostVeth, err)
	}
	veth, err := netlinksafe.LinkByName(ep.HostVeth)
	if err != nil {
		return fmt.Errorf("add endpoint: look up host veth %s: %w", ep.HostVeth, err)
	}
	// Anti-spoofing first: no frame of the pod is bridged unchecked.
	if err := d.addAntispoof(ep); err != nil {
		return fmt.Errorf("add endpoint %s: %w", ep.HostVeth, err)
	}
	defer func() {
		if err == nil {
			return
		}
		if uerr := d.delAntispoof(ep.HostVeth); uerr != nil {
			err = errors.Join(err, fmt.Errorf("undo: %w", uerr))
		}
	}()
	if err := netlink.LinkSetMaster(veth, br); err != nil {
		return fmt.Errorf("attach host veth %s to bridge %s: %w", ep.HostVeth, d.cfg.Bridge, err)
	}
	defer func() {
		if err == nil {
			return
		}
		if uerr := netlink.LinkSetNoMaster(veth); uerr != nil && !isLinkNotFound(uerr) {
			err = errors.Join(err, fmt.Errorf("undo: detach host veth %s: %w", ep.HostVeth, uerr))
		}
	}()
	if err := netlink.LinkSetHairpin(veth, true); err != nil {
		return fmt.Errorf("enable hairpin on %s: %w", ep.HostVeth, err)
	}
	if d.cfg.MTU > 0 && veth.Attrs().MTU != d.cfg.MTU {
		if err := netlink.LinkSetMTU(veth, d.cfg.MTU); err != nil {
			return fmt.Errorf("set MTU %d on host veth %s: %w", d.cfg.MTU, ep.HostVeth, err)
		}
	}
	if err := netlink.LinkSetUp(veth); err != nil {
		return fmt.Errorf("bring host veth %s up: %w", ep.HostVeth, err)
	}
	return nil
}

// DelEndpoint detaches the host veth from the bridge if it still exists and
// is still a port of it. Deleting the veth is the CNI layer's job.
func (d *Datapath) DelEndpoint(ep *datapath.Endpoint) error {
	if ep.HostVeth == "" {
		return nil
	}
	if err := d.delAntispoof(ep.HostVeth); err != nil {
		return fmt.Errorf("del endpoint %s: %w", ep.HostVeth, err)
	}
	veth, err := netlinksafe.LinkByName(ep.HostVeth)
	if err != nil {
		if isLinkNotFound(err) {
			return nil
		}
		return fmt.Errorf("del endpoint: look up host veth %s: %w", ep.HostVeth, err)
	}
	if veth.Attrs().MasterIndex == 0 {
		return nil
	}
	br, err := d.bridge()
	if err != nil {
		if errors.Is(err, errNotFound) {
			return nil
		}
		return fmt.Errorf("del endpoint %s: %w", ep.HostVeth, err)
	}
	if veth.Attrs().MasterIndex != br.Attrs().Index {
		return nil // enslaved to something that is not ours
	}
	if err := netlink.LinkSetNoMaster(veth); err != nil && !isLinkNotFound(err) {
		return fmt.Errorf("detach host veth %s from bridge %s: %w", ep.HostVeth, d.cfg.Bridge, err)
	}
	return nil
}

// CheckEndpoint reports the first missing or wrong piece of the endpoint's
// wiring: bridge, gateway address, host veth, bridge port, link state,
// hairpin, chains and jump rules.
func (d *Datapath) CheckEndpoint(ep *datapath.Endpoint) error {
	br, err := d.bridge()
	if err != nil {
		return err
	}
	addrs, err := netlinksafe.AddrList(br, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of bridge %s: %w", d.cfg.Bridge, err)
	}
	gw := d.gatewayNet()
	if !hasAddr(addrs, gw) {
		return fmt.Errorf("bridge %s does not have gateway address %s", d.cfg.Bridge, gw)
	}
	if br.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("bridge %s is down", d.cfg.Bridge)
	}

	veth, err := netlinksafe.LinkByName(ep.HostVeth)
	if err != nil {
		if isLinkNotFound(err) {
			return fmt.Errorf("host veth %s does not exist", ep.HostVeth)
		}
		return fmt.Errorf("look up host veth %s: %w", ep.HostVeth, err)
	}
	if ep.HostIfindex != 0 && veth.Attrs().Index != ep.HostIfindex {
		return fmt.Errorf("host veth %s has ifindex %d, want %d", ep.HostVeth, veth.Attrs().Index, ep.HostIfindex)
	}
	if veth.Attrs().MasterIndex != br.Attrs().Index {
		return fmt.Errorf("host veth %s is not attached to bridge %s", ep.HostVeth, d.cfg.Bridge)
	}
	if veth.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("host veth %s is down", ep.HostVeth)
	}
	pi, err := netlinksafe.LinkGetProtinfo(veth)
	if err != nil {
		return fmt.Errorf("read bridge port flags of %s: %w", ep.HostVeth, err)
	}
	if !pi.Hairpin {
		return fmt.Errorf("hairpin mode is off on host veth %s", ep.HostVeth)
	}
	if err := d.checkAntispoof(ep.HostVeth); err != nil {
		return err
	}
	return d.checkRules()
}

func hasAddr(addrs []netlink.Addr, want *net.IPNet) bool {
	for _, a := range addrs {
		if a.IPNet != nil && a.IP.Equal(want.IP) && a.Mask.String() == want.Mask.String() {
			return true
		}
	}
	return false
}

// ReleaseNode removes the jump rules, both chains and the bridge once no
// endpoint of the network is left. Missing pieces are not an error.
func (d *Datapath) ReleaseNode(remaining int) error {
	if remaining < 0 {
		return fmt.Errorf("release node: negative endpoint count %d", remaining)
	}
	if remaining > 0 {
		return nil
	}
	if err := d.removeRules(); err != nil {
		return err
	}
	br, err := d.bridge()
	if err != nil {
		if errors.Is(err, errNotFound) {
			return nil
		}
		return fmt.Errorf("release node: %w", err)
	}
	if err := netlink.LinkDel(br); err != nil && !isLinkNotFound(err) {
		return fmt.Errorf("delete bridge %s: %w", d.cfg.Bridge, err)
	}
	return nil
}

// Status reports whether the iptables tools and nft are installed and the nat table
// can be used in this namespace.
func (d *Datapath) Status() error {
	for _, bin := range []string{iptablesBin, iptablesRestoreBin, nftBin} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("iptables datapath: %s not found: %w", bin, err)
		}
	}
	if _, err := runIptables("-t", "nat", "-S", "POSTROUTING"); err != nil {
		return fmt.Errorf("iptables datapath: nat table unusable: %w", err)
	}
	return nil
}
