package e2e

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestPolicyEgressNamespaceNotIn: the upstream Netpol spec "should enforce
// policy based on NamespaceSelector with MatchExpressions using default ns
// label": x/a may egress only to namespaces whose kubernetes.io/metadata.name
// is not y. Its own namespace and z stay reachable, y is not.
func TestPolicyEgressNamespaceNotIn(t *testing.T) {
	for _, dp := range []string{"iptables", "ebpf"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			sw := newSNATWorld(t)
			_, conf := sw.conf(t, dp, map[string]any{"serviceCIDR": []string{svcCIDR}})
			w := &policyWorld{t: t, bin: ternctlBinary(t), node: sw.node, dir: t.TempDir(), conf: conf}
			w.confFile = filepath.Join(t.TempDir(), "10-tern.conflist")
			if err := os.WriteFile(w.confFile, conf, 0o600); err != nil {
				t.Fatal(err)
			}
			n := w.node
			xa := addK8sPod(t, n, w.conf, "x", "a")
			xb := addK8sPod(t, n, w.conf, "x", "b")
			ya := addK8sPod(t, n, w.conf, "y", "a")
			za := addK8sPod(t, n, w.conf, "z", "a")
			// Each pod's Service, as the upstream suite probes them.
			vip := map[*k8sPod]string{xa: "10.96.7.1", xb: "10.96.7.2", ya: "10.96.7.3", za: "10.96.7.4"}
			var services []testutil.KubeService
			for p, ip := range vip {
				services = append(services, testutil.KubeService{Namespace: p.Namespace, Name: "s-" + p.Name, Protocol: "tcp", ClusterIP: ip, Port: 80,
					Endpoints: []testutil.KubeEndpoint{{IP: p.IP, Port: 80, Local: true}}})
			}
			if err := testutil.InstallKubeProxy(n.NS, svcTestCIDRs, services); err != nil {
				t.Fatal(err)
			}
			if _, err := n.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
				t.Fatal(err)
			}
			via := func(from, to *k8sPod, want bool) reach {
				return svc(from, vip[to], "s-"+to.String(), "tcp", 80, want)
			}
			w.mustTernctl("apply", "-f", w.write("cluster.yaml", `
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: "x"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: "y", labels: {kubernetes.io/metadata.name: "y"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: z, labels: {kubernetes.io/metadata.name: "z"}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: a, labels: {pod: a}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: x, name: b, labels: {pod: b}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: "y", name: a, labels: {pod: a}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: z, name: a, labels: {pod: a}}
spec: {containers: [{name: main}]}
`))
			expect(t, "no policy", tcp(xa, xb, 80, true), tcp(xa, ya, 80, true), tcp(xa, za, 80, true),
				via(xa, xb, true), via(xa, ya, true), via(xa, za, true))
			w.mustTernctl("apply", "-f", w.write("notin.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: allow-egress-notin-y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector:
        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: ["y"]}]
`))
			expect(t, "egress NotIn y", tcp(xa, xb, 80, true), tcp(xa, ya, 80, false), tcp(xa, za, 80, true), tcp(xb, ya, 80, true),
				via(xa, xb, true), via(xa, ya, false), via(xa, za, true), via(xb, ya, true))
		})
	}
}
