package ebpf

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	cilium "github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/utils/sysctl"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/loader"
)

// Uplink is the node's interface toward other nodes and the outside.
type Uplink struct {
	Name    string
	Ifindex int
	IP      net.IP // first IPv4 address: the SNAT source; nil disables SNAT
}

// ResolveUplink finds the uplink: the named interface, or, when name is
// empty, the interface of the node's IPv4 default route (none is not an
// error: the node then has no uplink). Call it in the node's namespace.
func ResolveUplink(name string) (Uplink, error) {
	var (
		lk  netlink.Link
		err error
	)
	if name != "" {
		lk, err = netlinksafe.LinkByName(name)
		if err != nil {
			return Uplink{}, fmt.Errorf("uplink %s: %w", name, err)
		}
	} else {
		routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4,
			&netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return Uplink{}, fmt.Errorf("find the default route: %w", err)
		}
		ifindex := 0
		for _, r := range routes {
			if r.Dst != nil && r.Dst.IP != nil && !r.Dst.IP.IsUnspecified() {
				continue
			}
			if ones, _ := maskSize(r.Dst); ones != 0 {
				continue
			}
			ifindex = r.LinkIndex
			if ifindex == 0 && len(r.MultiPath) > 0 {
				ifindex = r.MultiPath[0].LinkIndex
			}
			if ifindex != 0 {
				break
			}
		}
		if ifindex == 0 {
			return Uplink{}, nil
		}
		lk, err = netlink.LinkByIndex(ifindex)
		if err != nil {
			return Uplink{}, fmt.Errorf("uplink (default route, ifindex %d): %w", ifindex, err)
		}
	}
	up := Uplink{Name: lk.Attrs().Name, Ifindex: lk.Attrs().Index}
	addrs, err := netlinksafe.AddrList(lk, netlink.FAMILY_V4)
	if err != nil {
		return Uplink{}, fmt.Errorf("addresses of uplink %s: %w", up.Name, err)
	}
	for _, a := range addrs {
		// The first address the kernel lists is the primary one; skip
		// host-scoped or link-local ones nobody outside can answer.
		if a.IP.To4() == nil || a.Scope != int(netlink.SCOPE_UNIVERSE) || a.IP.IsLinkLocalUnicast() {
			continue
		}
		up.IP = a.IP.To4()
		break
	}
	return up, nil
}

func maskSize(n *net.IPNet) (int, int) {
	if n == nil {
		return 0, 32
	}
	return n.Mask.Size()
}

// NAT holds the masquerade's load-time settings (the programs' volatile
// consts). Changing them loads new programs, swapped in like an upgrade.
type NAT struct {
	// PortMin..PortMax are the NAT source ports. Keep them out of
	// net.ipv4.ip_local_port_range; EnsureNode adds them to
	// net.ipv4.ip_local_reserved_ports.
	//
	// One NAT port serves one flow per remote address, remote port and
	// protocol, so the range bounds the rate of new flows to one remote
	// service: range / timeout, e.g. 4,536 ports / 60 s UDP timeout =
	// 75 new UDP flows per second to one DNS server, sustained (TCP
	// connections closed with FIN both ways or RST free their port after
	// 10 s: 453 per second). The network config's natPortRange widens it.
	PortMin, PortMax uint16
	// Idle timeouts.
	TCP, TCPSyn, TCPClose, UDP, ICMP time.Duration
	// MemoryMiB is the memory budget of the two NAT maps (0: the
	// default, DefaultNATMemoryMiB); NATMapEntries says how many flows
	// it holds.
	MemoryMiB int
	// GCInterval is the period of the in-kernel NAT garbage collector
	// (0: 10 s).
	GCInterval time.Duration
	// LBLoopback is the service-loopback address of the Service load
	// balancer (lib/lb.h: the client a pod reaching itself through its
	// Service sees). Zero: 169.254.42.1.
	LBLoopback netip.Addr
	// PolicyFlowsPerPod bounds the new flows of each kind (TCP; the rest)
	// a local pod may open per minute into the policy conntrack
	// (lib/policy.h policy_ct_pod_flows); 0: no limit.
	PolicyFlowsPerPod uint32
}

// DefaultNAT: ports above the kernel's default ephemeral range (32768-60999),
// timeouts as in Cilium's conntrack.
func DefaultNAT() NAT {
	return NAT{
		PortMin: 61000, PortMax: 65535,
		TCP: 6 * time.Hour, TCPSyn: 60 * time.Second, TCPClose: 10 * time.Second,
		UDP: 60 * time.Second, ICMP: 30 * time.Second,
		MemoryMiB: DefaultNATMemoryMiB, GCInterval: 10 * time.Second,
		LBLoopback: netip.AddrFrom4([4]byte{169, 254, 42, 1}),
	}
}

