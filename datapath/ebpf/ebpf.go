// Package ebpf is Tern's eBPF datapath: pods' host-side veths run
// tern_from_pod at tc ingress, and the pinned endpoints map tells it where
// each pod lives. Pod traffic leaving the cluster is masqueraded to the node
// IP by tern_from_pod and its replies are translated back by
// tern_from_uplink on the node's uplink (see snat.go and docs/snat.md).
// tern_to_pod at tc egress of the same veths and tern_from_pod enforce
// NetworkPolicy from maps ApplyPolicy writes (see policy.go).
package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"path/filepath"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
)

// Config selects where the node's pins and state live, and how pod traffic
// leaves the node.
type Config struct {
	BPFFSDir string
	StateDir string
	Attach   loader.Mode
	// Network is the CNI network name: the owner of the node's policy
	// maps when its rule set is in them (see policy.go).
	Network string

	// Uplink is the node's interface toward the outside, resolved by
	// ResolveUplink. The zero value means none: no SNAT, and the node's
	// SNAT state is left as it is.
	Uplink Uplink
	// UplinkErr is why a configured uplink could not be resolved. It fails
	// EnsureNode and Status (ADD, STATUS) but not DEL, CHECK or GC.
	UplinkErr error
	// IPMasq marks the network's endpoints for masquerading: their traffic
	// to destinations outside ClusterCIDR and NonMasqueradeCIDRs leaves
	// with the node IP.
	IPMasq             bool
	ClusterCIDR        *net.IPNet
	NonMasqueradeCIDRs []net.IPNet
	// ServiceCIDRs are the ranges kube-proxy's ClusterIPs come from
	// (services.go): pod traffic to them goes to the host stack.
	ServiceCIDRs []net.IPNet
	// LoadBalancer marks the network's endpoints for Tern's own Service
	// load balancer (services "ebpf", lb.go): what they send to a Service
	// frontend is translated to a backend by tern_from_pod.
	LoadBalancer bool
	// HostServicesCgroup (with LoadBalancer) is the cgroup v2 directory
	// whose processes reach Services through the socket programs
	// (hostsvc.go): the cgroup2 root in production. Empty: not attached.
	HostServicesCgroup string
	// Acceleration (with LoadBalancer) puts NodePort translation at the
	// uplink's XDP (xdp.go). The zero value means AccelerationNone.
	Acceleration Acceleration
	// PodSubnet stands in for ClusterCIDR when that is unset (as in the
	// iptables datapath). Nil when unknown (DEL without a record).
	PodSubnet *net.IPNet
	// NAT holds the programs' load-time settings; the zero value means
	// DefaultNAT().
	NAT NAT
}

// Datapath implements datapath.Datapath with TC programs.
type Datapath struct {
	cfg    Config
	loader *loader.Loader
	objs   *loader.Objects
}

var _ datapath.Datapath = (*Datapath)(nil)

// New returns the datapath; nothing is loaded until it is needed.
func New(cfg Config) *Datapath {
	cfg.NAT = cfg.NAT.withDefaults()
	d := &Datapath{cfg: cfg, loader: loader.New(cfg.BPFFSDir, cfg.StateDir)}
	d.loader.Specs, d.loader.Version = cfg.NAT.specs(d.loader.Specs, d.loader.Version,
		filepath.Join(cfg.BPFFSDir, "maps"))
	return d
}

// WithLoader replaces the loader (tests use it to simulate upgrades).
func (d *Datapath) WithLoader(l *loader.Loader) *Datapath {
	d.loader = l
	return d
}

// Close releases handles to the node's objects (pins stay).
func (d *Datapath) Close() {
	if d.objs != nil {
		d.objs.Close()
		d.objs = nil
	}
}

// open loads and pins the programs and maps once per node, or opens the
// pinned ones. It changes nothing else: DEL, CHECK and GC use it.
func (d *Datapath) open() error {
	if d.objs != nil {
		return nil
	}
	objs, err := d.loader.Load()
	if err != nil {
		return err
	}
	// The command that opens a new version of the programs (or a new
	// timer map) arms the NAT garbage collector's timer with it and
	// collects once: the timer keeps collecting with no Tern process
	// running (armNATGC). Objects without it (tests' loaders) have
	// nothing to arm.
	if _, err := objs.Program(ternbpf.TernProgTernNatGc); err == nil {
		if err := d.armNATGC(objs); err != nil {
			objs.Close()
			return err
		}
	}
	d.objs = objs
	return nil
}

