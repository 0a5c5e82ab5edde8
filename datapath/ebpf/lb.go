package ebpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
	"github.com/ternlabs/tern/services"
)

// Tern's own Service load balancer (network config services: "ebpf",
// bpf/lib/lb.h). ApplyServices writes the compiled Service table into the
// node's load-balancer maps by difference against what the maps hold (the
// pinned maps are the truth, whatever prev says), so that:
//
//   - a frontend and backends that stay are never rewritten;
//   - a backend is added by writing its slot before the count that makes it
//     reachable, and removed by moving the last backend into its slot before
//     the count shrinks: a new flow never finds an empty slot;
//   - established flows are pinned to their backend in tern_lb_ct and never
//     look at the slots again, so moving a surviving backend to another slot
//     leaves its flows alone;
//   - a backend that leaves the slots but is still an endpoint (draining:
//     terminating, not ready, or remote under traffic policy Local) keeps
//     its established flows, as kube-proxy keeps their conntrack entries;
//   - the flows of a backend gone from the endpoints (and of a removed
//     frontend) are deleted from tern_lb_ct and tern_lb_affinity: their
//     next packet is balanced again, to a surviving backend, which answers
//     a TCP segment of a connection it does not know with RST (the
//     client's connection ends instead of waiting for a backend that is
//     gone); a UDP flow (DNS) just moves on. Which backends went is known
//     from prev (backends and draining ones) and, whatever prev says, from
//     the slots the maps held;
//   - tern_lb_empty says "no frontend at all" only while that is true: it
//     is cleared before a frontend is written and set once the last one is
//     gone, so the uplink programs that skip their frontend lookup on it
//     never skip a frontend.

var _ datapath.ServiceBalancer = (*Datapath)(nil)

// LBMaps are the load balancer's maps. Empty is tern_lb_empty, the
// "tern_lb_svc holds no frontend" flag of the uplink programs.
type LBMaps struct {
	Svc, Backends, Rev, CT, Affinity, Empty *cilium.Map
}

// LBMapsOf picks the load balancer's maps out of a loaded collection.
func LBMapsOf(maps map[string]*cilium.Map) (LBMaps, error) {
	m := LBMaps{
		Svc: maps[ternbpf.TernMapTernLbSvc], Backends: maps[ternbpf.TernMapTernLbBackends],
		Rev: maps[ternbpf.TernMapTernLbRev], CT: maps[ternbpf.TernMapTernLbCt],
		Affinity: maps[ternbpf.TernMapTernLbAffinity], Empty: maps[ternbpf.TernMapTernLbEmpty],
	}
	if m.Svc == nil || m.Backends == nil || m.Rev == nil || m.CT == nil || m.Affinity == nil || m.Empty == nil {
		return m, errors.New("the loaded objects lack the load balancer's maps")
	}
	return m, nil
}

// ApplyServices implements datapath.ServiceBalancer.
func (d *Datapath) ApplyServices(prev, next *services.Table) error {
	if next == nil {
		next = &services.Table{}
	}
	if err := d.open(); err != nil {
		return err
	}
	m, err := LBMapsOf(d.objs.Maps)
	if err != nil {
		return err
	}
	lock, err := loader.Lock(filepath.Join(d.cfg.StateDir, "bpf-lb.lock"))
	if err != nil {
		return err
	}
	defer lock.Unlock()
	return ApplyLBTable(m, prev, next)
}