func (n NAT) validate() error {
	if n.PortMin < 1024 || n.PortMin > n.PortMax {
		return fmt.Errorf("NAT port range %d-%d: want 1024 <= min <= max", n.PortMin, n.PortMax)
	}
	for _, d := range []time.Duration{n.TCP, n.TCPSyn, n.TCPClose, n.UDP, n.ICMP, n.GCInterval} {
		if d < time.Second || d > 1<<31*time.Second {
			return fmt.Errorf("NAT timeout %s out of range", d)
		}
	}
	if n.MemoryMiB < MinNATMemoryMiB || n.MemoryMiB > MaxNATMemoryMiB {
		return fmt.Errorf("NAT memory %d MiB outside %d-%d", n.MemoryMiB, MinNATMemoryMiB, MaxNATMemoryMiB)
	}
	return nil
}

// withDefaults fills unset fields from DefaultNAT.
func (n NAT) withDefaults() NAT {
	d := DefaultNAT()
	if n.PortMin == 0 && n.PortMax == 0 {
		n.PortMin, n.PortMax = d.PortMin, d.PortMax
	}
	for _, f := range []struct{ v, def *time.Duration }{
		{&n.TCP, &d.TCP}, {&n.TCPSyn, &d.TCPSyn}, {&n.TCPClose, &d.TCPClose},
		{&n.UDP, &d.UDP}, {&n.ICMP, &d.ICMP}, {&n.GCInterval, &d.GCInterval},
	} {
		if *f.v == 0 {
			*f.v = *f.def
		}
	}
	if n.MemoryMiB == 0 {
		n.MemoryMiB = d.MemoryMiB
	}
	if !n.LBLoopback.IsValid() {
		n.LBLoopback = d.LBLoopback
	}
	return n
}

func (n NAT) vars() map[string]uint32 {
	sec := func(d time.Duration) uint32 { return uint32(d / time.Second) }
	return map[string]uint32{
		ternbpf.TernVarNatPortMin:        uint32(n.PortMin),
		ternbpf.TernVarNatPortMax:        uint32(n.PortMax),
		ternbpf.TernVarCtTimeoutTcp:      sec(n.TCP),
		ternbpf.TernVarCtTimeoutTcpSyn:   sec(n.TCPSyn),
		ternbpf.TernVarCtTimeoutTcpClose: sec(n.TCPClose),
		ternbpf.TernVarCtTimeoutUdp:      sec(n.UDP),
		ternbpf.TernVarCtTimeoutIcmp:     sec(n.ICMP),
		ternbpf.TernVarNatGcInterval:     sec(n.GCInterval),
		ternbpf.TernVarLbLoopbackIp:      lbAddr(n.LBLoopback),
		ternbpf.TernVarPolicyCtPodFlows:  n.PolicyFlowsPerPod,
	}
}

// specs wraps the loader's spec source so every object gets these settings,
// and derives the version: the object version alone for the defaults,
// with a hash of the settings otherwise, so different settings are
// different programs (and NAT maps of another size are re-created with
// them, see prepareNATMaps). Loading first checks that the kernel can run
// the programs (checkKernel). mapsDir is where the loader pins maps.
func (n NAT) specs(load func() ([]*cilium.CollectionSpec, error), version, mapsDir string) (func() ([]*cilium.CollectionSpec, error), string) {
	vars := n.vars()
	if n != DefaultNAT() {
		names := make([]string, 0, len(vars))
		for k := range vars {
			names = append(names, k)
		}
		slices.Sort(names)
		h := sha256.New()
		for _, k := range names {
			fmt.Fprintf(h, "%s=%d\n", k, vars[k])
		}
		fmt.Fprintf(h, "nat_entries=%d\n", n.mapEntries())
		version += "-" + hex.EncodeToString(h.Sum(nil)[:4])
	}
	return func() ([]*cilium.CollectionSpec, error) {
		if err := n.validate(); err != nil {
			return nil, err
		}
		if err := checkKernel(); err != nil {
			return nil, err
		}
		specs, err := load()
		if err != nil {
			return nil, err
		}
		if err := n.prepareNATMaps(specs, mapsDir); err != nil {
			return nil, err
		}
		for _, spec := range specs {
			for name, v := range vars {
				vs, ok := spec.Variables[name]
				if !ok {
					continue // this object does not use it
				}
				if err := vs.Set(v); err != nil {
					return nil, fmt.Errorf("set %s: %w", name, err)
				}
			}
		}
		return specs, nil
	}, version
}

