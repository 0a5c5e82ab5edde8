package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
)

var _ datapath.RemoteTable = (*Datapath)(nil)

// SyncRemotes implements datapath.RemoteTable on tern_remote (bpf/lib/remote.h):
// pod CIDR of another node -> that node's IP and, in VXLAN mode, the VXLAN
// device. New and changed entries are written before stale ones go, so a
// CIDR moving between nodes never misses an entry; nothing is cleared and
// rebuilt. It loads the programs and maps if the node has none yet.
func (d *Datapath) SyncRemotes(remotes []datapath.Remote) error {
	if err := d.open(); err != nil {
		return err
	}
	m, err := d.objs.Map(ternbpf.TernMapTernRemote)
	if err != nil {
		return err
	}
	want := map[ternbpf.TernLpmV4Key]ternbpf.TernRemoteNode{}
	for _, r := range remotes {
		k, ok := lpmKey(r.CIDR)
		ip := r.NodeIP.To4()
		if !ok || ip == nil {
			return fmt.Errorf("remote %s via %s: not IPv4", r.CIDR.String(), r.NodeIP)
		}
		want[k] = ternbpf.TernRemoteNode{NodeIp: binary.NativeEndian.Uint32(ip), TunnelIfindex: uint32(r.TunnelIfindex)}
	}
	var (
		key   ternbpf.TernLpmV4Key
		val   ternbpf.TernRemoteNode
		stale []ternbpf.TernLpmV4Key
	)
	have := map[ternbpf.TernLpmV4Key]ternbpf.TernRemoteNode{}
	it := m.Iterate()
	for it.Next(&key, &val) {
		have[key] = val
		if _, ok := want[key]; !ok {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernRemote, err)
	}
	for k, v := range want {
		// The rest of an entry is the programs' (a cached FIB answer,
		// bpf/lib/remote.h): an unchanged node keeps it.
		if cur, ok := have[k]; ok && cur.NodeIp == v.NodeIp && cur.TunnelIfindex == v.TunnelIfindex {
			continue
		}
		if err := m.Put(k, v); err != nil {
			return fmt.Errorf("write remote pod CIDR: %w", err)
		}
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			return fmt.Errorf("remove remote pod CIDR: %w", err)
		}
	}
	return nil
}

// tunnelHooks: tern_from_tunnel at tc ingress of the VXLAN device, and
// tern_to_uplink at its egress (the host stack's DNAT of a pod's Service
// packet to a backend on another node leaves through it: the client's
// egress policy, and the flow recorded so its answers go to the stack).
var tunnelHooks = []loader.Hook{loader.HookTunnelIngress, loader.HookTunnelEgress}

// AttachTunnel implements datapath.RemoteTable.
func (d *Datapath) AttachTunnel(ifname string, ifindex int) error {
	if err := d.open(); err != nil {
		return err
	}
	for _, h := range tunnelHooks {
		if err := d.loader.CheckAttached(d.objs, ifname, ifindex, h); err == nil {
			continue
		}
		if _, err := d.loader.Attach(d.objs, ifname, ifindex, h, d.cfg.Attach); err != nil {
			return fmt.Errorf("attach to VXLAN device %s: %w", ifname, err)
		}
	}
	return nil
}

// DetachTunnel implements datapath.RemoteTable.
func (d *Datapath) DetachTunnel(ifname string) error {
	var errs []error
	for _, h := range tunnelHooks {
		errs = append(errs, d.loader.Detach(ifname, h))
	}
	return errors.Join(errs...)
}