// syncLBEmpty sets tern_lb_empty when tern_lb_svc holds no frontend: a
// node whose networks all leave Services to kube-proxy never applies a
// Service table, and its uplink programs would look every packet up in an
// empty map. Under the load balancer's lock, as ApplyServices. Objects
// without the load balancer's maps (tests' loaders) have nothing to mark.
func (d *Datapath) syncLBEmpty() error {
	m, err := LBMapsOf(d.objs.Maps)
	if err != nil {
		return nil
	}
	// Set already (the common case, an ADD on a set-up node): no lock.
	// Only ApplyLBTable clears it, and it writes a frontend right after.
	var empty uint32
	if err := m.Empty.Lookup(uint32(0), &empty); err == nil && empty != 0 {
		return nil
	}
	lock, err := loader.Lock(filepath.Join(d.cfg.StateDir, "bpf-lb.lock"))
	if err != nil {
		return err
	}
	defer lock.Unlock()
	return markLBEmpty(m)
}

// markLBEmpty sets tern_lb_empty if tern_lb_svc holds no frontend. The
// caller holds the load balancer's lock.
func markLBEmpty(m LBMaps) error {
	var k ternbpf.TernLbSvcKey
	err := m.Svc.NextKey(nil, &k)
	if err == nil {
		return nil // a frontend: the flag stays as ApplyLBTable left it
	}
	if !errors.Is(err, cilium.ErrKeyNotExist) {
		return fmt.Errorf("read %s: %w", ternbpf.TernMapTernLbSvc, err)
	}
	return setLBEmpty(m, true)
}

func lbAddr(a netip.Addr) uint32 {
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func lbPort(p uint16) uint16 {
	return binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, p))
}

func lbFrontendKey(f services.Frontend) ternbpf.TernLbSvcKey {
	return ternbpf.TernLbSvcKey{Addr: lbAddr(f.IP), Port: lbPort(f.Port), Proto: f.Proto}
}

func lbBackendValue(b services.Backend) ternbpf.TernLbBackend {
	return ternbpf.TernLbBackend{Addr: lbAddr(b.IP), Port: lbPort(b.Port)}
}

// lbFlowKey names a backend of a frontend id in the purge of flows.
type lbFlowKey struct {
	id      uint32
	backend ternbpf.TernLbBackend
}

// lbKnown is every backend of an entry, chosen or draining.
func lbKnown(e services.Entry) map[ternbpf.TernLbBackend]bool {
	out := map[ternbpf.TernLbBackend]bool{}
	for _, b := range e.Backends {
		out[lbBackendValue(b)] = true
	}
	for _, b := range e.Draining {
		out[lbBackendValue(b)] = true
	}
	return out
}

// ApplyLBTable brings the maps in line with next (see the comment at the
// top of this file for the order of writes). prev (nil: unknown) is the
// table applied before: draining backends that leave it end their flows.
func ApplyLBTable(m LBMaps, prev, next *services.Table) error {
	cur := map[ternbpf.TernLbSvcKey]ternbpf.TernLbSvc{}
	var (
		k ternbpf.TernLbSvcKey
		v ternbpf.TernLbSvc
	)
	it := m.Svc.Iterate()
	for it.Next(&k, &v) {
		cur[k] = v
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernLbSvc, err)
	}
	want := map[ternbpf.TernLbSvcKey]services.Entry{}
	for _, e := range next.Entries {
		if !e.IP.Is4() || e.ID == 0 {
			return fmt.Errorf("service table: frontend %s: not IPv4 or no id", e.Frontend)
		}
		want[lbFrontendKey(e.Frontend)] = e
	}
	// Frontends to write: the flag that lets the programs skip their
	// lookup goes first.
	if len(want) > 0 {
		if err := setLBEmpty(m, false); err != nil {
			return err
		}
	}
	gone := map[uint32]bool{}       // frontend ids whose flows all end
	removed := map[lbFlowKey]bool{} // backends whose flows end
	if prev != nil {
		for _, pe := range prev.Entries {
			ne, ok := next.Lookup(pe.Frontend)
			if !ok || ne.ID != pe.ID {
				continue // the frontend goes: all its flows end below
			}
			still := lbKnown(ne)
			for b := range lbKnown(pe) {
				if !still[b] {
					removed[lbFlowKey{uint32(pe.ID), b}] = true
				}
			}
		}
	}
	// Frontends that go, or whose id changed (a table recompiled without
	// its predecessor): stop new flows first, then the slots and the
	// reverse translation.
	for k, s := range cur {
		if e, ok := want[k]; ok && uint32(e.ID) == s.Id {
			continue
		}
		if err := m.Svc.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			return fmt.Errorf("delete frontend: %w", err)
		}
		for slot := range s.Count {
			if err := m.Backends.Delete(ternbpf.TernLbSlotKey{Id: s.Id, Slot: slot}); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
				return fmt.Errorf("delete backend slot: %w", err)
			}
		}
		if err := m.Rev.Delete(s.Id); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			return fmt.Errorf("delete rev-NAT entry: %w", err)
		}
		gone[s.Id] = true
		delete(cur, k)
	}
	// The flows of removed frontends end before their ids can be reused.
	if err := purgeLBFlows(m, gone, nil); err != nil {
		return err
	}
	for k, e := range want {
		if err := applyFrontend(m, k, e, cur, removed); err != nil {
			return fmt.Errorf("frontend %s: %w", e.Frontend, err)
		}
	}
	if err := purgeLBFlows(m, nil, removed); err != nil {
		return err
	}
	// No frontend left (this is the only writer, under its lock): the
	// programs may skip the lookup from now on.
	if len(want) == 0 {
		return setLBEmpty(m, true)
	}
	return nil
}