// EnsureNode loads the programs and maps and prepares the node for SNAT:
// sysctls, the uplink program, the no-masquerade destinations and the node
// config the programs read. Idempotent; ADD calls it for every pod.
func (d *Datapath) EnsureNode() error {
	if d.cfg.UplinkErr != nil {
		return d.cfg.UplinkErr
	}
	if err := d.open(); err != nil {
		return err
	}
	if err := d.syncServiceCIDRs(); err != nil {
		return err
	}
	return d.snatHeld(func() error {
		if err := d.ensureSNAT(); err != nil {
			return err
		}
		return d.ensureHostServices()
	})
}

func (d *Datapath) endpoints() (*cilium.Map, error) {
	if err := d.open(); err != nil {
		return nil, err
	}
	return d.objs.Map(ternbpf.TernMapTernEndpoints)
}

// EndpointKey is the endpoints map key of an IPv4 address (network order).
func EndpointKey(ip net.IP) (uint32, error) {
	v4 := ip.To4()
	if v4 == nil {
		return 0, fmt.Errorf("%s is not an IPv4 address", ip)
	}
	return binary.NativeEndian.Uint32(v4), nil
}

// EndpointValue is the endpoints map value for ep.
func EndpointValue(ep *datapath.Endpoint) (ternbpf.TernEndpoint, error) {
	var v ternbpf.TernEndpoint
	if len(ep.PodMAC) != 6 || len(ep.HostMAC) != 6 {
		return v, fmt.Errorf("endpoint %s: MAC addresses must be 6 bytes", ep.HostVeth)
	}
	v.Ifindex = uint32(ep.HostIfindex)
	copy(v.PodMac[:], ep.PodMAC)
	copy(v.HostMac[:], ep.HostMAC)
	if ep.Shaped {
		v.Flags |= uint32(ternbpf.TernEndpointFlagsENDPOINT_F_SHAPED)
	}
	return v, nil
}

// endpointValue is EndpointValue with this network's flags.
func (d *Datapath) endpointValue(ep *datapath.Endpoint) (ternbpf.TernEndpoint, error) {
	v, err := EndpointValue(ep)
	if err != nil {
		return v, err
	}
	if d.cfg.IPMasq {
		v.Flags |= uint32(ternbpf.TernEndpointFlagsENDPOINT_F_MASQ)
	}
	if d.cfg.LoadBalancer {
		v.Flags |= uint32(ternbpf.TernEndpointFlagsENDPOINT_F_LB)
	}
	return v, nil
}

// TraceMark, when set, is told when each step of AddEndpoint ends (the
// plugin's opt-in timing trace, TERN_TRACE_FILE).
var TraceMark func(string)

func traceMark(s string) {
	if TraceMark != nil {
		TraceMark(s)
	}
}

// AddEndpoint registers the pod in the endpoints map, makes its gateway
// address answer on the node, then attaches the program: the map entry
// must exist before the first packet is checked.
func (d *Datapath) AddEndpoint(ep *datapath.Endpoint) error {
	m, err := d.endpoints()
	if err != nil {
		return err
	}
	key, err := EndpointKey(ep.IP.IP)
	if err != nil {
		return err
	}
	val, err := d.endpointValue(ep)
	if err != nil {
		return err
	}
	// Under the SNAT lock, and SNAT state checked again once the entry is
	// in: a ReleaseNode that saw the map empty just before may have taken
	// it down since EnsureNode.
	err = d.snatHeld(func() error {
		if err := m.Put(key, val); err != nil {
			return fmt.Errorf("add endpoint %s to map: %w", ep.IP.IP, err)
		}
		return d.ensureSNAT()
	})
	if err != nil {
		return err
	}
	traceMark("ep.snat")
	if err := ensureGatewayAddr(ep.Gateway); err != nil {
		return err
	}
	traceMark("ep.gw")
	// The receiving side first: once tern_from_pod lets the pod's first
	// packet out, what comes back through the host meets its policy.
	mode := d.podAttachMode(ep.Shaped)
	for _, hook := range []loader.Hook{loader.HookPodEgress, loader.HookPodIngress} {
		used, err := d.loader.Attach(d.objs, ep.HostVeth, ep.HostIfindex, hook, mode)
		if err != nil {
			return err
		}
		// Both hooks of a veth the same way: after a refused clsact the
		// ingress hook goes to TCX too (auto mode still keeps a kind
		// the hook already has).
		if mode == loader.ModeClsactFirst && used == loader.ModeTCX {
			mode = loader.ModeAuto
		}
		traceMark("ep.attach")
	}
	return nil
}