// snatHeld runs fn holding the node's SNAT lock, which orders taking the
// SNAT state down when the last endpoint goes (ReleaseNode) against adding
// an endpoint. A lock of its own: fn attaches and detaches, which take the
// loader's.
func (d *Datapath) snatHeld(fn func() error) error {
	lock, err := loader.Lock(filepath.Join(d.cfg.StateDir, "snat.lock"))
	if err != nil {
		return err
	}
	defer lock.Unlock()
	return fn()
}

// uplinkHooks are the uplink's attachments: replies of masqueraded flows
// at its ingress, and the egress policy of pod traffic the host stack
// translated toward another node (Services, see services.go) at its egress.
var uplinkHooks = []loader.Hook{loader.HookUplinkIngress, loader.HookUplinkEgress}

// ensureSNAT brings the node's SNAT state in line with the config, in an
// order that never lets a packet be masqueraded without a way back: the
// uplink program first, the node config (which turns SNAT on) last.
func (d *Datapath) ensureSNAT() error {
	up := d.cfg.Uplink
	if up.Ifindex == 0 || up.IP == nil {
		return nil // no uplink (or no address on it): nothing to masquerade to
	}
	if err := d.syncNoMasq(); err != nil {
		return err
	}
	if err := d.loader.Held(func() error { return d.ensureSysctls() }); err != nil {
		return err
	}
	for _, hook := range uplinkHooks {
		if err := d.loader.CheckAttached(d.objs, up.Name, up.Ifindex, hook); err != nil {
			if _, err := d.loader.Attach(d.objs, up.Name, up.Ifindex, hook, d.cfg.Attach); err != nil {
				return fmt.Errorf("attach to uplink: %w", err)
			}
		}
		// The uplink changed: replies no longer arrive on the old one.
		others, err := d.loader.Attachments(hook)
		if err != nil {
			return err
		}
		for _, ifname := range others {
			if ifname != up.Name {
				if err := d.loader.Detach(ifname, hook); err != nil {
					return fmt.Errorf("detach from old uplink: %w", err)
				}
			}
		}
	}
	if err := d.ensureXDP(up); err != nil {
		return err
	}
	if err := d.syncLBEmpty(); err != nil {
		return err
	}
	return d.writeNodeConfig(ternbpf.TernNodeConfig{
		NodeIp:        binary.NativeEndian.Uint32(up.IP.To4()),
		UplinkIfindex: uint32(up.Ifindex),
	})
}

func (d *Datapath) writeNodeConfig(want ternbpf.TernNodeConfig) error {
	m, err := d.objs.Map(ternbpf.TernMapTernConfig)
	if err != nil {
		return err
	}
	var cur ternbpf.TernNodeConfig
	if err := m.Lookup(uint32(0), &cur); err == nil && cur == want {
		return nil
	}
	if err := m.Put(uint32(0), want); err != nil {
		return fmt.Errorf("write node config: %w", err)
	}
	return nil
}