// setLBEmpty writes tern_lb_empty, unless it holds that already.
func setLBEmpty(m LBMaps, empty bool) error {
	var want uint32
	if empty {
		want = 1
	}
	var have uint32
	if err := m.Empty.Lookup(uint32(0), &have); err == nil && have == want {
		return nil
	}
	if err := m.Empty.Put(uint32(0), want); err != nil {
		return fmt.Errorf("write %s: %w", ternbpf.TernMapTernLbEmpty, err)
	}
	return nil
}

// applyFrontend writes one frontend and its slots by difference.
func applyFrontend(m LBMaps, k ternbpf.TernLbSvcKey, e services.Entry, cur map[ternbpf.TernLbSvcKey]ternbpf.TernLbSvc, removed map[lbFlowKey]bool) error {
	id := uint32(e.ID)
	val := ternbpf.TernLbSvc{Id: id, AffinityTimeout: e.AffinityTimeout}
	if len(e.Backends) == 0 && e.NoBackends == services.NoBackendsDrop {
		val.Flags |= uint32(ternbpf.TernLbSvcFlagsLB_SVC_F_DROP)
	}
	// The reverse translation exists before anything can use the id.
	fe := ternbpf.TernLbBackend{Addr: k.Addr, Port: k.Port}
	var have ternbpf.TernLbBackend
	if err := m.Rev.Lookup(id, &have); err != nil || have != fe {
		if err := m.Rev.Put(id, fe); err != nil {
			return fmt.Errorf("rev-NAT entry: %w", err)
		}
	}
	old, exists := cur[k]
	var slots []ternbpf.TernLbBackend
	if exists {
		for slot := range old.Count {
			var b ternbpf.TernLbBackend
			if err := m.Backends.Lookup(ternbpf.TernLbSlotKey{Id: id, Slot: slot}, &b); err != nil {
				return fmt.Errorf("read slot %d: %w", slot, err)
			}
			slots = append(slots, b)
		}
	}
	wantSet := map[ternbpf.TernLbBackend]bool{}
	for _, b := range e.Backends {
		wantSet[lbBackendValue(b)] = true
	}
	draining := map[ternbpf.TernLbBackend]bool{}
	for _, b := range e.Draining {
		draining[lbBackendValue(b)] = true
	}
	haveSet := map[ternbpf.TernLbBackend]bool{}
	for _, b := range slots {
		haveSet[b] = true
	}
	count := uint32(len(slots))
	putSvc := func() error {
		v := val
		v.Count = count
		if exists && v == old {
			return nil
		}
		if err := m.Svc.Put(k, v); err != nil {
			return fmt.Errorf("write frontend: %w", err)
		}
		old, exists = v, true
		return nil
	}
	// Additions: slots first, then the count that makes them reachable.
	for _, b := range e.Backends {
		bv := lbBackendValue(b)
		if haveSet[bv] {
			continue
		}
		if err := m.Backends.Put(ternbpf.TernLbSlotKey{Id: id, Slot: count}, bv); err != nil {
			return fmt.Errorf("write slot %d: %w", count, err)
		}
		slots = append(slots, bv)
		haveSet[bv] = true
		count++
	}
	if err := putSvc(); err != nil {
		return err
	}
	// Removals: the last backend moves into the hole, then the count
	// shrinks, then the last slot goes.
	for i := 0; i < len(slots); {
		if wantSet[slots[i]] {
			i++
			continue
		}
		if !draining[slots[i]] {
			removed[lbFlowKey{id, slots[i]}] = true
		}
		last := len(slots) - 1
		if i != last {
			if err := m.Backends.Put(ternbpf.TernLbSlotKey{Id: id, Slot: uint32(i)}, slots[last]); err != nil {
				return fmt.Errorf("move slot %d to %d: %w", last, i, err)
			}
			slots[i] = slots[last]
		}
		slots = slots[:last]
		count = uint32(len(slots))
		if err := putSvc(); err != nil {
			return err
		}
		if err := m.Backends.Delete(ternbpf.TernLbSlotKey{Id: id, Slot: uint32(last)}); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			return fmt.Errorf("delete slot %d: %w", last, err)
		}
	}
	return putSvc() // flags and affinity when nothing else changed
}