// PreparePod readies the pod's host veth for its programs before the
// caller takes the records lock: the clsact qdisc, when the pod's veth is
// to get cls_bpf filters. AddEndpoint then attaches them without the two
// netlink requests per hook that would otherwise wait for the RTNL with
// the lock held (loader.PrepareClsact). Nothing here reaches the datapath:
// a qdisc without filters runs nothing. Optional: AddEndpoint works
// without it.
func (d *Datapath) PreparePod(ep *datapath.Endpoint) error {
	switch d.podAttachMode(ep.Shaped) {
	case loader.ModeClsactFirst, loader.ModeLegacy:
		_, err := d.loader.PrepareClsact(ep.HostVeth, ep.HostIfindex)
		return err
	}
	return nil
}

// podAttachMode is how a pod's veth gets its programs. A configured mode
// holds for every pod. Auto mode picks per pod: TCX for a shaped pod, whose
// bandwidth plugin adds an ingress qdisc to the same veth after Tern (the
// clsact and ingress qdiscs exclude each other), and a cls_bpf filter for
// every other pod: a TCX attach waits for an RCU grace period with the RTNL
// held, two per pod, which made ADD slower than the reference plugins
// (docs/cni-add-profile.md). The loader keeps a veth's existing kind.
func (d *Datapath) podAttachMode(shaped bool) loader.Mode {
	if d.cfg.Attach != loader.ModeAuto {
		return d.cfg.Attach
	}
	if shaped {
		return loader.ModeAuto
	}
	return loader.ModeClsactFirst
}

