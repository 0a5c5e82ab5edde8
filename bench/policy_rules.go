package bench

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The policy sweep's rule sets. Everything is generated deterministically
// from the rule count, as Kubernetes manifests that `ternctl apply` reads.
//
// The server pod (bench/server, app=ternbench-server) is selected by every
// policy, for ingress only, so it is isolated and every new flow to it is
// checked. A rule set of n rules is:
//
//   - n ingress rules that do NOT match the benchmark traffic (client pod →
//     server pod, TCP, a port in [sweepAllowLo, sweepAllowHi]), each with
//     one peer and one TCP port, in policies of sweepRulesPerPolicy rules
//     ("ternbench-rules-000", …). Rule j (0-based) is of kind j mod 3:
//     0: from the client pod, to a port outside the allowed range
//     ("other port"); 1: from one of sweepPeers pods of another node in
//     namespace ternbench-peers ("other peer"); 2: from one of sweepBlocks
//     unrelated /24s in 198.18.0.0/15 ("ipBlock"). Kinds 1 and 2 cycle
//     through their peers and take the next port every full cycle, so no
//     two rules are the same and none is covered by another: each compiles
//     to exactly one policy entry.
//   - one rule that allows the benchmark traffic, in its own policy
//     "ternbench-allow": TCP ports sweepAllowLo–sweepAllowHi from any peer.
//     That range is one prefix-aligned block (16384/2), so it is one policy
//     entry too, and with any peer and TCP it sorts after every other
//     entry of the server: in the iptables rendering (one rule per entry,
//     walked in key order) a new flow is tested against all n rules before
//     it meets the one that allows it. (The eBPF datapath makes a fixed
//     number of LPM lookups whatever n is.)
//
// Non-matching ports are taken from 1024 up, skipping sweepDeniedPort and
// the allowed range: sweepDeniedPort is in no rule, and the sweep proves
// the policy in force by failing to connect to it.
const (
	sweepNamespace      = "bench" // K8S_POD_NAMESPACE of the topology's pods
	sweepPeerNamespace  = "ternbench-peers"
	sweepRulesPerPolicy = 100
	sweepPeers          = 50
	sweepBlocks         = 50
	sweepAllowLo        = 16384
	sweepAllowHi        = 32767
	sweepDeniedPort     = 16000
	sweepAllowPolicy    = "ternbench-allow"
	sweepLabel          = "app"
	sweepServerLabel    = "ternbench-server"
	sweepClientLabel    = "ternbench-client"
	sweepPeerNode       = "ternbench-other-node"
	sweepClientNode     = "ternbench-client-node" // cross-node paths: the client pod's node
)

// sweepPeerIP is the pod IP of remote peer k: another node's pod subnet
// inside the cluster CIDR, routed nowhere (the peers exist only in the
// policy state).
func sweepPeerIP(k int) net.IP { return net.IPv4(10, 244, 2, byte(10+k)).To4() }

// sweepBlock is the k-th unrelated ipBlock.
func sweepBlock(k int) string { return fmt.Sprintf("198.18.%d.0/24", k) }

// sweepPort returns the i-th port (0-based) of the non-matching pool: 1024
// and up without sweepDeniedPort and the allowed range.
func sweepPort(i int) int {
	p := 1024 + i
	if p >= sweepDeniedPort {
		p++
	}
	if p >= sweepAllowLo {
		p += sweepAllowHi - sweepAllowLo + 1
	}
	if p > 65535 {
		panic(fmt.Sprintf("policy sweep: port pool exhausted at index %d", i))
	}
	return p
}

// sweepRuleKind names the kinds of non-matching rules.
var sweepRuleKind = [3]string{"other port", "other peer", "ipBlock"}

// sweepRule returns non-matching rule j.
func sweepRule(j int) networkingv1.NetworkPolicyIngressRule {
	kind, i := j%3, j/3
	tcp := corev1.ProtocolTCP
	var peer networkingv1.NetworkPolicyPeer
	var port int
	switch kind {
	case 0:
		peer = networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{sweepLabel: sweepClientLabel}}}
		port = sweepPort(i)
	case 1:
		peer = networkingv1.NetworkPolicyPeer{
			NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": sweepPeerNamespace}},
			PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{sweepLabel: sweepPeerLabel(i % sweepPeers)}},
		}
		port = sweepPort(i / sweepPeers)
	default:
		peer = networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: sweepBlock(i % sweepBlocks)}}
		port = sweepPort(i / sweepBlocks)
	}
	pt := intstr.FromInt32(int32(port))
	return networkingv1.NetworkPolicyIngressRule{
		From:  []networkingv1.NetworkPolicyPeer{peer},
		Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &pt}},
	}
}

func sweepPeerLabel(k int) string { return fmt.Sprintf("ternbench-peer-%02d", k) }

func sweepPolicy(name string, rules []networkingv1.NetworkPolicyIngressRule) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
		ObjectMeta: metav1.ObjectMeta{Namespace: sweepNamespace, Name: name},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{sweepLabel: sweepServerLabel}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress:     rules,
		},
	}
}

// SweepPolicies returns the NetworkPolicies of a rule set with n
// non-matching rules: ceil(n/100) policies of at most 100 rules, then the
// policy with the one rule that allows the benchmark traffic.
func SweepPolicies(n int) []*networkingv1.NetworkPolicy {
	if n < 0 {
		n = 0
	}
	var out []*networkingv1.NetworkPolicy
	for start := 0; start < n; start += sweepRulesPerPolicy {
		end := min(start+sweepRulesPerPolicy, n)
		rules := make([]networkingv1.NetworkPolicyIngressRule, 0, end-start)
		for j := start; j < end; j++ {
			rules = append(rules, sweepRule(j))
		}
		out = append(out, sweepPolicy(fmt.Sprintf("ternbench-rules-%03d", start/sweepRulesPerPolicy), rules))
	}
	tcp := corev1.ProtocolTCP
	lo := intstr.FromInt32(sweepAllowLo)
	hi := int32(sweepAllowHi)
	allow := networkingv1.NetworkPolicyIngressRule{
		Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &lo, EndPort: &hi}},
	}
	return append(out, sweepPolicy(sweepAllowPolicy, []networkingv1.NetworkPolicyIngressRule{allow}))
}

// SweepPods returns the Pod objects the rule sets refer to: the client and
// server pods of the topology (matched to the CNI endpoints by namespace
// and name) and the remote peers with their IPs.
func SweepPods() []*corev1.Pod {
	pod := func(ns, name, label string) *corev1.Pod {
		return &corev1.Pod{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{sweepLabel: label}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "main"}}},
		}
	}
	out := []*corev1.Pod{pod(sweepNamespace, "client", sweepClientLabel), pod(sweepNamespace, "server", sweepServerLabel)}
	for k := 0; k < sweepPeers; k++ {
		p := pod(sweepPeerNamespace, fmt.Sprintf("peer-%02d", k), sweepPeerLabel(k))
		p.Spec.NodeName = sweepPeerNode
		ip := sweepPeerIP(k).String()
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
		out = append(out, p)
	}
	return out
}

// manifestJSON renders objects as a stream of JSON documents, one a line,
// as `ternctl apply -f` reads them.
func manifestJSON[T any](objs []T) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	for _, o := range objs {
		if err := enc.Encode(o); err != nil {
			return nil, err
		}
	}
	return b.Bytes(), nil
}
