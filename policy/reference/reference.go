// Package reference is the reference evaluator of NetworkPolicy: it decides
// a packet straight from the API objects, rule by rule, with no
// precomputation. It is slow on purpose and written to be read against the
// Kubernetes documentation; the compiler and every datapath are tested
// against it.
//
// The semantic choices where Kubernetes leaves room are listed in the
// documentation of package policy.
package reference

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/manifest"
)

// Allowed reports whether the packet may pass: the egress policy of the
// source (if it is a local endpoint) and the ingress policy of the
// destination (if it is a local endpoint) must both allow it. Traffic from a
// host address to a local pod is always allowed in ingress, and traffic from
// a local pod to a host address always in egress. A local pod reaching
// itself is always allowed.
func Allowed(st *manifest.State, topo *policy.Topology, pkt policy.Packet) bool {
	return Decide(st, topo, pkt).Allowed
}

// Decision is a verdict with the reason for it, for test failure messages
// and debugging.
type Decision struct {
	Allowed bool
	Reason  string
}

// Decide is Allowed with the reason.
func Decide(st *manifest.State, topo *policy.Topology, pkt policy.Packet) Decision {
	src := lookupPeer(st, topo, pkt.SrcIP)
	dst := lookupPeer(st, topo, pkt.DstIP)
	if src.pod != nil && src.local && src.ip == dst.ip {
		// Kubernetes: a pod cannot block access to itself (the upstream
		// NetworkPolicy e2e allows a pod reaching itself, also through
		// its own Service, in every case).
		return Decision{true, "a pod reaching itself: " + src.String()}
	}
	var reasons []string
	if src.pod != nil && src.local {
		if isHost(topo, dst.ip) {
			reasons = append(reasons, "egress of "+src.String()+": to host")
		} else {
			ok, why := directionAllowed(st, networkingv1.PolicyTypeEgress, src, dst, pkt)
			reasons = append(reasons, "egress of "+src.String()+": "+why)
			if !ok {
				return Decision{false, strings.Join(reasons, "; ")}
			}
		}
	}
	if dst.pod != nil && dst.local {
		if isHost(topo, src.ip) {
			reasons = append(reasons, "ingress of "+dst.String()+": from host")
		} else {
			ok, why := directionAllowed(st, networkingv1.PolicyTypeIngress, dst, src, pkt)
			reasons = append(reasons, "ingress of "+dst.String()+": "+why)
			if !ok {
				return Decision{false, strings.Join(reasons, "; ")}
			}
		}
	}
	return Decision{true, strings.Join(reasons, "; ")}
}

// peer is one end of a packet.
type peer struct {
	ip    netip.Addr // invalid if not IPv4
	pod   *podInfo   // nil if the address is not an endpoint
	local bool
}

type podInfo struct {
	namespace, name string
	labels          labels.Set
	obj             *corev1.Pod // nil if the endpoint has no Pod object
}

func (p peer) String() string {
	if p.pod == nil {
		return p.ip.String()
	}
	return p.pod.namespace + "/" + p.pod.name
}

func lookupPeer(st *manifest.State, topo *policy.Topology, ip []byte) peer {
	a, ok := policy.Addr(ip)
	if !ok {
		return peer{}
	}
	p := peer{ip: a}
	if topo == nil {
		return p
	}
	ep, ok := topo.Endpoints[a.String()]
	if !ok {
		return p
	}
	p.local = ep.Local
	p.pod = &podInfo{namespace: ep.Namespace, name: ep.Name, labels: labels.Set{}}
	if st != nil {
		if obj := st.Pods[types.NamespacedName{Namespace: ep.Namespace, Name: ep.Name}]; obj != nil {
			p.pod.obj = obj
			p.pod.labels = labels.Set(obj.Labels)
		}
	}
	return p
}

func isHost(topo *policy.Topology, a netip.Addr) bool {
	if topo == nil || !a.IsValid() {
		return false
	}
	for _, h := range topo.Hosts {
		if ha, ok := policy.Addr(h); ok && ha == a {
			return true
		}
	}
	return false
}

// directionAllowed decides one direction for the pod self, with remote the
// other end. The pod is isolated in the direction if any policy of its
// namespace selects it and has the direction in its policy types; then the
// packet must match at least one rule of the direction of one such policy.
func directionAllowed(st *manifest.State, dir networkingv1.PolicyType, self, remote peer, pkt policy.Packet) (bool, string) {
	isolated := false
	for _, np := range policiesOf(st, self.pod.namespace) {
		if !hasType(np, dir) || !selectorMatches(&np.Spec.PodSelector, self.pod.labels) {
			continue
		}
		isolated = true
		if dir == networkingv1.PolicyTypeIngress {
			for i, r := range np.Spec.Ingress {
				if peersMatch(st, np, r.From, remote) && portsMatch(r.Ports, dir, self, remote, pkt) {
					return true, fmt.Sprintf("allowed by %s/%s ingress[%d]", np.Namespace, np.Name, i)
				}
			}
		} else {
			for i, r := range np.Spec.Egress {
				if peersMatch(st, np, r.To, remote) && portsMatch(r.Ports, dir, self, remote, pkt) {
					return true, fmt.Sprintf("allowed by %s/%s egress[%d]", np.Namespace, np.Name, i)
				}
			}
		}
	}
	if !isolated {
		return true, "not isolated"
	}
	return false, "no rule matches"
}

