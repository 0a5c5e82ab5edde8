// Package policygen generates small random clusters (namespaces, pods,
// NetworkPolicies, a node topology) and packets for differential tests of
// the policy packages. Generation is deterministic for a given rand source
// and every generated object is valid.
package policygen

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/manifest"
)

// Scenario is one generated cluster as seen from one node.
type Scenario struct {
	Objects  []manifest.Object
	State    *manifest.State
	Topology *policy.Topology
}

// Sizes bounds what Generate makes.
type Sizes struct {
	MinNamespaces, MaxNamespaces int
	MinPods, MaxPods             int
	MinPolicies, MaxPolicies     int
}

// DefaultSizes: 2-3 namespaces, 4-8 pods, 0-6 policies.
var DefaultSizes = Sizes{2, 3, 4, 8, 0, 6}

var (
	namespaceNames = []string{"alpha", "beta", "gamma"}
	nsLabelValues  = map[string][]string{"team": {"red", "blue"}, "env": {"prod", "dev"}}
	podLabelValues = map[string][]string{"app": {"web", "db", "api"}, "tier": {"fe", "be"}, "ver": {"v1", "v2"}}
	portNames      = []string{"http", "https", "dns", "metrics", "diam"}
	portNumbers    = []int32{53, 80, 443, 1000, 1050, 3868, 8080, 9090}
	protocols      = []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP}
	cidrs          = []string{
		"10.244.0.0/16", "10.244.1.0/24", "10.244.1.0/28", "10.244.1.16/28", "10.244.1.32/27",
		"192.0.2.0/24", "198.51.100.0/24", "0.0.0.0/0", "10.0.0.0/8", "172.16.0.0/12",
		"2001:db8::/64", // IPv6: never matches the IPv4 packets
	}
	portRanges = [][2]int32{{1000, 1100}, {8000, 8100}, {1, 65535}, {80, 80}, {443, 8443}, {1024, 2047}, {3000, 3868}}
	// External holds addresses that are no pod and no host.
	External = []string{
		"192.0.2.1", "192.0.2.200", "198.51.100.7", "8.8.8.8", "10.244.1.200",
		"10.244.2.9", "10.1.2.3", "172.16.5.5", "172.18.0.99",
	}
	// Hosts are the node's addresses: the pod gateway, the node IP and
	// sometimes an address inside the external test range.
	hostChoices = []string{"10.244.1.1", "172.18.0.2", "192.0.2.77"}
	// InterestingPorts are ports at and around the generated ports and
	// range edges.
	InterestingPorts = []uint16{
		0, 1, 2, 52, 53, 54, 79, 80, 81, 442, 443, 444, 999, 1000, 1001, 1023, 1024, 1049, 1050,
		1099, 1100, 1101, 2047, 2048, 2999, 3000, 3867, 3868, 3869, 7999, 8000, 8080, 8100,
		8101, 8443, 8444, 9090, 65534, 65535,
	}
)

func pick[T any](r *rand.Rand, s []T) T { return s[r.IntN(len(s))] }

func between(r *rand.Rand, lo, hi int) int { return lo + r.IntN(hi-lo+1) }

