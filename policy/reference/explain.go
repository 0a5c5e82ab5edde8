package reference

import (
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/manifest"
)

// DirectionDecision is the decision of one direction of a packet: the
// egress policy of a local source pod or the ingress policy of a local
// destination pod.
type DirectionDecision struct {
	Direction string // "egress" or "ingress"
	Pod       string // namespace/name of the pod whose policy decides
	Allowed   bool
	Isolated  bool   // the pod is isolated in this direction
	Policy    string // namespace/name of the policy that allowed, "" otherwise
	Rule      int    // index of the rule in the policy's ingress or egress list; -1 when none
	Why       string // "allowed by prod/db ingress[0]", "no rule matches", "not isolated", "from host"
}

// Directions decides the packet direction by direction, as Decide does:
// the source's egress (when it is a local pod), then the destination's
// ingress (when it is a local pod). A denied egress still has the ingress
// decided after it, so that both can be shown.
func Directions(st *manifest.State, topo *policy.Topology, pkt policy.Packet) []DirectionDecision {
	src := lookupPeer(st, topo, pkt.SrcIP)
	dst := lookupPeer(st, topo, pkt.DstIP)
	var out []DirectionDecision
	decide := func(dir networkingv1.PolicyType, self, remote peer) DirectionDecision {
		d := DirectionDecision{Direction: "egress", Pod: self.String(), Rule: -1}
		if dir == networkingv1.PolicyTypeIngress {
			d.Direction = "ingress"
		}
		if isHost(topo, remote.ip) {
			d.Allowed = true
			d.Why = "to host"
			if d.Direction == "ingress" {
				d.Why = "from host"
			}
			d.Isolated = isolated(st, dir, self)
			return d
		}
		d.Allowed, d.Why = directionAllowed(st, dir, self, remote, pkt)
		d.Isolated = d.Why != "not isolated"
		d.Policy, d.Rule = allowingRule(st, dir, self, remote, pkt)
		return d
	}
	if src.pod != nil && src.local {
		out = append(out, decide(networkingv1.PolicyTypeEgress, src, dst))
	}
	if dst.pod != nil && dst.local {
		out = append(out, decide(networkingv1.PolicyTypeIngress, dst, src))
	}
	return out
}

func isolated(st *manifest.State, dir networkingv1.PolicyType, self peer) bool {
	for _, np := range policiesOf(st, self.pod.namespace) {
		if hasType(np, dir) && selectorMatches(&np.Spec.PodSelector, self.pod.labels) {
			return true
		}
	}
	return false
}

// allowingRule is directionAllowed's first matching policy and rule.
func allowingRule(st *manifest.State, dir networkingv1.PolicyType, self, remote peer, pkt policy.Packet) (string, int) {
	for _, np := range policiesOf(st, self.pod.namespace) {
		if !hasType(np, dir) || !selectorMatches(&np.Spec.PodSelector, self.pod.labels) {
			continue
		}
		if dir == networkingv1.PolicyTypeIngress {
			for i, r := range np.Spec.Ingress {
				if peersMatch(st, np, r.From, remote) && portsMatch(r.Ports, dir, self, remote, pkt) {
					return np.Namespace + "/" + np.Name, i
				}
			}
		} else {
			for i, r := range np.Spec.Egress {
				if peersMatch(st, np, r.To, remote) && portsMatch(r.Ports, dir, self, remote, pkt) {
					return np.Namespace + "/" + np.Name, i
				}
			}
		}
	}
	return "", -1
}

// Selecting lists the policies (namespace/name) that isolate the local pod
// at ip in direction dir ("ingress" or "egress"): those a denial comes from.
func Selecting(st *manifest.State, topo *policy.Topology, ip []byte, dir string) []string {
	self := lookupPeer(st, topo, ip)
	if self.pod == nil {
		return nil
	}
	t := networkingv1.PolicyTypeIngress
	if dir == "egress" {
		t = networkingv1.PolicyTypeEgress
	}
	var out []string
	for _, np := range policiesOf(st, self.pod.namespace) {
		if hasType(np, t) && selectorMatches(&np.Spec.PodSelector, self.pod.labels) {
			out = append(out, np.Namespace+"/"+np.Name)
		}
	}
	return out
}