// purgeLBFlows deletes the conntrack and affinity entries of every flow of
// a frontend id in ids, and of every (id, backend) in backends.
func purgeLBFlows(m LBMaps, ids map[uint32]bool, backends map[lbFlowKey]bool) error {
	if len(ids) == 0 && len(backends) == 0 {
		return nil
	}
	var (
		k     ternbpf.TernNatTuple
		v     ternbpf.TernLbCtEntry
		stale []ternbpf.TernNatTuple
	)
	it := m.CT.Iterate()
	for it.Next(&k, &v) {
		b := ternbpf.TernLbBackend{Addr: v.Addr, Port: v.Port} // forward: the backend
		if v.Flags&uint16(ternbpf.TernLbCtFlagsLB_CT_F_REPLY) != 0 {
			b = ternbpf.TernLbBackend{Addr: k.Saddr, Port: k.Sport} // reply: sent by the backend
		}
		if ids[v.RevId] || backends[lbFlowKey{v.RevId, b}] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernLbCt, err)
	}
	var errs []error
	for _, k := range stale {
		if err := m.CT.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete from %s: %w", ternbpf.TernMapTernLbCt, err))
		}
	}
	var (
		ak     ternbpf.TernLbAffinityKey
		av     ternbpf.TernLbAffinity
		staleA []ternbpf.TernLbAffinityKey
	)
	ait := m.Affinity.Iterate()
	for ait.Next(&ak, &av) {
		if ids[ak.Id] || backends[lbFlowKey{ak.Id, ternbpf.TernLbBackend{Addr: av.Addr, Port: av.Port}}] {
			staleA = append(staleA, ak)
		}
	}
	if err := ait.Err(); err != nil {
		return fmt.Errorf("iterate %s: %w", ternbpf.TernMapTernLbAffinity, err)
	}
	for _, k := range staleA {
		if err := m.Affinity.Delete(k); err != nil && !errors.Is(err, cilium.ErrKeyNotExist) {
			errs = append(errs, fmt.Errorf("delete from %s: %w", ternbpf.TernMapTernLbAffinity, err))
		}
	}
	return errors.Join(errs...)
}