// Generate makes a scenario. It fails only if it made an invalid object
// (a bug in the generator).
func Generate(r *rand.Rand, sz Sizes) (*Scenario, error) {
	sc := &Scenario{Topology: &policy.Topology{Endpoints: map[string]policy.Endpoint{}}}

	nss := slices.Clone(namespaceNames)
	r.Shuffle(len(nss), func(i, j int) { nss[i], nss[j] = nss[j], nss[i] })
	nss = nss[:between(r, sz.MinNamespaces, sz.MaxNamespaces)]
	for _, ns := range nss {
		if r.IntN(8) == 0 {
			continue // pods in a namespace without a Namespace object
		}
		sc.Objects = append(sc.Objects, &corev1.Namespace{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
			ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: randLabels(r, nsLabelValues)},
		})
	}

	// Hosts first, so pods never take their addresses.
	hosts := []string{hostChoices[0], hostChoices[1]}
	if r.IntN(3) == 0 {
		hosts = append(hosts, hostChoices[2])
	}
	for _, h := range hosts {
		sc.Topology.Hosts = append(sc.Topology.Hosts, net.ParseIP(h).To4())
	}

	npods := between(r, sz.MinPods, sz.MaxPods)
	var known []corev1.ContainerPort // named ports of the pods
	used := map[int]bool{}
	for i := range npods {
		last := 2 + r.IntN(39) // 10.244.1.2 - 10.244.1.40
		for used[last] {
			last = 2 + r.IntN(39)
		}
		used[last] = true
		ip := fmt.Sprintf("10.244.1.%d", last)
		ns := pick(r, nss)
		name := fmt.Sprintf("pod-%d", i)
		sc.Topology.Endpoints[ip] = policy.Endpoint{Namespace: ns, Name: name, Local: r.IntN(5) != 0}
		if r.IntN(7) == 0 {
			continue // an endpoint without a Pod object
		}
		pod := randPod(r, ns, name, ip)
		sc.Objects = append(sc.Objects, pod)
		for _, c := range pod.Spec.Containers {
			for _, cp := range c.Ports {
				if cp.Name != "" {
					known = append(known, cp)
				}
			}
		}
	}

	var podIPs []string
	for ip := range sc.Topology.Endpoints {
		podIPs = append(podIPs, ip)
	}
	slices.Sort(podIPs)
	npol := between(r, sz.MinPolicies, sz.MaxPolicies)
	for i := range npol {
		sc.Objects = append(sc.Objects, randPolicy(r, pick(r, nss), fmt.Sprintf("np-%d", i), podIPs, known))
	}

	st, err := manifest.NewState().Apply(sc.Objects)
	if err != nil {
		return nil, fmt.Errorf("generated an invalid object: %w", err)
	}
	sc.State = st
	if err := sc.Topology.Validate(); err != nil {
		return nil, err
	}
	return sc, nil
}

func randLabels(r *rand.Rand, vocab map[string][]string) map[string]string {
	l := map[string]string{}
	for _, k := range sortedKeys(vocab) {
		if r.IntN(5) < 3 {
			l[k] = pick(r, vocab[k])
		}
	}
	if len(l) == 0 {
		return nil
	}
	return l
}

func sortedKeys(m map[string][]string) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func randPod(r *rand.Rand, ns, name, ip string) *corev1.Pod {
	p := &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: randLabels(r, podLabelValues)},
		Status:     corev1.PodStatus{PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
	for c := range between(r, 1, 2) {
		ctr := corev1.Container{Name: fmt.Sprintf("c%d", c), Image: "registry.example/app:1"}
		names := map[string]bool{}
		for range r.IntN(4) {
			cp := corev1.ContainerPort{ContainerPort: pick(r, portNumbers)}
			if pr := pick(r, protocols); pr != corev1.ProtocolTCP || r.IntN(2) == 0 {
				cp.Protocol = pr // TCP given explicitly or left to default
			}
			if n := pick(r, portNames); r.IntN(5) != 0 && !names[n] {
				cp.Name = n
				names[n] = true
			}
			ctr.Ports = append(ctr.Ports, cp)
		}
		p.Spec.Containers = append(p.Spec.Containers, ctr)
	}
	return p
}