// releaseSNAT takes the SNAT state down once no endpoint is left.
func (d *Datapath) releaseSNAT() error {
	var errs []error
	if err := d.writeNodeConfig(ternbpf.TernNodeConfig{}); err != nil {
		errs = append(errs, err)
	}
	if err := d.releaseXDP(); err != nil {
		errs = append(errs, err)
	}
	for _, hook := range uplinkHooks {
		uplinks, err := d.loader.Attachments(hook)
		if err != nil {
			errs = append(errs, err)
		}
		for _, ifname := range uplinks {
			if err := d.loader.Detach(ifname, hook); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := removeGatewayAddrs(); err != nil {
		errs = append(errs, err)
	}
	if err := d.flushNAT(func(net.IP) bool { return true }); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// noMasqCIDRs are the destinations pods reach with their own address.
func (d *Datapath) noMasqCIDRs() []net.IPNet {
	var out []net.IPNet
	switch {
	case d.cfg.ClusterCIDR != nil:
		out = append(out, *d.cfg.ClusterCIDR)
	case d.cfg.PodSubnet != nil:
		out = append(out, *d.cfg.PodSubnet)
	default:
		return nil // unknown here: leave the map as it is
	}
	return append(out, d.cfg.NonMasqueradeCIDRs...)
}

func lpmKey(n net.IPNet) (ternbpf.TernLpmV4Key, bool) {
	ip := n.IP.To4()
	ones, bits := n.Mask.Size()
	if ip == nil || (bits != 32 && bits != 128) {
		return ternbpf.TernLpmV4Key{}, false
	}
	if bits == 128 {
		ones -= 96
	}
	ip = ip.Mask(net.CIDRMask(ones, 32))
	return ternbpf.TernLpmV4Key{Prefixlen: uint32(ones), Addr: binary.NativeEndian.Uint32(ip)}, true
}

// syncNoMasq makes tern_nomasq hold exactly noMasqCIDRs.
func (d *Datapath) syncNoMasq() error {
	cidrs := d.noMasqCIDRs()
	if cidrs == nil {
		return nil
	}
	m, err := d.objs.Map(ternbpf.TernMapTernNomasq)
	if err != nil {
		return err
	}
	return syncLPMSet(m, cidrs, "no-masquerade CIDR")
}

// syncLPMSet makes m, an LPM map used as a set of IPv4 prefixes (value 1),
// hold exactly cidrs (IPv6 ones are left out), by difference: a prefix that
// stays is never missing meanwhile. what names the prefixes in errors.
func syncLPMSet(m *cilium.Map, cidrs []net.IPNet, what string) error {
	want := map[ternbpf.TernLpmV4Key]bool{}
	for _, n := range cidrs {
		if k, ok := lpmKey(n); ok {
			want[k] = true
		}
	}
	var (
		key   ternbpf.TernLpmV4Key
		val   uint8
		stale []ternbpf.TernLpmV4Key
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		if want[key] {
			delete(want, key)
		} else {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate %ss: %w", what, err)
	}
	for k := range want {
		if err := m.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("add %s: %w", what, err)
		}
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			return fmt.Errorf("remove %s: %w", what, err)
		}
	}
	return nil
}

// ensureSysctls sets what the SNAT path needs in the node namespace:
//   - net.ipv4.ip_forward=1: bpf_fib_lookup answers FWD_DISABLED on an
//     interface without forwarding, and the packets the program leaves to
//     the stack are forwarded by it;
//   - the NAT port range in net.ipv4.ip_local_reserved_ports, so the node's
//     own sockets never pick a NAT port (a reply to them would be taken for
//     a pod's).
//
// rp_filter needs no change: replies are taken at the uplink's tc ingress,
// before the stack's source validation.
func (d *Datapath) ensureSysctls() error {
	if err := setSysctl("net.ipv4.ip_forward", "1"); err != nil {
		return err
	}
	const reserved = "net.ipv4.ip_local_reserved_ports"
	cur, err := sysctl.Sysctl(reserved)
	if err != nil {
		return fmt.Errorf("read sysctl %s: %w", reserved, err)
	}
	next, changed := addPortRange(strings.TrimSpace(cur), d.cfg.NAT.PortMin, d.cfg.NAT.PortMax)
	if !changed {
		return nil
	}
	return setSysctl(reserved, next)
}

func setSysctl(name, value string) error {
	if cur, err := sysctl.Sysctl(name); err == nil && strings.TrimSpace(cur) == value {
		return nil
	}
	if _, err := sysctl.Sysctl(name, value); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// addPortRange returns the ip_local_reserved_ports list cur with lo-hi
// added, and whether that changed anything (every port already reserved:
// no change).
func addPortRange(cur string, lo, hi uint16) (string, bool) {
	covered := make([]bool, int(hi)-int(lo)+1)
	for _, part := range strings.Split(cur, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		a, b, isRange := strings.Cut(part, "-")
		from, err1 := strconv.Atoi(a)
		to := from
		var err2 error
		if isRange {
			to, err2 = strconv.Atoi(b)
		}
		if err1 != nil || err2 != nil {
			continue
		}
		for p := max(from, int(lo)); p <= min(to, int(hi)); p++ {
			covered[p-int(lo)] = true
		}
	}
	if !slices.Contains(covered, false) {
		return cur, false
	}
	add := fmt.Sprintf("%d-%d", lo, hi)
	if cur == "" {
		return add, true
	}
	return cur + "," + add, true
}

// gatewayLabel marks the gateway addresses Tern puts on lo, so they can be
// told from the administrator's.
const gatewayLabel = "lo:tern"

// loopbackIfindex is lo's interface index, the same in every network
// namespace since Linux 3.7 (LOOPBACK_IFINDEX).
const loopbackIfindex = 1

// ensureGatewayAddr assigns the pods' gateway address to the node's lo as
// a /32: pods route everything via it (through a permanent neighbour entry,
// no ARP), and with the address local to the node, traffic to it (ping,
// DNS on the node) is answered instead of being routed away.
func ensureGatewayAddr(gw net.IP) error {
	if gw.To4() == nil {
		return nil
	}
	// lo is interface 1 in every network namespace (the kernel's
	// LOOPBACK_IFINDEX): no look-up, one netlink request fewer per ADD.
	lo := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: loopbackIfindex, Name: "lo"}}
	// Present for every ADD but a node's first: looked for first, since
	// recent kernels dump addresses under RCU, without the RTNL, and an
	// RTM_NEWADDR waits for the RTNL, which the other ADDs' veths and
	// routes keep busy while this one holds the records lock. Present
	// means the same address with the same /32 prefix, as RTM_NEWADDR
	// would find it (it answers EEXIST for that and adds a /32 next to,
	// say, a /24).
	if has, err := hasHostAddr(lo, gw.To4()); err != nil {
		return err
	} else if has {
		return nil
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: gw.To4(), Mask: net.CIDRMask(32, 32)}, Label: gatewayLabel}
	if err := netlink.AddrAdd(lo, addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add gateway address %s to lo: %w", gw, err)
	}
	return nil
}

