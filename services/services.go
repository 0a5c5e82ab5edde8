// Package services compiles Kubernetes Services and EndpointSlices of the
// node's state (policy/manifest.State, the same state NetworkPolicy is
// computed from) into a load-balancing table that does not depend on a
// datapath: one entry per frontend (ClusterIP, NodePort on a node address,
// external IP, load-balancer ingress IP; port; protocol) with the backends
// it may send new flows to, chosen the way kube-proxy chooses them.
//
// The eBPF datapath writes the table into its maps by diff (Diff); the
// rev-NAT id of a frontend is stable across compilations (Compile keeps
// the ids of prev), so flows in the datapath's conntrack keep translating
// back to the right frontend while the table changes.
package services

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ternlabs/tern/policy/manifest"
)

// IP protocol numbers of the frontends.
const (
	ProtoTCP  uint8 = 6
	ProtoUDP  uint8 = 17
	ProtoSCTP uint8 = 132
)

// Scopes of a frontend: which address of the Service it is.
const (
	ScopeClusterIP    = "ClusterIP"
	ScopeNodePort     = "NodePort"
	ScopeExternalIP   = "ExternalIP"
	ScopeLoadBalancer = "LoadBalancer"
)

// What a frontend without backends does with a new flow. kube-proxy
// rejects (ICMP port unreachable, TCP RST) when the Service has no usable
// endpoint at all, and drops when endpoints exist but the traffic policy
// (Local) leaves none on this node.
const (
	NoBackendsReject = "reject"
	NoBackendsDrop   = "drop"
)

// Frontend is what a client addresses.
type Frontend struct {
	IP    netip.Addr `json:"ip"`
	Port  uint16     `json:"port"`
	Proto uint8      `json:"proto"`
}

func (f Frontend) String() string { return fmt.Sprintf("%s:%d/%s", f.IP, f.Port, ProtoName(f.Proto)) }

// ProtoName is "TCP", "UDP" or "SCTP".
func ProtoName(p uint8) string {
	switch p {
	case ProtoTCP:
		return "TCP"
	case ProtoUDP:
		return "UDP"
	case ProtoSCTP:
		return "SCTP"
	}
	return fmt.Sprint(p)
}

func compareFrontends(a, b Frontend) int {
	return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port), cmp.Compare(a.Proto, b.Proto))
}

// Backend is an endpoint new flows may be sent to.
type Backend struct {
	IP   netip.Addr `json:"ip"`
	Port uint16     `json:"port"`
	// Local: the endpoint is a pod of this node.
	Local bool `json:"local,omitempty"`
	// Terminating: serving but terminating; used only because no ready
	// endpoint exists.
	Terminating bool `json:"terminating,omitempty"`
}

// Entry is one frontend and what it balances to.
type Entry struct {
	Frontend
	Scope string `json:"scope"`
	// Service is "namespace/name", PortName the Service port's name.
	Service  string `json:"service"`
	PortName string `json:"portName,omitempty"`
	// ID identifies the frontend in the datapath's reverse translation
	// (rev-NAT): 1..65535, stable while the frontend exists.
	ID uint16 `json:"id"`
	// AffinityTimeout is the ClientIP session affinity timeout in
	// seconds, 0 without affinity.
	AffinityTimeout uint32 `json:"affinityTimeout,omitempty"`
	// TrafficPolicyLocal: only backends on this node are used
	// (internalTrafficPolicy Local for a ClusterIP, externalTrafficPolicy
	// Local for the other scopes).
	TrafficPolicyLocal bool `json:"trafficPolicyLocal,omitempty"`
	// Backends sorted by address and port; empty: see NoBackends.
	Backends []Backend `json:"backends"`
	// NoBackends is NoBackendsReject or NoBackendsDrop when Backends is
	// empty.
	NoBackends string `json:"noBackends,omitempty"`
	// Draining are endpoints still in the EndpointSlices that get no new
	// flows (not ready, terminating while a ready one exists, or not on
	// this node under traffic policy Local): their established flows
	// stay, as kube-proxy leaves their conntrack entries. Flows of a
	// backend in neither list end.
	Draining []Backend `json:"draining,omitempty"`
}

// Table is the compiled load-balancing state of a node, entries sorted by
// frontend.
type Table struct {
	Entries []Entry `json:"entries"`
	// Conflicts lists frontends two Services claim; the Service first in
	// namespace/name order keeps the frontend.
	Conflicts []string `json:"conflicts,omitempty"`
}

// Lookup returns the entry of a frontend.
func (t *Table) Lookup(f Frontend) (Entry, bool) {
	if t == nil {
		return Entry{}, false
	}
	i, ok := slices.BinarySearchFunc(t.Entries, f, func(e Entry, f Frontend) int { return compareFrontends(e.Frontend, f) })
	if !ok {
		return Entry{}, false
	}
	return t.Entries[i], true
}

// Node is what Compile needs to know of this node.
type Node struct {
	// Name is the node's name as EndpointSlices give it (nodeName).
	Name string
	// Addrs are the node's addresses: NodePort frontends are built on
	// each IPv4 one.
	Addrs []netip.Addr
	// LocalPods are the addresses of pods on this node; an endpoint is
	// local when its address is one of them or its nodeName is Name.
	LocalPods []netip.Addr
}