// DelEndpoint detaches the program and removes the map entry, but only an
// entry that still belongs to this endpoint's veth: after a DEL is retried
// the IP may already serve another pod. The pod's NAT entries go last,
// once no program can create new ones for it.
func (d *Datapath) DelEndpoint(ep *datapath.Endpoint) error {
	var errs []error
	for _, hook := range []loader.Hook{loader.HookPodIngress, loader.HookPodEgress} {
		if err := d.loader.Detach(ep.HostVeth, hook); err != nil {
			errs = append(errs, err)
		}
	}
	if ep.IP.IP != nil {
		removed, err := d.deleteEntry(ep)
		if err != nil {
			errs = append(errs, err)
		}
		if removed {
			if err := d.flushNAT(func(ip net.IP) bool { return ip.Equal(ep.IP.IP) }); err != nil {
				errs = append(errs, err)
			}
			if err := d.forgetPolicyEndpoints(func(ip net.IP) bool { return ip.Equal(ep.IP.IP) }); err != nil {
				errs = append(errs, err)
			}
			if err := d.forgetStackFlows(func(ip net.IP) bool { return ip.Equal(ep.IP.IP) }); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// deleteEntry removes ep's endpoints map entry and reports whether the IP
// is now free of any endpoint (false when another pod owns it).
func (d *Datapath) deleteEntry(ep *datapath.Endpoint) (bool, error) {
	m, err := d.endpoints()
	if err != nil {
		return false, err
	}
	key, err := EndpointKey(ep.IP.IP)
	if err != nil {
		return false, err
	}
	var cur ternbpf.TernEndpoint
	if err := m.Lookup(key, &cur); err != nil {
		if errors.Is(err, cilium.ErrKeyNotExist) {
			return true, nil
		}
		return false, fmt.Errorf("look up endpoint %s: %w", ep.IP.IP, err)
	}
	if ep.HostIfindex != 0 && int(cur.Ifindex) != ep.HostIfindex {
		return false, nil
	}
	if err := m.Delete(key); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
		return false, fmt.Errorf("delete endpoint %s from map: %w", ep.IP.IP, err)
	}
	return true, nil
}

// CheckEndpoint verifies the map entry, the attached programs and the
// gateway address.
func (d *Datapath) CheckEndpoint(ep *datapath.Endpoint) error {
	m, err := d.endpoints()
	if err != nil {
		return err
	}
	key, err := EndpointKey(ep.IP.IP)
	if err != nil {
		return err
	}
	want, err := d.endpointValue(ep)
	if err != nil {
		return err
	}
	var got ternbpf.TernEndpoint
	if err := m.Lookup(key, &got); err != nil {
		return fmt.Errorf("endpoint %s missing from the endpoints map: %w", ep.IP.IP, err)
	}
	if got.Ifindex != want.Ifindex || got.PodMac != want.PodMac || got.HostMac != want.HostMac {
		return fmt.Errorf("endpoint %s in the endpoints map is stale: ifindex %d, want %d", ep.IP.IP, got.Ifindex, want.Ifindex)
	}
	if got.Flags != want.Flags {
		return fmt.Errorf("endpoint %s in the endpoints map has flags %#x, want %#x (ipMasq changed?)", ep.IP.IP, got.Flags, want.Flags)
	}
	for _, hook := range []loader.Hook{loader.HookPodIngress, loader.HookPodEgress} {
		if err := d.loader.CheckAttached(d.objs, ep.HostVeth, ep.HostIfindex, hook); err != nil {
			return err
		}
	}
	if err := checkGatewayAddr(ep.Gateway); err != nil {
		return err
	}
	if d.cfg.LoadBalancer && d.cfg.HostServicesCgroup != "" && !d.loader.CgroupAttached() {
		return fmt.Errorf("host services: the socket programs are not attached to %s", d.cfg.HostServicesCgroup)
	}
	if up := d.cfg.Uplink; up.Ifindex != 0 && up.IP != nil {
		for _, hook := range uplinkHooks {
			if err := d.loader.CheckAttached(d.objs, up.Name, up.Ifindex, hook); err != nil {
				return fmt.Errorf("uplink: %w", err)
			}
		}
		if err := d.checkXDP(up); err != nil {
			return err
		}
	}
	return nil
}

// ReleaseNode keeps programs and maps loaded when the last pod goes: they
// cost nothing idle, and the next ADD does not pay for a reload. The
// network's policy state goes with its last pod (datapath.PolicyEnforcer).
// Once no endpoint of any network is left, it takes the node's SNAT state
// down: node config, uplink program, gateway addresses, NAT entries.
func (d *Datapath) ReleaseNode(remaining int) error {
	if remaining > 0 {
		return nil
	}
	m, err := d.endpoints()
	if err != nil {
		return err
	}
	if err := d.releasePolicy(); err != nil {
		return err
	}
	return d.snatHeld(func() error {
		var (
			key uint32
			val ternbpf.TernEndpoint
		)
		it := m.Iterate()
		if it.Next(&key, &val) {
			return nil // another network's pods still need it
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("iterate endpoints: %w", err)
		}
		return errors.Join(d.releaseSNAT(), d.releaseHostServices())
	})
}

// Status reports whether the programs are loaded or can be, and whether
// the configured uplink exists.
func (d *Datapath) Status() error {
	if d.cfg.UplinkErr != nil {
		return d.cfg.UplinkErr
	}
	return d.open()
}

// Sweep removes endpoint entries, NAT entries and policy state that belong
// to none of keep (GC).
func (d *Datapath) Sweep(keep []*datapath.Endpoint) error {
	m, err := d.endpoints()
	if err != nil {
		return err
	}
	valid := map[uint32]bool{}
	for _, ep := range keep {
		if k, err := EndpointKey(ep.IP.IP); err == nil {
			valid[k] = true
		}
	}
	var (
		key   uint32
		val   ternbpf.TernEndpoint
		stale []uint32
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		if !valid[key] {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate endpoints: %w", err)
	}
	var errs []error
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete stale endpoint: %w", err))
		}
	}
	err = d.flushNAT(func(ip net.IP) bool {
		k, err := EndpointKey(ip)
		return err == nil && !valid[k]
	})
	if err != nil {
		errs = append(errs, err)
	}
	err = d.forgetPolicyEndpoints(func(ip net.IP) bool {
		k, err := EndpointKey(ip)
		return err == nil && !valid[k]
	})
	if err != nil {
		errs = append(errs, err)
	}
	err = d.forgetStackFlows(func(ip net.IP) bool {
		k, err := EndpointKey(ip)
		return err == nil && !valid[k]
	})
	if err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Metrics sums the per-CPU counters by name.
func (d *Datapath) Metrics() (map[string]ternbpf.TernMetricValue, error) {
	if err := d.open(); err != nil {
		return nil, err
	}
	m, err := d.objs.Map(ternbpf.TernMapTernMetrics)
	if err != nil {
		return nil, err
	}
	return ReadMetrics(m)
}
