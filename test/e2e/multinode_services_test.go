package e2e

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/routing"
)

// Services whose backend runs on another node (issue 10), in both routing
// modes: a pod on node1 reaches a ClusterIP whose only backend is a pod on
// node2. The backend answers the client pod's own address, so its answer
// crosses the fabric on the fast path and must still be translated back to
// the ClusterIP on node1.
const (
	mnSvcIP  = "10.96.7.10"
	mnSvcTCP = 80
	mnSvcUDP = 53
)

// mnServiceWorld: client pod on node1, backend pod on node2 (TCP greeter on
// 8080, UDP echo on 8081), routing synced. extra goes into every node's
// network configuration.
func mnServiceWorld(t *testing.T, dp, mode string, extra map[string]any) (*multiNode, *pod, *pod) {
	t.Helper()
	w := newMultiNode(t, dp, mode)
	for _, n := range w.nodes {
		ex := map[string]any{"uplink": mnUplink, "routing": mode}
		if mode == routing.ModeVXLAN {
			ex["mtu"] = nil
		}
		for k, v := range extra {
			ex[k] = v
		}
		n.conf = conflist(t, n.Node, testutil.UniqueName("mns"), netConf{Datapath: dp, Subnet: n.podCIDR, Extra: ex})
	}
	client := addPod(t, w.nodes[0].Node, w.nodes[0].conf, "mnsc")
	backend := addPod(t, w.nodes[1].Node, w.nodes[1].conf, "mnsb")
	greeter(t, backend.NS, 8080)
	udpEchoServer(t, backend.NS, 8081)
	w.sync(t, w.clusterNodes())
	return w, client, backend
}

// checkRemoteService: TCP and UDP through the ClusterIP; the backend sees
// the client pod's own address (no masquerade on the way).
func checkRemoteService(t *testing.T, step string, client *pod) {
	t.Helper()
	seen, err := greet(client.NS, net.JoinHostPort(mnSvcIP, fmt.Sprint(mnSvcTCP)))
	if err != nil {
		t.Errorf("%s: tcp via ClusterIP: %v", step, err)
	} else if host, _, _ := net.SplitHostPort(seen); host != client.IP {
		t.Errorf("%s: backend saw %s, want the client pod's own %s", step, seen, client.IP)
	}
	if err := udpEchoVia(client.NS, net.JoinHostPort(mnSvcIP, fmt.Sprint(mnSvcUDP))); err != nil {
		t.Errorf("%s: udp via ClusterIP: %v", step, err)
	}
}

// TestMultiNodeKubeProxyService: kube-proxy's rules (iptables mode) on the
// client's node DNAT the ClusterIP to the backend on node2. The backend's
// answer arrives on node1's uplink (native) or VXLAN device and must go
// through node1's conntrack, which alone reverses the DNAT: on the eBPF
// datapath tern_to_uplink records the flow as it leaves, and
// tern_from_uplink / tern_from_tunnel hand its answers to the stack
// (counted remote_stack_reply) instead of redirecting them into the client
// with the backend's address. The iptables datapath is the reference.
func TestMultiNodeKubeProxyService(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, dp := range []string{"ebpf", "iptables"} {
		for _, mode := range []string{routing.ModeNative, routing.ModeVXLAN} {
			t.Run(dp+"/"+mode, func(t *testing.T) {
				w, client, backend := mnServiceWorld(t, dp, mode, map[string]any{"serviceCIDR": []string{"10.96.0.0/16"}})
				eps := []testutil.KubeEndpoint{{IP: backend.IP, Port: 8080}}
				services := []testutil.KubeService{
					{Namespace: "prod", Name: "far", PortName: "http", Protocol: "tcp", ClusterIP: mnSvcIP, Port: mnSvcTCP, Endpoints: eps},
					{Namespace: "prod", Name: "far", PortName: "dns", Protocol: "udp", ClusterIP: mnSvcIP, Port: mnSvcUDP,
						Endpoints: []testutil.KubeEndpoint{{IP: backend.IP, Port: 8081}}},
				}
				if err := testutil.InstallKubeProxy(w.nodes[0].NS, "10.77.0.0/16", services); err != nil {
					t.Fatal(err)
				}
				before := w.nodes[0].metrics(t)
				checkRemoteService(t, w.String(), client)
				if dp == "ebpf" {
					after := w.nodes[0].metrics(t)
					if after["remote_stack_reply"] <= before["remote_stack_reply"] {
						t.Errorf("%s: remote_stack_reply did not grow on node1 (%d -> %d)", w, before["remote_stack_reply"], after["remote_stack_reply"])
					}
				}
			})
		}
	}
}