// policiesOf returns the policies of a namespace, sorted by name.
func policiesOf(st *manifest.State, ns string) []*networkingv1.NetworkPolicy {
	if st == nil {
		return nil
	}
	var out []*networkingv1.NetworkPolicy
	for k, np := range st.Policies {
		if k.Namespace == ns {
			out = append(out, np)
		}
	}
	slices.SortFunc(out, func(a, b *networkingv1.NetworkPolicy) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// hasType applies the defaulting of policyTypes: when empty, Ingress always,
// and Egress if the policy has egress rules.
func hasType(np *networkingv1.NetworkPolicy, t networkingv1.PolicyType) bool {
	if len(np.Spec.PolicyTypes) == 0 {
		return t == networkingv1.PolicyTypeIngress || len(np.Spec.Egress) > 0
	}
	for _, pt := range np.Spec.PolicyTypes {
		if pt == t {
			return true
		}
	}
	return false
}

func selectorMatches(sel *metav1.LabelSelector, l labels.Set) bool {
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return false
	}
	return s.Matches(l)
}

// peersMatch: an empty list matches everything; otherwise one peer must.
func peersMatch(st *manifest.State, np *networkingv1.NetworkPolicy, peers []networkingv1.NetworkPolicyPeer, remote peer) bool {
	if len(peers) == 0 {
		return true
	}
	for i := range peers {
		if peerMatches(st, np, &peers[i], remote) {
			return true
		}
	}
	return false
}

func peerMatches(st *manifest.State, np *networkingv1.NetworkPolicy, p *networkingv1.NetworkPolicyPeer, remote peer) bool {
	if p.IPBlock != nil {
		return ipBlockContains(p.IPBlock, remote.ip)
	}
	if remote.pod == nil {
		return false // selectors only ever match pods
	}
	if p.NamespaceSelector != nil {
		if !selectorMatches(p.NamespaceSelector, st.NamespaceLabels(remote.pod.namespace)) {
			return false
		}
	} else if remote.pod.namespace != np.Namespace {
		return false // podSelector alone: the policy's own namespace
	}
	// No podSelector with a namespaceSelector: every pod of those namespaces.
	return p.PodSelector == nil || selectorMatches(p.PodSelector, remote.pod.labels)
}

// ipBlockContains: inside cidr and outside every except.
func ipBlockContains(b *networkingv1.IPBlock, a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	cidr, err := manifest.ParseCIDR(b.CIDR)
	if err != nil || !cidr.Contains(a) {
		return false
	}
	for _, e := range b.Except {
		if ex, err := manifest.ParseCIDR(e); err == nil && ex.Contains(a) {
			return false
		}
	}
	return true
}

// portsMatch: an empty list matches every port of every protocol; otherwise
// one entry must match. A named port is resolved on the destination pod:
// the selected pod for ingress, the remote pod for egress.
func portsMatch(ports []networkingv1.NetworkPolicyPort, dir networkingv1.PolicyType, self, remote peer, pkt policy.Packet) bool {
	if len(ports) == 0 {
		return true
	}
	dstPod := self.pod
	if dir == networkingv1.PolicyTypeEgress {
		dstPod = remote.pod
	}
	for _, p := range ports {
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		if n, ok := protoNumber(proto); !ok || n != pkt.Proto {
			continue
		}
		switch {
		case p.Port == nil:
			return true
		case p.Port.Type == intstr.Int:
			lo, hi := p.Port.IntVal, p.Port.IntVal
			if p.EndPort != nil {
				hi = *p.EndPort
			}
			if int32(pkt.DstPort) >= lo && int32(pkt.DstPort) <= hi {
				return true
			}
		default:
			if dstPod != nil && namedPortIs(dstPod.obj, p.Port.StrVal, proto, pkt.DstPort) {
				return true
			}
		}
	}
	return false
}

func namedPortIs(pod *corev1.Pod, name string, proto corev1.Protocol, port uint16) bool {
	if pod == nil {
		return false
	}
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			cproto := cp.Protocol
			if cproto == "" {
				cproto = corev1.ProtocolTCP
			}
			if cp.Name == name && cproto == proto && cp.ContainerPort == int32(port) {
				return true
			}
		}
	}
	return false
}

func protoNumber(p corev1.Protocol) (uint8, bool) {
	switch p {
	case corev1.ProtocolTCP:
		return policy.ProtoTCP, true
	case corev1.ProtocolUDP:
		return policy.ProtoUDP, true
	case corev1.ProtocolSCTP:
		return policy.ProtoSCTP, true
	}
	return 0, false
}