func randSelector(r *rand.Rand, vocab map[string][]string) *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	if r.IntN(4) == 0 {
		return s // {} selects everything
	}
	keys := sortedKeys(vocab)
	for range r.IntN(3) {
		k := pick(r, keys)
		if s.MatchLabels == nil {
			s.MatchLabels = map[string]string{}
		}
		s.MatchLabels[k] = pick(r, vocab[k])
	}
	for range r.IntN(3) {
		k := pick(r, keys)
		e := metav1.LabelSelectorRequirement{Key: k}
		switch r.IntN(4) {
		case 0:
			e.Operator = metav1.LabelSelectorOpIn
		case 1:
			e.Operator = metav1.LabelSelectorOpNotIn
		case 2:
			e.Operator = metav1.LabelSelectorOpExists
		case 3:
			e.Operator = metav1.LabelSelectorOpDoesNotExist
		}
		if e.Operator == metav1.LabelSelectorOpIn || e.Operator == metav1.LabelSelectorOpNotIn {
			vals := slices.Clone(vocab[k])
			r.Shuffle(len(vals), func(i, j int) { vals[i], vals[j] = vals[j], vals[i] })
			e.Values = vals[:between(r, 1, len(vals))]
		}
		s.MatchExpressions = append(s.MatchExpressions, e)
	}
	if r.IntN(6) == 0 {
		// The namespace-name label the API server sets.
		if s.MatchLabels == nil {
			s.MatchLabels = map[string]string{}
		}
		s.MatchLabels[manifest.LabelMetadataName] = pick(r, namespaceNames)
	}
	return s
}

func randPolicy(r *rand.Rand, ns, name string, podIPs []string, known []corev1.ContainerPort) *networkingv1.NetworkPolicy {
	np := &networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
	}
	np.Spec.PodSelector = *randSelector(r, podLabelValues)
	switch r.IntN(5) {
	case 0:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}
	case 1:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
	case 2:
		np.Spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress, networkingv1.PolicyTypeIngress}
	default:
		// defaulted: Ingress, and Egress if there are egress rules
	}
	nIn, nEg := ruleCount(r), ruleCount(r)
	if nIn >= 0 {
		np.Spec.Ingress = []networkingv1.NetworkPolicyIngressRule{}
		for range nIn {
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{
				From: randPeers(r, podIPs), Ports: randPorts(r, known),
			})
		}
	}
	if nEg >= 0 {
		np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{}
		for range nEg {
			np.Spec.Egress = append(np.Spec.Egress, networkingv1.NetworkPolicyEgressRule{
				To: randPeers(r, podIPs), Ports: randPorts(r, known),
			})
		}
	}
	return np
}

// ruleCount: -1 for an absent list, 0 for an empty one, else 1-3.
func ruleCount(r *rand.Rand) int {
	switch r.IntN(10) {
	case 0, 1, 2:
		return -1
	case 3:
		return 0
	}
	return between(r, 1, 3)
}

func randPeers(r *rand.Rand, podIPs []string) []networkingv1.NetworkPolicyPeer {
	if r.IntN(4) == 0 {
		if r.IntN(2) == 0 {
			return nil
		}
		return []networkingv1.NetworkPolicyPeer{}
	}
	var peers []networkingv1.NetworkPolicyPeer
	for range between(r, 1, 3) {
		var p networkingv1.NetworkPolicyPeer
		switch r.IntN(10) {
		case 0, 1, 2:
			p.PodSelector = randSelector(r, podLabelValues)
		case 3, 4:
			p.NamespaceSelector = randSelector(r, nsLabelValues)
		case 5, 6:
			p.PodSelector = randSelector(r, podLabelValues)
			p.NamespaceSelector = randSelector(r, nsLabelValues)
		default:
			p.IPBlock = randBlock(r, podIPs)
		}
		peers = append(peers, p)
	}
	return peers
}

func randBlock(r *rand.Rand, podIPs []string) *networkingv1.IPBlock {
	var cidr netip.Prefix
	if r.IntN(6) == 0 {
		cidr = netip.PrefixFrom(netip.MustParseAddr(pick(r, podIPs)), 32)
	} else {
		cidr = netip.MustParsePrefix(pick(r, cidrs))
	}
	b := &networkingv1.IPBlock{CIDR: cidr.String()}
	if cidr.Bits() == 32 {
		return b
	}
	// Except prefixes around addresses that packets use.
	cands := append(slices.Clone(podIPs), External...)
	cands = append(cands, hostChoices...)
	for range r.IntN(3) {
		var inside []string
		for _, c := range cands {
			if cidr.Contains(netip.MustParseAddr(c)) {
				inside = append(inside, c)
			}
		}
		if len(inside) == 0 {
			break
		}
		a := netip.MustParseAddr(pick(r, inside))
		bits := cidr.Bits() + 1 + r.IntN(min(32-cidr.Bits(), 12))
		b.Except = append(b.Except, netip.PrefixFrom(a, bits).Masked().String())
	}
	return b
}

