package compile_test

import (
	"fmt"
	"testing"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
)

// churnCluster: local pod x/a isolated for ingress, remote pod at
// 10.77.82.5 with the given name and labels.
// An empty name leaves the remote pod out.
func churnCluster(name, labels string) string {
	remote := fmt.Sprintf(`
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: %s, labels: {%s}}
spec: {nodeName: node2, containers: [{name: main}]}
status: {podIPs: [{ip: 10.77.82.5}]}`, name, labels)
	if name == "" {
		remote = ""
	}
	return fmt.Sprintf(`
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {pod: a}}
spec: {containers: [{name: main}]}%s
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: a-from-b}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
`, remote)
}

// TestChurnedIPs: an address changes identity when its pod is replaced by
// one with other labels or goes away, not when only the policies change or
// the pod is replaced by one with the same labels.
func TestChurnedIPs(t *testing.T) {
	compileFor := func(t *testing.T, yaml string, prev *compile.RuleSet) *compile.RuleSet {
		st := mustState(t, yaml)
		topo := policy.TopologyFromState(st, "", nil)
		topo.Endpoints["10.77.81.2"] = policy.Endpoint{Namespace: "x", Name: "a", Local: true}
		rs, err := compile.Compile(st, topo, prev)
		if err != nil {
			t.Fatal(err)
		}
		return rs
	}
	base := compileFor(t, churnCluster("b", "pod: b"), nil)
	for _, c := range []struct {
		name, yaml string
		want       []string
	}{
		{"other labels", churnCluster("intruder", "pod: intruder"), []string{"10.77.82.5"}},
		{"same labels, other pod", churnCluster("b2", "pod: b"), nil},
		{"policy change only", churnCluster("b", "pod: b") + "\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x, name: more}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}], ports: [{port: 80}]}]\n", nil},
		{"pod gone", churnCluster("", ""), []string{"10.77.82.5"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			next := compileFor(t, c.yaml, base)
			var got []string
			for _, ip := range compile.ChurnedIPs(base, next) {
				got = append(got, ip.String())
			}
			if fmt.Sprint(got) != fmt.Sprint(c.want) {
				t.Errorf("ChurnedIPs = %v, want %v", got, c.want)
			}
		})
	}
	if got := compile.ChurnedIPs(nil, base); got != nil {
		t.Errorf("ChurnedIPs(nil, …) = %v, want none", got)
	}
}
