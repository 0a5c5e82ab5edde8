// Package ebpf is Tern's eBPF datapath: pods' host-side veths run
// tern_from_pod at tc ingress, and the pinned endpoints map tells it where
// each pod lives.
package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
)

// Config selects where the node's pins and state live.
type Config struct {
	BPFFSDir string
	StateDir string
	Attach   loader.Mode
}

// Datapath implements datapath.Datapath with TC programs.
type Datapath struct {
	cfg    Config
	loader *loader.Loader
	objs   *loader.Objects
}

var _ datapath.Datapath = (*Datapath)(nil)

// New returns the datapath; nothing is loaded until EnsureNode.
func New(cfg Config) *Datapath {
	return &Datapath{cfg: cfg, loader: loader.New(cfg.BPFFSDir, cfg.StateDir)}
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

// EnsureNode loads and pins the programs and maps once per node.
func (d *Datapath) EnsureNode() error {
	if d.objs != nil {
		return nil
	}
	objs, err := d.loader.Load()
	if err != nil {
		return err
	}
	d.objs = objs
	return nil
}

func (d *Datapath) endpoints() (*cilium.Map, error) {
	if err := d.EnsureNode(); err != nil {
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
	return v, nil
}

// AddEndpoint registers the pod in the endpoints map, then attaches the
// program: the map entry must exist before the first packet is checked.
func (d *Datapath) AddEndpoint(ep *datapath.Endpoint) error {
	m, err := d.endpoints()
	if err != nil {
		return err
	}
	key, err := EndpointKey(ep.IP.IP)
	if err != nil {
		return err
	}
	val, err := EndpointValue(ep)
	if err != nil {
		return err
	}
	if err := m.Put(key, val); err != nil {
		return fmt.Errorf("add endpoint %s to map: %w", ep.IP.IP, err)
	}
	if _, err := d.loader.Attach(d.objs, ep.HostVeth, ep.HostIfindex, loader.HookPodIngress, d.cfg.Attach); err != nil {
		return err
	}
	return nil
}

// DelEndpoint detaches the program and removes the map entry, but only an
// entry that still belongs to this endpoint's veth: after a DEL is retried
// the IP may already serve another pod.
func (d *Datapath) DelEndpoint(ep *datapath.Endpoint) error {
	var errs []error
	if err := d.loader.Detach(ep.HostVeth, loader.HookPodIngress); err != nil {
		errs = append(errs, err)
	}
	if ep.IP.IP != nil {
		if err := d.deleteEntry(ep); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (d *Datapath) deleteEntry(ep *datapath.Endpoint) error {
	m, err := d.endpoints()
	if err != nil {
		return err
	}
	key, err := EndpointKey(ep.IP.IP)
	if err != nil {
		return err
	}
	var cur ternbpf.TernEndpoint
	if err := m.Lookup(key, &cur); err != nil {
		if errors.Is(err, cilium.ErrKeyNotExist) {
			return nil
		}
		return fmt.Errorf("look up endpoint %s: %w", ep.IP.IP, err)
	}
	if ep.HostIfindex != 0 && int(cur.Ifindex) != ep.HostIfindex {
		return nil
	}
	if err := m.Delete(key); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %s from map: %w", ep.IP.IP, err)
	}
	return nil
}

// CheckEndpoint verifies the map entry and the attached program.
func (d *Datapath) CheckEndpoint(ep *datapath.Endpoint) error {
	m, err := d.endpoints()
	if err != nil {
		return err
	}
	key, err := EndpointKey(ep.IP.IP)
	if err != nil {
		return err
	}
	want, err := EndpointValue(ep)
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
	return d.loader.CheckAttached(d.objs, ep.HostVeth, ep.HostIfindex, loader.HookPodIngress)
}

// ReleaseNode keeps programs and maps loaded when the last pod goes: they
// cost nothing idle, and the next ADD does not pay for a reload.
func (d *Datapath) ReleaseNode(remaining int) error { return nil }

// Status reports whether the programs are loaded or can be.
func (d *Datapath) Status() error {
	return d.EnsureNode()
}

// Sweep removes endpoint entries and attachments that belong to none of
// keep (GC).
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
	return errors.Join(errs...)
}

// Metrics sums the per-CPU counters by name.
func (d *Datapath) Metrics() (map[string]ternbpf.TernMetricValue, error) {
	if err := d.EnsureNode(); err != nil {
		return nil, err
	}
	m, err := d.objs.Map(ternbpf.TernMapTernMetrics)
	if err != nil {
		return nil, err
	}
	return ReadMetrics(m)
}