// randPorts makes ports; named ports are often those of the pods, with
// their protocol, so that they resolve.
func randPorts(r *rand.Rand, known []corev1.ContainerPort) []networkingv1.NetworkPolicyPort {
	if r.IntN(3) == 0 {
		if r.IntN(2) == 0 {
			return nil
		}
		return []networkingv1.NetworkPolicyPort{}
	}
	var ports []networkingv1.NetworkPolicyPort
	for range between(r, 1, 3) {
		var p networkingv1.NetworkPolicyPort
		if r.IntN(3) != 0 {
			pr := pick(r, protocols)
			p.Protocol = &pr
		}
		switch r.IntN(20) {
		case 0, 1, 2:
			// all ports of the protocol
		case 3, 4, 5, 6, 7, 8, 9:
			v := intstr.FromInt32(pick(r, portNumbers))
			p.Port = &v
		case 10, 11, 12, 13, 14:
			name := pick(r, portNames)
			if r.IntN(8) == 0 {
				name = "nope"
			}
			if len(known) > 0 && r.IntN(2) == 0 {
				cp := pick(r, known)
				name = cp.Name
				if cp.Protocol != "" || p.Protocol != nil {
					pr := cp.Protocol
					if pr == "" {
						pr = corev1.ProtocolTCP
					}
					p.Protocol = &pr
				}
			}
			v := intstr.FromString(name)
			p.Port = &v
		default:
			pr := pick(r, portRanges)
			v := intstr.FromInt32(pr[0])
			p.Port, p.EndPort = &v, &pr[1]
		}
		ports = append(ports, p)
	}
	return ports
}

