// Package policy holds what the NetworkPolicy packages share: the packet and
// the topology (which IP is which pod, which pods live on this node, which
// IPs are the node itself).
//
// The packages below it:
//
//   - manifest: decoding of Pod, Namespace and NetworkPolicy manifests
//     (strict), their validation, and State, the cluster state the policy
//     is computed from.
//   - reference: the reference evaluator, packet -> verdict straight from
//     the API objects. It is the definition every datapath is checked
//     against.
//   - compile: the compiler from State + Topology to a datapath-neutral
//     RuleSet (endpoint map, ipcache LPM, policy LPM), its binary map
//     layouts, Diff, and Simulate, the executable specification of the
//     per-packet lookups the eBPF program does.
//
// Semantics are those of Kubernetes NetworkPolicy, with these choices where
// Kubernetes leaves room or where this package has to decide:
//
//   - Traffic between a local pod and a host IP (an address of the node the
//     pod runs on) is always allowed, in both directions, as Kubernetes
//     requires: ingress from a host IP and egress to a host IP pass whatever
//     the pod's policies say. (ipBlocks still match host IPs by IP, which
//     only matters for policies of pods on other nodes.)
//   - A pod's traffic to its own IP (which reaches the node only through
//     its own Service: the node hairpins it back after the DNAT) is always
//     allowed: Kubernetes says a pod cannot block access to itself.
//   - With Services translated by the host stack (kube-proxy), policy is
//     decided on the translated packet: egress sees the backend pod, and
//     ingress the client's address from before any masquerade the stack
//     did (a NodePort client, not the node). See docs/services.md.
//   - ipBlock matches by IP, pod IPs included (Kubernetes leaves this to the
//     implementation).
//   - Named ports are looked up in spec.containers[*].ports of the
//     destination pod, by name and protocol. Init containers are ignored.
//   - A namespace always carries the label kubernetes.io/metadata.name=<name>
//     (the API server sets it); a namespace without a Namespace object has
//     only that label.
//   - Only IPv4 is handled: an address that is not IPv4 is never an endpoint
//     and never inside an ipBlock.
package policy

import (
	"fmt"
	"net"
	"net/netip"
)

// Protocol numbers of the protocols NetworkPolicy ports can name.
const (
	ProtoTCP  uint8 = 6
	ProtoUDP  uint8 = 17
	ProtoSCTP uint8 = 132
)

// Packet is the first packet of a connection as policy sees it. Replies of
// allowed connections are the datapath's business (conntrack), not policy's.
type Packet struct {
	SrcIP   net.IP
	DstIP   net.IP
	Proto   uint8  // IP protocol number: 6 TCP, 17 UDP, 132 SCTP, others have no ports
	DstPort uint16 // host byte order; ignored for protocols without ports
}

func (p Packet) String() string {
	return fmt.Sprintf("%s -> %s proto %d port %d", p.SrcIP, p.DstIP, p.Proto, p.DstPort)
}

// Endpoint is a pod IP.
type Endpoint struct {
	Namespace string
	Name      string
	// Local is true for pods on this node. Policy of a pod is enforced on
	// its own node: egress for packets it sends, ingress for packets it
	// receives. Non-local endpoints are still pods for selectors.
	Local bool
}

// Topology is what policy needs besides the API objects. A pod without a
// Pod object in the State has no labels and no named ports.
type Topology struct {
	// Endpoints maps a pod IPv4 address in dotted-quad form ("10.244.1.5")
	// to the pod.
	Endpoints map[string]Endpoint
	// Hosts are the addresses of this node. Traffic from them to local pods
	// and from local pods to them is always allowed.
	Hosts []net.IP
}

// Validate checks that every endpoint key is a canonical IPv4 address, that
// every host is IPv4, and that no host address is also an endpoint.
func (t *Topology) Validate() error {
	if t == nil {
		return nil
	}
	for ip, ep := range t.Endpoints {
		a, err := netip.ParseAddr(ip)
		if err != nil || !a.Is4() || a.String() != ip {
			return fmt.Errorf("topology: endpoint %q: not a canonical IPv4 address", ip)
		}
		if ep.Namespace == "" || ep.Name == "" {
			return fmt.Errorf("topology: endpoint %s: namespace and name are required", ip)
		}
	}
	for _, h := range t.Hosts {
		a, ok := Addr(h)
		if !ok {
			return fmt.Errorf("topology: host %v: not an IPv4 address", h)
		}
		if _, dup := t.Endpoints[a.String()]; dup {
			return fmt.Errorf("topology: host %s is also an endpoint", a)
		}
	}
	return nil
}

// Addr converts an IPv4 (or IPv4-mapped IPv6) net.IP to a netip.Addr. It
// reports false for anything else.
func Addr(ip net.IP) (netip.Addr, bool) {
	ip4 := ip.To4()
	if ip4 == nil {
		return netip.Addr{}, false
	}
	return netip.AddrFrom4([4]byte(ip4)), true
}
