package e2e

import (
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestAgentEgressThroughKubeProxy: ternd with a service CIDR beside
// kube-proxy (its rules as kube-proxy's iptables mode writes them): an
// egress policy written through the API that allows a named port is
// decided on the backend behind a ClusterIP, not on the ClusterIP as the
// outside world. The upstream Netpol spec "should allow egress access on
// one named port" failed on the real node this way: ternd wrote its
// --service-cidr into the conflist as nonMasqueradeCIDRs, not as
// serviceCIDR, so tern_from_pod decided pod -> ClusterIP traffic itself,
// before kube-proxy's DNAT.
//
// Twice: with --service-cidr, and without it, the range read from the API
// server's default ServiceCIDR object.
func TestAgentEgressThroughKubeProxy(t *testing.T) {
	for _, c := range []struct {
		name string
		args []string
	}{
		{"flag", []string{"--service-cidr", svcCIDR}},
		{"discovered", nil}, // the test API server's --service-cluster-ip-range is svcCIDR
	} {
		t.Run(c.name, func(t *testing.T) { egressThroughKubeProxy(t, c.args) })
	}
}

func egressThroughKubeProxy(t *testing.T, agentArgs []string) {
	testutil.RequirePrivileged(t)
	cp := testutil.StartControlPlane(t)
	client := cp.Client(t)
	ctx := t.Context()
	createNamespaces(t, client, "alpha", "beta")
	w := newAgentNode(t, cp, client, "10.77.158.0/24", agentArgs...)
	cli := w.addPod("alpha", "cli", map[string]string{"app": "cli"})
	srv := w.addPod("beta", "srv", map[string]string{"app": "srv"})

	const clusterIP = "10.96.58.10"
	services := []testutil.KubeService{{Namespace: "beta", Name: "srv", Protocol: "tcp", ClusterIP: clusterIP, Port: 80,
		Endpoints: []testutil.KubeEndpoint{{IP: srv.IP, Port: 80, Local: true}}}}
	if err := testutil.InstallKubeProxy(w.node.NS, svcTestCIDRs, services); err != nil {
		t.Fatal(err)
	}
	if _, err := w.node.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
		t.Fatal(err)
	}
	via := svc(cli, clusterIP, "beta/srv via its ClusterIP", "tcp", 80, true)
	expect(t, "no policy", via, tcp(cli, srv, 80, true), tcp(cli, srv, 8080, true))

	// The upstream spec's policy: every pod of alpha may egress to the
	// port named "http" of any pod, nothing else.
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "alpha", Name: "allow-egress-named"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{
				{Port: new(intstr.FromString("http"))},
			}}},
		},
	}
	start := time.Now()
	if _, err := client.NetworkingV1().NetworkPolicies("alpha").Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w.enforced("egress to a named port", start, enforceBound, tcp(cli, srv, 8080, false))
	expect(t, "egress to a named port", via, tcp(cli, srv, 80, true), tcp(cli, srv, 8080, false))
}