// hasHostAddr reports whether lk has ip/32.
func hasHostAddr(lk netlink.Link, ip net.IP) (bool, error) {
	addrs, err := netlinksafe.AddrList(lk, netlink.FAMILY_V4)
	if err != nil {
		return false, fmt.Errorf("addresses of %s: %w", lk.Attrs().Name, err)
	}
	for _, a := range addrs {
		if ones, bits := a.Mask.Size(); a.IP.Equal(ip) && ones == 32 && bits == 32 {
			return true, nil
		}
	}
	return false, nil
}

func checkGatewayAddr(gw net.IP) error {
	if gw.To4() == nil {
		return nil
	}
	lo, err := netlinksafe.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("look up lo: %w", err)
	}
	addrs, err := netlinksafe.AddrList(lo, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("addresses of lo: %w", err)
	}
	for _, a := range addrs {
		if a.IP.Equal(gw) {
			return nil
		}
	}
	return fmt.Errorf("gateway address %s is not on the node's lo", gw)
}

// removeGatewayAddrs removes every address ensureGatewayAddr added.
func removeGatewayAddrs() error {
	lo, err := netlinksafe.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("look up lo: %w", err)
	}
	addrs, err := netlinksafe.AddrList(lo, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("addresses of lo: %w", err)
	}
	var errs []error
	for _, a := range addrs {
		if a.Label != gatewayLabel {
			continue
		}
		if err := netlink.AddrDel(lo, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("remove gateway address %s from lo: %w", a.IP, err))
		}
	}
	return errors.Join(errs...)
}

// natIP turns an address as the NAT maps hold it (network order read as a
// native integer) into a net.IP.
func natIP(v uint32) net.IP {
	return net.IP(binary.NativeEndian.AppendUint32(nil, v))
}

// flushNAT deletes the NAT entries of every pod address drop selects: the
// forward entries the pod's flows left with, and the reverse entries that
// would deliver replies to it.
func (d *Datapath) flushNAT(drop func(net.IP) bool) error {
	if err := d.open(); err != nil {
		return err
	}
	var errs []error
	for _, mc := range []struct {
		name string
		pod  func(k ternbpf.TernNatTuple, v ternbpf.TernNatEntry) uint32
	}{
		{ternbpf.TernMapTernNat, func(k ternbpf.TernNatTuple, _ ternbpf.TernNatEntry) uint32 { return k.Saddr }},
		{ternbpf.TernMapTernNatRev, func(_ ternbpf.TernNatTuple, v ternbpf.TernNatEntry) uint32 { return v.Addr }},
	} {
		m, err := d.objs.Map(mc.name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var (
			key   ternbpf.TernNatTuple
			val   ternbpf.TernNatEntry
			stale []ternbpf.TernNatTuple
		)
		it := m.Iterate()
		for it.Next(&key, &val) {
			if drop(natIP(mc.pod(key, val))) {
				stale = append(stale, key)
			}
		}
		if err := it.Err(); err != nil {
			errs = append(errs, fmt.Errorf("iterate %s: %w", mc.name, err))
		}
		for _, k := range stale {
			if err := m.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
				errs = append(errs, fmt.Errorf("delete from %s: %w", mc.name, err))
			}
		}
	}
	return errors.Join(errs...)
}
