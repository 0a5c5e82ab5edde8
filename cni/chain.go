package cni

import (
	"encoding/json"
	"fmt"
	"net"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// Plugins may follow tern in a conflist (portmap, bandwidth, tuning, sbr;
// README "Chaining"). Two of them change what Tern's eBPF datapath relies
// on, so Tern takes the same capability arguments and acts on them:
//
//   - mac: tuning (or the runtime) may set the pod interface's MAC. The eBPF
//     datapath's anti-spoofing check, its MAC rewrite and the node's
//     neighbour entry use the MAC Tern recorded, so Tern sets a requested
//     MAC itself, before it records the endpoint; tuning setting the same
//     MAC afterwards changes nothing.
//   - bandwidth: the bandwidth plugin shapes with a tbf qdisc on the host
//     veth's egress and an ifb mirred from its ingress. On the eBPF datapath
//     bpf_redirect_peer skips the host veth's egress, and the TCX program
//     at its ingress decides (redirect_peer, redirect_neigh) before the
//     clsact filter that mirrors to the ifb runs, so the limits would
//     silently not apply. A pod with limits is therefore recorded as
//     shaped (datapath.Endpoint.Shaped): the eBPF datapath hands its
//     traffic to the host stack both ways (bpf/lib/shaped.h). Limits Tern
//     cannot see (written into the bandwidth plugin's own entry) are
//     reported by CHECK (checkShaping).

// runtimeConfig is the part of the runtime's capability arguments Tern
// reads: present only for capabilities declared in Tern's conflist entry.
type runtimeConfig struct {
	Mac       string           `json:"mac,omitempty"`
	Bandwidth *bandwidthLimits `json:"bandwidth,omitempty"`
}

// bandwidthLimits is runtimeConfig.bandwidth as the bandwidth plugin reads
// it (rates in bit/s, bursts in bits).
type bandwidthLimits struct {
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
}

func parseRuntimeConfig(stdin []byte) (*runtimeConfig, error) {
	var c struct {
		RuntimeConfig runtimeConfig `json:"runtimeConfig"`
	}
	if err := json.Unmarshal(stdin, &c); err != nil {
		return nil, fieldErr("runtimeConfig", "%v", err)
	}
	rc := &c.RuntimeConfig
	if rc.Mac != "" {
		mac, err := net.ParseMAC(rc.Mac)
		if err != nil || len(mac) != 6 || mac[0]&1 != 0 || isZeroMAC(mac) {
			return nil, fieldErr("runtimeConfig.mac", "%q is not a unicast Ethernet address", rc.Mac)
		}
	}
	return rc, nil
}

func isZeroMAC(m net.HardwareAddr) bool {
	for _, b := range m {
		if b != 0 {
			return false
		}
	}
	return true
}

// shaped reports whether the runtime asks for bandwidth limits: the
// bandwidth plugin following Tern will shape the pod on its host veth.
func (rc *runtimeConfig) shaped() bool {
	return rc.Bandwidth != nil && (rc.Bandwidth.IngressRate != 0 || rc.Bandwidth.EgressRate != 0)
}

// setPodMAC gives the pod interface the requested MAC (runtimeConfig.mac)
// and returns it; with none requested it returns the current one.
func setPodMAC(podNS ns.NetNS, ifname, mac string, current net.HardwareAddr) (net.HardwareAddr, error) {
	if mac == "" {
		return current, nil
	}
	hw, err := net.ParseMAC(mac)
	if err != nil {
		return nil, err
	}
	err = podNS.Do(func(ns.NetNS) error {
		lk, err := netlinksafe.LinkByName(ifname)
		if err != nil {
			return err
		}
		return netlink.LinkSetHardwareAddr(lk, hw)
	})
	if err != nil {
		return nil, fmt.Errorf("set MAC %s on pod interface %s: %w", hw, ifname, err)
	}
	return hw, nil
}

// checkShaping reports traffic shaping on the host veth of an eBPF
// endpoint that is not shaped (what the bandwidth plugin sets up: a tbf
// root qdisc for the pod's ingress, an ingress filter mirroring to an ifb
// for its egress), which the datapath's fast path bypasses: limits Tern did
// not see at ADD, e.g. rates written into the bandwidth plugin's own
// conflist entry rather than passed as runtimeConfig.bandwidth.
func checkShaping(host netlink.Link) error {
	name := host.Attrs().Name
	qdiscs, err := netlinksafe.QdiscList(host)
	if err != nil {
		return fmt.Errorf("list qdiscs of %s: %w", name, err)
	}
	for _, q := range qdiscs {
		if q.Type() == "tbf" {
			return fmt.Errorf("host veth %s has a tbf qdisc (bandwidth plugin?): the eBPF datapath bypasses it, pod-to-pod traffic is not limited; pass the limits as runtimeConfig.bandwidth (capability \"bandwidth\" in Tern's entry)", name)
		}
	}
	filters, err := netlinksafe.FilterList(host, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return nil // no ingress or clsact qdisc: nothing mirrored
	}
	for _, f := range filters {
		u, ok := f.(*netlink.U32)
		if !ok {
			continue
		}
		for _, a := range u.Actions {
			if m, ok := a.(*netlink.MirredAction); ok && m.MirredAction == netlink.TCA_EGRESS_REDIR {
				return fmt.Errorf("host veth %s mirrors its ingress to ifindex %d (bandwidth plugin?): the eBPF datapath redirects before that filter runs, the pod's egress is not limited; pass the limits as runtimeConfig.bandwidth (capability \"bandwidth\" in Tern's entry)", name, m.Ifindex)
			}
		}
	}
	return nil
}
