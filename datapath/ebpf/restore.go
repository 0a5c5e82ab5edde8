package ebpf

import (
	"errors"
	"fmt"

	cilium "github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/netlinksafe"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
)

// Pins lost. When the node's bpffs is unmounted or remounted (or pins are
// removed), every TCX link pinned there is released and the pods' host
// veths run no program: their traffic goes through the host stack with no
// anti-spoofing and no policy. Legacy (clsact) filters keep their programs,
// but those programs keep the old, now orphaned maps. The next ADD loads
// the objects anew (empty maps, Objects.Created) and, before it wires its
// own pod, calls PolicyLost and Restore with the endpoints on record.

// PolicyLost reports whether this load created the node's policy maps
// anew while a rule set may be on record: the caller must then apply the
// whole rule set again, not the difference from the recorded one.
func (d *Datapath) PolicyLost() (bool, error) {
	if err := d.open(); err != nil {
		return false, err
	}
	return d.objs.CreatedAny(), nil
}

// Restore re-wires every endpoint whose state is missing: its endpoints map
// entry (absent or different), or either hook's attachment (no TCX link
// pin and no legacy record). Endpoints whose host veth is gone or was
// recreated are left to DEL and GC. It returns how many it re-wired. When
// this load recreated the maps, every endpoint is re-wired: legacy filters
// still run programs bound to the old maps.
func (d *Datapath) Restore(eps []*datapath.Endpoint) (int, error) {
	m, err := d.endpoints()
	if err != nil {
		return 0, err
	}
	all := d.objs.CreatedAny()
	restored := 0
	var errs []error
	for _, ep := range eps {
		lk, err := netlinksafe.LinkByName(ep.HostVeth)
		if err != nil || (ep.HostIfindex != 0 && lk.Attrs().Index != ep.HostIfindex) {
			continue
		}
		if !all && d.wired(m, ep) {
			continue
		}
		if err := d.AddEndpoint(ep); err != nil {
			errs = append(errs, fmt.Errorf("restore endpoint %s (%s): %w", ep.IP.IP, ep.HostVeth, err))
			continue
		}
		restored++
	}
	return restored, errors.Join(errs...)
}

// wired reports whether ep's map entry is in place and both hooks are on
// record.
func (d *Datapath) wired(m *cilium.Map, ep *datapath.Endpoint) bool {
	for _, hook := range []loader.Hook{loader.HookPodEgress, loader.HookPodIngress} {
		if !d.loader.HasAttachment(ep.HostVeth, hook) {
			return false
		}
	}
	key, err := EndpointKey(ep.IP.IP)
	if err != nil {
		return true // not ours to fix: AddEndpoint would fail the same way
	}
	want, err := d.endpointValue(ep)
	if err != nil {
		return true
	}
	var got ternbpf.TernEndpoint
	if err := m.Lookup(key, &got); err != nil {
		return false
	}
	return got == want
}
