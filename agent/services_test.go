package agent

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// TestServicesInDesiredState: with the balancer on (services "ebpf"),
// Services and EndpointSlices from the API are in the state handed to the
// store, and an EndpointSlice update (endpoints scaled) causes a sync
// whose state carries it; with kube-proxy they stay out.
func TestServicesInDesiredState(t *testing.T) {
	for _, balance := range []bool{true, false} {
		client := fake.NewClientset()
		log := slog.New(slog.NewTextHandler(io.Discard, nil))
		c := newController(client, "n1", balance, 0, 0, 0, newMetrics("", log), log)
		ctx, cancel := context.WithCancel(t.Context())
		if err := c.start(ctx); err != nil {
			t.Fatal(err)
		}
		rec := &recorder{}
		c.setTarget(rec)
		done := make(chan struct{})
		go func() { c.runner.Run(ctx); close(done) }()

		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web"},
			Spec:       corev1.ServiceSpec{ClusterIP: "10.96.0.10", Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP}}},
		}
		if _, err := client.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		port, proto := int32(80), corev1.ProtocolTCP
		es := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Port: &port, Protocol: &proto}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.1.0.5"}}},
		}
		es, err := client.DiscoveryV1().EndpointSlices("default").Create(ctx, es, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		endpoints := func() int {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			if rec.last == nil {
				return -1
			}
			s := rec.last.EndpointSlices[keyOf("default", "web-1")]
			if s == nil || rec.last.Services[keyOf("default", "web")] == nil {
				return 0
			}
			return len(s.Endpoints)
		}
		if !balance {
			// A Pod event is a sync that reads the caches with both
			// objects in them.
			if _, err := client.CoreV1().Pods("default").Create(ctx, testPod("default", "p"), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, func() bool { _, n := rec.snapshot(); return n == 1 })
			if n := endpoints(); n != 0 {
				t.Fatalf("services kube-proxy: the state carries the EndpointSlice (%d endpoints)", n)
			}
		} else {
			waitFor(t, func() bool { return endpoints() == 1 })
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{"10.1.0.6"}})
			if _, err := client.DiscoveryV1().EndpointSlices("default").Update(ctx, es, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			waitFor(t, func() bool { return endpoints() == 2 })
		}
		cancel()
		<-done
	}
}

// TestRoutingNodes: the node list routing gets is every other node with an
// IPv4 InternalIP and pod CIDR, sorted; this node and nodes not routable
// yet are left out. Heartbeats (conditions) are no change; a pod CIDR or
// InternalIP is.
func TestRoutingNodes(t *testing.T) {
	node := func(name, ip string, cidrs ...string) *corev1.Node {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
		if ip != "" {
			n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeExternalIP, Address: "203.0.113.9"}, {Type: corev1.NodeInternalIP, Address: ip}}
		}
		return n
	}
	got := routingNodes([]*corev1.Node{
		node("c", "192.0.2.3", "10.0.3.0/24", "fd00::/64"),
		node("self", "192.0.2.1", "10.0.1.0/24"),
		node("b", "192.0.2.2", "10.0.2.0/24"),
		node("noip", "", "10.0.4.0/24"),
		node("nocidr", "192.0.2.5"),
		node("v6", "fd00::5", "10.0.6.0/24"),
	}, "self")
	if len(got) != 2 || got[0].Name != "b" || got[1].Name != "c" {
		t.Fatalf("nodes %+v, want b and c", got)
	}
	if !got[1].IP.Equal(net.ParseIP("192.0.2.3")) || len(got[1].PodCIDRs) != 1 || got[1].PodCIDRs[0].String() != "10.0.3.0/24" {
		t.Fatalf("node c: %+v", got[1])
	}

	a, _ := slimNode(node("a", "192.0.2.2", "10.0.2.0/24"))
	hb := node("a", "192.0.2.2", "10.0.2.0/24")
	hb.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	b, _ := slimNode(hb)
	if nodeChanged(a, b) {
		t.Fatal("a heartbeat counts as a change")
	}
	moved, _ := slimNode(node("a", "192.0.2.7", "10.0.2.0/24"))
	recidr, _ := slimNode(node("a", "192.0.2.2", "10.0.9.0/24"))
	if !nodeChanged(a, moved) || !nodeChanged(a, recidr) {
		t.Fatal("an InternalIP or pod CIDR change is no change")
	}
}