// applyOn applies a manifest with ternctl to node n's network.
func applyOn(t *testing.T, n *mnNode, name, body string) {
	t.Helper()
	dir := t.TempDir()
	conf := filepath.Join(dir, n.name+".conflist")
	if err := os.WriteFile(conf, n.conf, 0o600); err != nil {
		t.Fatal(err)
	}
	manifest := filepath.Join(dir, name)
	if err := os.WriteFile(manifest, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := n.Exec(t, ternctlBinary(t), "--cni-conf", conf, "apply", "-f", manifest); err != nil {
		t.Fatalf("%s: ternctl apply: %v\n%s", n.name, err, out)
	}
}

// TestMultiNodeLBService: services "ebpf" with the backend on another node:
// node1's load balancer translates the ClusterIP at the client's
// tern_from_pod and sends the packet on the fast path; the backend's
// answer is translated back where it arrives: tern_from_uplink (native) or
// tern_from_tunnel (VXLAN).
func TestMultiNodeLBService(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, mode := range []string{routing.ModeNative, routing.ModeVXLAN} {
		t.Run(mode, func(t *testing.T) {
			w, client, backend := mnServiceWorld(t, "ebpf", mode, map[string]any{"services": "ebpf"})
			applyOn(t, w.nodes[0], "far.yaml", fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: far}
spec:
  clusterIP: %[1]s
  ports: [{name: http, port: %[2]d, targetPort: 8080}, {name: dns, port: %[3]d, protocol: UDP, targetPort: 8081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: far-1, labels: {kubernetes.io/service-name: far}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 8081, protocol: UDP}]
endpoints: [{addresses: [%[4]s], nodeName: node2, conditions: {ready: true}}]
`, mnSvcIP, mnSvcTCP, mnSvcUDP, backend.IP))
			before := w.nodes[0].metrics(t)
			checkRemoteService(t, w.String(), client)
			after := w.nodes[0].metrics(t)
			if after["lb_rev_nat"] <= before["lb_rev_nat"] {
				t.Errorf("%s: lb_rev_nat did not grow on node1 (%d -> %d)", w, before["lb_rev_nat"], after["lb_rev_nat"])
			}
		})
	}
}

// TestMultiNodeLBNodePort: services "ebpf", a NodePort reached from
// outside the cluster (the fabric namespace) on node1, whose only backend
// is a pod on node2. externalTrafficPolicy Cluster: node1 DNATs the packet
// to the backend and SNATs it to node1's address (the backend sees node1,
// not the client), forwards it to node2, and translates the answer, which
// comes back to node1, back to the NodePort (lib/lb_remote.h): TCP and UDP
// (a connected UDP socket takes answers only from the address it sent
// to). externalTrafficPolicy Local, with no backend on node1: dropped
// (drop_lb_no_local), never forwarded.
func TestMultiNodeLBNodePort(t *testing.T) {
	testutil.RequirePrivileged(t)
	for _, mode := range []string{routing.ModeNative, routing.ModeVXLAN} {
		t.Run(mode, func(t *testing.T) {
			w, _, backend := mnServiceWorld(t, "ebpf", mode, map[string]any{"services": "ebpf"})
			node1 := w.nodes[0]
			applyOn(t, node1, "np.yaml", fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: np}
spec:
  type: NodePort
  clusterIP: 10.96.7.20
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30081}, {name: dns, port: 53, protocol: UDP, targetPort: 8081, nodePort: 30082}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: np-1, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 8081, protocol: UDP}]
endpoints: [{addresses: [%[1]s], nodeName: node2, conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: np-local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.7.21
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30083}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: np-local-1, labels: {kubernetes.io/service-name: np-local}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [%[1]s], nodeName: node2, conditions: {ready: true}}]
`, backend.IP))
			before := node1.metrics(t)
			for i := range 3 { // new flows: each takes a SNAT port of its own
				seen, err := greet(w.fab, net.JoinHostPort(node1.ip, "30081"))
				if err != nil {
					t.Errorf("%s: tcp to the NodePort from outside (%d): %v", w, i, err)
				} else if host, _, _ := net.SplitHostPort(seen); host != node1.ip {
					t.Errorf("%s: backend saw %s, want node1's address %s (externalTrafficPolicy Cluster SNATs)", w, seen, node1.ip)
				}
			}
			if err := udpEchoVia(w.fab, net.JoinHostPort(node1.ip, "30082")); err != nil {
				t.Errorf("%s: udp to the NodePort from outside: %v", w, err)
			}
			after := node1.metrics(t)
			for _, m := range []string{"lb_snat_remote", "lb_rev_nat"} {
				if after[m] <= before[m] {
					t.Errorf("%s: %s did not grow on node1 (%d -> %d)", w, m, before[m], after[m])
				}
			}
			if c, err := dialFrom(w.fab, "tcp", net.JoinHostPort(node1.ip, "30083"), 0); err == nil {
				c.Close()
				t.Errorf("%s: externalTrafficPolicy Local without a backend on node1: connected", w)
			}
			if got := node1.metrics(t)["drop_lb_no_local"]; got <= after["drop_lb_no_local"] {
				t.Errorf("%s: drop_lb_no_local did not grow on node1 (%d -> %d)", w, after["drop_lb_no_local"], got)
			}
		})
	}
}