// Compile builds the table of st for the node. prev (nil: none) is the
// table last applied, whose rev-NAT ids are kept.
func Compile(st *manifest.State, node Node, prev *Table) (*Table, error) {
	t := &Table{Entries: []Entry{}}
	if st == nil {
		return t, nil
	}
	local := map[netip.Addr]bool{}
	for _, a := range node.LocalPods {
		local[a.Unmap()] = true
	}
	slicesOf := map[types.NamespacedName][]*discoveryv1.EndpointSlice{}
	for _, es := range sortedSlices(st) {
		name := es.Labels[discoveryv1.LabelServiceName]
		if name == "" || es.AddressType != discoveryv1.AddressTypeIPv4 {
			continue
		}
		k := types.NamespacedName{Namespace: es.Namespace, Name: name}
		slicesOf[k] = append(slicesOf[k], es)
	}
	byFrontend := map[Frontend]int{}
	add := func(e Entry) {
		if i, taken := byFrontend[e.Frontend]; taken {
			t.Conflicts = append(t.Conflicts, fmt.Sprintf("%s: Service %s and Service %s; %s keeps it", e.Frontend, t.Entries[i].Service, e.Service, t.Entries[i].Service))
			return
		}
		byFrontend[e.Frontend] = len(t.Entries)
		t.Entries = append(t.Entries, e)
	}
	for _, k := range sortedServices(st) {
		svc := st.Services[k]
		spec := &svc.Spec
		if spec.Type == corev1.ServiceTypeExternalName || spec.ClusterIP == corev1.ClusterIPNone {
			continue
		}
		var affinity uint32
		if spec.SessionAffinity == corev1.ServiceAffinityClientIP {
			affinity = manifest.DefaultAffinityTimeout
			if c := spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
				affinity = uint32(*c.ClientIP.TimeoutSeconds)
			}
		}
		internalLocal := spec.InternalTrafficPolicy != nil && *spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
		externalLocal := spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal
		for _, sp := range spec.Ports {
			proto := protoNumber(sp.Protocol)
			eps := endpoints(slicesOf[k], sp, node.Name, local)
			entry := func(ip netip.Addr, port uint16, scope string, trafficLocal bool) Entry {
				e := Entry{
					Frontend:           Frontend{IP: ip, Port: port, Proto: proto},
					Scope:              scope,
					Service:            k.String(),
					PortName:           sp.Name,
					AffinityTimeout:    affinity,
					TrafficPolicyLocal: trafficLocal,
				}
				e.Backends, e.NoBackends = eps.pick(trafficLocal)
				e.Draining = eps.draining(e.Backends)
				return e
			}
			for _, ip := range clusterIPs(spec) {
				add(entry(ip, uint16(sp.Port), ScopeClusterIP, internalLocal))
			}
			if sp.NodePort != 0 && (spec.Type == corev1.ServiceTypeNodePort || spec.Type == corev1.ServiceTypeLoadBalancer) {
				for _, a := range node.Addrs {
					if a = a.Unmap(); a.Is4() {
						add(entry(a, uint16(sp.NodePort), ScopeNodePort, externalLocal))
					}
				}
			}
			for _, s := range spec.ExternalIPs {
				if a, err := netip.ParseAddr(s); err == nil && a.Unmap().Is4() {
					add(entry(a.Unmap(), uint16(sp.Port), ScopeExternalIP, externalLocal))
				}
			}
			for _, ing := range svc.Status.LoadBalancer.Ingress {
				if a, err := netip.ParseAddr(ing.IP); err == nil && a.Unmap().Is4() {
					add(entry(a.Unmap(), uint16(sp.Port), ScopeLoadBalancer, externalLocal))
				}
			}
		}
	}
	slices.SortFunc(t.Entries, func(a, b Entry) int { return compareFrontends(a.Frontend, b.Frontend) })
	if err := assignIDs(t, prev); err != nil {
		return nil, err
	}
	return t, nil
}

// assignIDs gives every entry the id it had in prev, and new entries the
// lowest ids free.
func assignIDs(t, prev *Table) error {
	used := map[uint16]bool{}
	for i := range t.Entries {
		if old, ok := prev.Lookup(t.Entries[i].Frontend); ok && old.ID != 0 {
			t.Entries[i].ID = old.ID
			used[old.ID] = true
		}
	}
	next := uint16(1)
	for i := range t.Entries {
		if t.Entries[i].ID != 0 {
			continue
		}
		for used[next] {
			if next == 0xffff {
				return fmt.Errorf("services: more than %d frontends", 0xffff)
			}
			next++
		}
		t.Entries[i].ID = next
		used[next] = true
	}
	return nil
}

func clusterIPs(spec *corev1.ServiceSpec) []netip.Addr {
	ips := spec.ClusterIPs
	if len(ips) == 0 && spec.ClusterIP != "" {
		ips = []string{spec.ClusterIP}
	}
	var out []netip.Addr
	for _, s := range ips {
		if a, err := netip.ParseAddr(s); err == nil && a.Unmap().Is4() {
			out = append(out, a.Unmap())
		}
	}
	return out
}

