package ebpf

import (
	"net/netip"
	"testing"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/services"
)

func newLBMaps(t *testing.T) LBMaps {
	t.Helper()
	testutil.RequirePrivileged(t)
	spec, err := ternbpf.LoadTern()
	if err != nil {
		t.Fatal(err)
	}
	mk := func(name string) *cilium.Map {
		ms := spec.Maps[name].Copy()
		ms.Pinning = cilium.PinNone
		m, err := cilium.NewMap(ms)
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	return LBMaps{
		Svc: mk(ternbpf.TernMapTernLbSvc), Backends: mk(ternbpf.TernMapTernLbBackends),
		Rev: mk(ternbpf.TernMapTernLbRev), CT: mk(ternbpf.TernMapTernLbCt),
		Affinity: mk(ternbpf.TernMapTernLbAffinity), Empty: mk(ternbpf.TernMapTernLbEmpty),
	}
}

func lbEmpty(t *testing.T, m LBMaps) bool {
	t.Helper()
	var v uint32
	if err := m.Empty.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return v != 0
}

// tern_lb_empty, which lets the uplink programs skip their frontend lookup
// (bpf TestLBNoFrontendsFlag), is set only while tern_lb_svc holds no
// frontend: a new map says "look"; markLBEmpty (node set-up of a node that
// never applies a Service table) sets it on an empty map and leaves it
// alone over a frontend; ApplyLBTable clears it with the first frontend,
// keeps it clear while one is left, sets it when the last goes.
func TestLBEmptyFlag(t *testing.T) {
	m := newLBMaps(t)
	if lbEmpty(t, m) {
		t.Fatal("a new map says empty")
	}
	if err := markLBEmpty(m); err != nil {
		t.Fatal(err)
	}
	if !lbEmpty(t, m) {
		t.Fatal("no frontend, not marked empty")
	}
	fe := func(port, id uint16) services.Entry {
		return services.Entry{Frontend: services.Frontend{IP: netip.MustParseAddr("192.168.1.10"), Port: port, Proto: services.ProtoTCP},
			ID: id, Backends: []services.Backend{{IP: netip.MustParseAddr("10.244.1.5"), Port: 8080}}}
	}
	apply := func(wantEmpty bool, entries ...services.Entry) {
		t.Helper()
		if err := ApplyLBTable(m, nil, &services.Table{Entries: entries}); err != nil {
			t.Fatal(err)
		}
		if got := lbEmpty(t, m); got != wantEmpty {
			t.Errorf("%d frontends: empty flag %v", len(entries), got)
		}
		if n := lbCount[ternbpf.TernLbSvcKey, ternbpf.TernLbSvc](t, m.Svc); n != len(entries) {
			t.Errorf("%d frontends in the map, want %d", n, len(entries))
		}
	}
	apply(false, fe(30080, 1))
	if err := markLBEmpty(m); err != nil {
		t.Fatal(err)
	}
	if lbEmpty(t, m) {
		t.Error("marked empty over a frontend")
	}
	apply(false, fe(30080, 1), fe(30081, 2))
	apply(false, fe(30081, 2))
	apply(true)
	apply(true)
	apply(false, fe(30082, 3))
}

func lbSlots(t *testing.T, m LBMaps, f services.Frontend) (ternbpf.TernLbSvc, []netip.AddrPort) {
	t.Helper()
	var s ternbpf.TernLbSvc
	if err := m.Svc.Lookup(lbFrontendKey(f), &s); err != nil {
		t.Fatalf("frontend %s: %v", f, err)
	}
	var out []netip.AddrPort
	for slot := range s.Count {
		var b ternbpf.TernLbBackend
		if err := m.Backends.Lookup(ternbpf.TernLbSlotKey{Id: s.Id, Slot: slot}, &b); err != nil {
			t.Fatalf("slot %d: %v", slot, err)
		}
		out = append(out, netip.AddrPortFrom(netip.AddrFrom4([4]byte(natIP(b.Addr).To4())), lbPort(b.Port)))
	}
	return s, out
}

func lbCount[K, V any](t *testing.T, m *cilium.Map) int {
	t.Helper()
	var (
		k K
		v V
		n int
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// ApplyLBTable by difference: a removed backend's slot is taken by the
// last one (survivors elsewhere keep their slots), the count follows, the
// removed backend's flows and affinity go while a survivor's stay; a
// removed frontend takes its slots, rev-NAT entry and flows with it.
func TestApplyLBTable(t *testing.T) {
	m := newLBMaps(t)
	fe := services.Frontend{IP: netip.MustParseAddr("10.96.0.10"), Port: 53, Proto: services.ProtoUDP}
	be := func(last byte) services.Backend {
		return services.Backend{IP: netip.AddrFrom4([4]byte{10, 244, 1, last}), Port: 5353}
	}
	entry := func(bs ...services.Backend) *services.Table {
		return &services.Table{Entries: []services.Entry{{Frontend: fe, ID: 3, AffinityTimeout: 60, Backends: bs}}}
	}
	if err := ApplyLBTable(m, nil, entry(be(1), be(2), be(3))); err != nil {
		t.Fatal(err)
	}
	s, slots := lbSlots(t, m, fe)
	if s.Id != 3 || s.Count != 3 || s.AffinityTimeout != 60 || len(slots) != 3 || slots[0].Addr() != be(1).IP {
		t.Fatalf("frontend %+v slots %v", s, slots)
	}
	var rev ternbpf.TernLbBackend
	if err := m.Rev.Lookup(uint32(3), &rev); err != nil || rev.Addr != lbAddr(fe.IP) || rev.Port != lbPort(53) {
		t.Fatalf("rev-NAT %+v: %v", rev, err)
	}

	// Flows pinned to backends 1 and 2, both directions, and client
	// affinity to 2, as tern_from_pod writes them.
	client := netip.MustParseAddr("10.244.1.50")
	flow := func(b services.Backend, sport uint16) {
		t.Helper()
		fwd := ternbpf.TernNatTuple{Saddr: lbAddr(client), Daddr: lbAddr(fe.IP), Sport: lbPort(sport), Dport: lbPort(53), Proto: services.ProtoUDP}
		rep := ternbpf.TernNatTuple{Saddr: lbAddr(b.IP), Daddr: lbAddr(client), Sport: lbPort(b.Port), Dport: lbPort(sport), Proto: services.ProtoUDP}
		if err := m.CT.Put(fwd, ternbpf.TernLbCtEntry{Addr: lbAddr(b.IP), Port: lbPort(b.Port), RevId: 3}); err != nil {
			t.Fatal(err)
		}
		if err := m.CT.Put(rep, ternbpf.TernLbCtEntry{Addr: lbAddr(client), Port: lbPort(sport), RevId: 3, Flags: uint16(ternbpf.TernLbCtFlagsLB_CT_F_REPLY)}); err != nil {
			t.Fatal(err)
		}
	}
	flow(be(1), 1000)
	flow(be(2), 2000)
	if err := m.Affinity.Put(ternbpf.TernLbAffinityKey{Client: lbAddr(client), Id: 3}, ternbpf.TernLbAffinity{Addr: lbAddr(be(2).IP), Port: lbPort(5353), Pad: 1}); err != nil {
		t.Fatal(err)
	}

	// 2 leaves, 4 comes: 1 keeps slot 0, the hole of 2 is filled.
	if err := ApplyLBTable(m, entry(be(1), be(2), be(3)), entry(be(1), be(3), be(4))); err != nil {
		t.Fatal(err)
	}
	s, slots = lbSlots(t, m, fe)
	if s.Count != 3 || slots[0].Addr() != be(1).IP {
		t.Fatalf("after churn: %+v %v", s, slots)
	}
	got := map[netip.Addr]bool{}
	for _, a := range slots {
		got[a.Addr()] = true
	}
	if !got[be(1).IP] || !got[be(3).IP] || !got[be(4).IP] || got[be(2).IP] {
		t.Errorf("slots %v", slots)
	}
	if n := lbCount[ternbpf.TernNatTuple, ternbpf.TernLbCtEntry](t, m.CT); n != 2 {
		t.Errorf("%d conntrack entries left, want the 2 of backend 1's flow", n)
	}
	var e ternbpf.TernLbCtEntry
	if err := m.CT.Lookup(ternbpf.TernNatTuple{Saddr: lbAddr(client), Daddr: lbAddr(fe.IP), Sport: lbPort(1000), Dport: lbPort(53), Proto: services.ProtoUDP}, &e); err != nil {
		t.Errorf("backend 1's flow: %v", err)
	}
	if n := lbCount[ternbpf.TernLbAffinityKey, ternbpf.TernLbAffinity](t, m.Affinity); n != 0 {
		t.Errorf("affinity to the removed backend kept")
	}

	// No backend left, traffic policy Local: the frontend drops.
	tab := entry()
	tab.Entries[0].NoBackends = services.NoBackendsDrop
	if err := ApplyLBTable(m, nil, tab); err != nil {
		t.Fatal(err)
	}
	if s, slots = lbSlots(t, m, fe); s.Count != 0 || len(slots) != 0 || s.Flags != uint32(ternbpf.TernLbSvcFlagsLB_SVC_F_DROP) {
		t.Errorf("no backends: %+v", s)
	}
	if n := lbCount[ternbpf.TernLbSlotKey, ternbpf.TernLbBackend](t, m.Backends); n != 0 {
		t.Errorf("%d slots left", n)
	}

	// The frontend goes: everything of it goes.
	flow(be(1), 1000)
	if err := ApplyLBTable(m, nil, &services.Table{}); err != nil {
		t.Fatal(err)
	}
	for name, mm := range map[string]*cilium.Map{"svc": m.Svc, "rev": m.Rev, "ct": m.CT, "backends": m.Backends} {
		var k, v []byte
		if mm.Iterate().Next(&k, &v) {
			t.Errorf("%s not empty", name)
		}
	}
}

// A backend that leaves the slots but stays an endpoint (terminating)
// keeps its established flows; when it then leaves the endpoints, they end.
func TestApplyLBTableDraining(t *testing.T) {
	m := newLBMaps(t)
	fe := services.Frontend{IP: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: services.ProtoTCP}
	b1 := services.Backend{IP: netip.MustParseAddr("10.244.1.1"), Port: 8080}
	b2 := services.Backend{IP: netip.MustParseAddr("10.244.1.2"), Port: 8080}
	tab := func(backends, draining []services.Backend) *services.Table {
		return &services.Table{Entries: []services.Entry{{Frontend: fe, ID: 1, Backends: backends, Draining: draining}}}
	}
	both := tab([]services.Backend{b1, b2}, nil)
	if err := ApplyLBTable(m, nil, both); err != nil {
		t.Fatal(err)
	}
	client := netip.MustParseAddr("10.244.1.50")
	fwd := ternbpf.TernNatTuple{Saddr: lbAddr(client), Daddr: lbAddr(fe.IP), Sport: lbPort(1000), Dport: lbPort(80), Proto: services.ProtoTCP}
	if err := m.CT.Put(fwd, ternbpf.TernLbCtEntry{Addr: lbAddr(b2.IP), Port: lbPort(8080), RevId: 1}); err != nil {
		t.Fatal(err)
	}
	draining := tab([]services.Backend{b1}, []services.Backend{b2})
	if err := ApplyLBTable(m, both, draining); err != nil {
		t.Fatal(err)
	}
	if _, slots := lbSlots(t, m, fe); len(slots) != 1 || slots[0].Addr() != b1.IP {
		t.Errorf("slots while b2 drains: %v", slots)
	}
	var e ternbpf.TernLbCtEntry
	if err := m.CT.Lookup(fwd, &e); err != nil {
		t.Errorf("the draining backend's flow was ended: %v", err)
	}
	if err := ApplyLBTable(m, draining, tab([]services.Backend{b1}, nil)); err != nil {
		t.Fatal(err)
	}
	if err := m.CT.Lookup(fwd, &e); err == nil {
		t.Errorf("the flow of a backend gone from the endpoints stayed")
	}
}