// Packets makes n packets between the scenario's pods, hosts and external
// addresses, with ports at the interesting edges.
func Packets(r *rand.Rand, sc *Scenario, n int) []policy.Packet {
	var pods, hosts []string
	for ip := range sc.Topology.Endpoints {
		pods = append(pods, ip)
	}
	slices.Sort(pods)
	for _, h := range sc.Topology.Hosts {
		hosts = append(hosts, h.String())
	}
	// Addresses inside and around every ipBlock and except.
	ext := slices.Clone(External)
	for _, obj := range sc.Objects {
		np, ok := obj.(*networkingv1.NetworkPolicy)
		if !ok {
			continue
		}
		var blocks []*networkingv1.IPBlock
		for _, rule := range np.Spec.Ingress {
			for _, p := range rule.From {
				blocks = append(blocks, p.IPBlock)
			}
		}
		for _, rule := range np.Spec.Egress {
			for _, p := range rule.To {
				blocks = append(blocks, p.IPBlock)
			}
		}
		for _, b := range blocks {
			if b == nil {
				continue
			}
			for _, s := range append([]string{b.CIDR}, b.Except...) {
				ext = append(ext, edges(netip.MustParsePrefix(s))...)
			}
		}
	}
	ext = slices.DeleteFunc(ext, func(s string) bool {
		_, isPod := sc.Topology.Endpoints[s]
		return isPod || slices.Contains(hosts, s)
	})
	var ports []uint16
	ports = append(ports, InterestingPorts...)
	podPorts := map[string][]corev1.ContainerPort{} // by pod IP
	for _, obj := range sc.Objects {
		if p, ok := obj.(*corev1.Pod); ok {
			for _, c := range p.Spec.Containers {
				for _, cp := range c.Ports {
					ports = append(ports, uint16(cp.ContainerPort))
					podPorts[p.Status.PodIP] = append(podPorts[p.Status.PodIP], cp)
				}
			}
		}
	}

	out := make([]policy.Packet, 0, n)
	for range n {
		var src, dst string
		switch r.IntN(20) {
		case 0, 1, 2, 3, 4, 5, 6, 7:
			src, dst = pick(r, pods), pick(r, pods)
		case 8, 9, 10:
			src, dst = pick(r, pods), pick(r, ext)
		case 11, 12, 13:
			src, dst = pick(r, ext), pick(r, pods)
		case 14, 15, 16:
			src, dst = pick(r, hosts), pick(r, pods)
		case 17, 18:
			src, dst = pick(r, pods), pick(r, hosts)
		default:
			src = pick(r, pods)
			dst = src
		}
		pkt := policy.Packet{SrcIP: net.ParseIP(src).To4(), DstIP: net.ParseIP(dst).To4()}
		switch r.IntN(20) {
		case 0, 1, 2, 3, 4, 5, 6, 7, 8:
			pkt.Proto = policy.ProtoTCP
		case 9, 10, 11, 12, 13:
			pkt.Proto = policy.ProtoUDP
		case 14, 15, 16, 17:
			pkt.Proto = policy.ProtoSCTP
		default:
			pkt.Proto = 1 // ICMP: only rules without ports allow it
		}
		switch cps := podPorts[dst]; {
		case len(cps) > 0 && r.IntN(5) < 2:
			// A port of the destination pod, where named ports resolve,
			// usually with its protocol.
			cp := pick(r, cps)
			pkt.DstPort = uint16(cp.ContainerPort)
			if r.IntN(4) != 0 {
				pkt.Proto = protoNumber(cp.Protocol)
			}
		case r.IntN(10) == 0:
			pkt.DstPort = uint16(r.Uint32())
		default:
			pkt.DstPort = pick(r, ports)
		}
		out = append(out, pkt)
	}
	return out
}

func protoNumber(p corev1.Protocol) uint8 {
	switch p {
	case corev1.ProtocolUDP:
		return policy.ProtoUDP
	case corev1.ProtocolSCTP:
		return policy.ProtoSCTP
	}
	return policy.ProtoTCP
}

// edges returns the first and last address of a prefix and the ones just
// outside it.
func edges(p netip.Prefix) []string {
	if !p.Addr().Is4() {
		return nil
	}
	first := p.Masked().Addr()
	a := first.As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	size := uint64(1) << (32 - p.Bits())
	last := uint32(uint64(v) + size - 1)
	var out []string
	for _, x := range []uint64{uint64(v), uint64(last), uint64(v) - 1, uint64(last) + 1} {
		if x > 0xFFFFFFFF {
			continue
		}
		y := uint32(x)
		out = append(out, netip.AddrFrom4([4]byte{byte(y >> 24), byte(y >> 16), byte(y >> 8), byte(y)}).String())
	}
	return out
}

// YAML renders the scenario's objects as a multi-document manifest and the
// topology as a comment, for failure messages and for decoder tests.
func (sc *Scenario) YAML() string {
	var b strings.Builder
	b.WriteString("# topology:\n")
	for _, ip := range sortedEndpoints(sc.Topology) {
		ep := sc.Topology.Endpoints[ip]
		fmt.Fprintf(&b, "#   %s = %s/%s local=%v\n", ip, ep.Namespace, ep.Name, ep.Local)
	}
	fmt.Fprintf(&b, "#   hosts %v\n", sc.Topology.Hosts)
	for _, obj := range sc.Objects {
		y, err := yaml.Marshal(obj)
		if err != nil {
			fmt.Fprintf(&b, "# marshal %s: %v\n", obj.GetName(), err)
			continue
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	return b.String()
}

func sortedEndpoints(t *policy.Topology) []string {
	var ips []string
	for ip := range t.Endpoints {
		ips = append(ips, ip)
	}
	slices.Sort(ips)
	return ips
}