func protoNumber(p corev1.Protocol) uint8 {
	switch p {
	case corev1.ProtocolUDP:
		return ProtoUDP
	case corev1.ProtocolSCTP:
		return ProtoSCTP
	}
	return ProtoTCP
}

// endpoint is one endpoint of a Service port with its conditions.
type endpoint struct {
	Backend
	ready, serving bool
}

type endpointSet []endpoint

// endpoints collects the endpoints of a Service port from its slices: the
// slice port with the Service port's name and protocol gives the port
// (the EndpointSlice controller resolved a named targetPort per pod, so
// two slices may give different numbers). Only an endpoint's first address
// is used, as kube-proxy does; an address:port in two slices counts once
// (the ready one wins).
func endpoints(ess []*discoveryv1.EndpointSlice, sp corev1.ServicePort, nodeName string, local map[netip.Addr]bool) endpointSet {
	proto := sp.Protocol
	if proto == "" {
		proto = corev1.ProtocolTCP
	}
	seen := map[netip.AddrPort]int{}
	var out endpointSet
	for _, es := range ess {
		var port int32
		for _, p := range es.Ports {
			name, pproto := "", corev1.ProtocolTCP
			if p.Name != nil {
				name = *p.Name
			}
			if p.Protocol != nil {
				pproto = *p.Protocol
			}
			if name == sp.Name && pproto == proto && p.Port != nil {
				port = *p.Port
				break
			}
		}
		if port == 0 {
			continue
		}
		for _, ep := range es.Endpoints {
			if len(ep.Addresses) == 0 {
				continue
			}
			a, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil || !a.Unmap().Is4() {
				continue
			}
			a = a.Unmap()
			c := ep.Conditions
			// The API: a nil ready or serving means ready/serving
			// (unknown state, treated as ready); a nil terminating
			// means not terminating.
			ready := c.Ready == nil || *c.Ready
			serving := ready
			if c.Serving != nil {
				serving = *c.Serving
			}
			terminating := c.Terminating != nil && *c.Terminating
			e := endpoint{
				Backend: Backend{
					IP:          a,
					Port:        uint16(port),
					Local:       local[a] || (nodeName != "" && ep.NodeName != nil && *ep.NodeName == nodeName),
					Terminating: terminating,
				},
				ready:   ready && !terminating,
				serving: serving,
			}
			ap := netip.AddrPortFrom(a, uint16(port))
			if i, dup := seen[ap]; dup {
				if e.ready && !out[i].ready {
					out[i] = e
				}
				continue
			}
			seen[ap] = len(out)
			out = append(out, e)
		}
	}
	return out
}

// pick returns the backends new flows go to, as kube-proxy's
// CategorizeEndpoints: the ready endpoints (only local ones with a Local
// traffic policy), or, when none is ready, the serving terminating ones.
// Without backends it says whether to reject (the Service has no usable
// endpoint anywhere) or drop (Local policy, none on this node).
func (s endpointSet) pick(onlyLocal bool) ([]Backend, string) {
	choose := func(ok func(endpoint) bool) []Backend {
		var out []Backend
		for _, e := range s {
			if ok(e) && (!onlyLocal || e.Local) {
				out = append(out, e.Backend)
			}
		}
		return out
	}
	out := choose(func(e endpoint) bool { return e.ready })
	if len(out) == 0 {
		out = choose(func(e endpoint) bool { return e.serving && e.Terminating })
	}
	if len(out) > 0 {
		slices.SortFunc(out, func(a, b Backend) int { return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port)) })
		return out, ""
	}
	usable := false
	for _, e := range s {
		usable = usable || e.ready || (e.serving && e.Terminating)
	}
	if usable {
		return []Backend{}, NoBackendsDrop
	}
	return []Backend{}, NoBackendsReject
}

// draining returns the endpoints of the set that are not among chosen.
func (s endpointSet) draining(chosen []Backend) []Backend {
	in := map[netip.AddrPort]bool{}
	for _, b := range chosen {
		in[netip.AddrPortFrom(b.IP, b.Port)] = true
	}
	var out []Backend
	for _, e := range s {
		if !in[netip.AddrPortFrom(e.IP, e.Port)] {
			out = append(out, e.Backend)
		}
	}
	slices.SortFunc(out, func(a, b Backend) int { return cmp.Or(a.IP.Compare(b.IP), cmp.Compare(a.Port, b.Port)) })
	return out
}

func sortedServices(st *manifest.State) []types.NamespacedName {
	keys := make([]types.NamespacedName, 0, len(st.Services))
	for k := range st.Services {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b types.NamespacedName) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return keys
}

func sortedSlices(st *manifest.State) []*discoveryv1.EndpointSlice {
	out := make([]*discoveryv1.EndpointSlice, 0, len(st.EndpointSlices))
	for _, es := range st.EndpointSlices {
		out = append(out, es)
	}
	slices.SortFunc(out, func(a, b *discoveryv1.EndpointSlice) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	return out
}
