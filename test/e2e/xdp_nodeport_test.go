package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// NodePort acceleration (nodePortAcceleration, bpf/xdp_uplink.c): a
// client in the external namespace reaches a backend on the node through
// the node's uplink address and NodePorts (externalTrafficPolicy Local and
// Cluster, TCP and UDP), with the XDP program attached to the uplink and
// without it. The backend sees the client's own address, the answers come
// back from the node port (the client's sockets accept nothing else), and
// the counters say who translated: lb_xdp_dnat (XDP) or lb_dnat (tc).
const (
	xdpTCPLocal   = 30190 // -> web:7000 (whoami), externalTrafficPolicy Local
	xdpTCPCluster = 30191 // -> web:7000, Cluster
	xdpUDPLocal   = 30153 // -> web:5454 (UDP whoami), Local
)

func TestXDPNodePort(t *testing.T) {
	for _, accel := range []string{"xdp", "none"} {
		t.Run(accel, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			testXDPNodePort(t, accel)
		})
	}
}

func testXDPNodePort(t *testing.T, accel string) {
	w := &svcWorld{snatWorld: newSNATWorld(t), t: t, bin: ternctlBinary(t), dir: t.TempDir()}
	_, w.conf = w.snatWorld.conf(t, "ebpf", map[string]any{
		"services":             "ebpf",
		"nodePortAcceleration": accel,
	})
	w.confFile = writeTemp(t, "10-tern.conflist", w.conf)
	w.b = addK8sPod(t, w.node, w.conf, "prod", "web")
	serveWhoami(t, w.b.NS)
	serveUDPWhoami(t, w.b.NS, 5454)
	w.apply("cluster.yaml", policyCluster)
	w.apply("nodeports.yaml", fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: who-local}
spec:
  type: NodePort
  clusterIP: 10.96.2.10
  externalTrafficPolicy: Local
  ports:
  - {name: tcp, port: 7000, nodePort: %[2]d}
  - {name: udp, port: 53, protocol: UDP, targetPort: 5454, nodePort: %[4]d}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: who-local-1, labels: {kubernetes.io/service-name: who-local}}
addressType: IPv4
ports: [{name: tcp, port: 7000}, {name: udp, port: 5454, protocol: UDP}]
endpoints: [{addresses: [%[1]s], conditions: {ready: true}}]
---
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: who-cluster}
spec: {type: NodePort, clusterIP: 10.96.2.11, ports: [{port: 7000, nodePort: %[3]d}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: who-cluster-1, labels: {kubernetes.io/service-name: who-cluster}}
addressType: IPv4
ports: [{port: 7000}]
endpoints: [{addresses: [%[1]s], conditions: {ready: true}}]
`, w.b.IP, xdpTCPLocal, xdpTCPCluster, xdpUDPLocal))

	// XDP on the uplink exactly when asked for.
	out, err := w.node.Exec(t, "ip", "-d", "link", "show", "dev", w.snatWorld.uplink)
	if err != nil {
		t.Fatal(err)
	}
	if onUplink := strings.Contains(out, "prog/xdp"); onUplink != (accel == "xdp") {
		t.Fatalf("nodePortAcceleration %q: XDP on the uplink %v\n%s", accel, onUplink, out)
	}

	ext := w.snatWorld.ext
	before := w.lbMetrics()
	for _, port := range []int{xdpTCPLocal, xdpTCPCluster} {
		addr := net.JoinHostPort(extNodeIP, strconv.Itoa(port))
		// A few connections: new flows each, on any backend slot.
		for range 3 {
			if got, err := whoami(ext, addr); err != nil || got != extIP {
				t.Errorf("TCP ext -> %s: backend saw %q (%v), want the client's address %s", addr, got, err, extIP)
			}
		}
	}
	udpAddr := net.JoinHostPort(extNodeIP, strconv.Itoa(xdpUDPLocal))
	for range 3 {
		if got, err := udpWhoami(ext, udpAddr); err != nil || got != extIP {
			t.Errorf("UDP ext -> %s: backend saw %q (%v), want %s", udpAddr, got, err, extIP)
		}
	}
	after := w.lbMetrics()
	xdp, tc := after["lb_xdp_dnat"]-before["lb_xdp_dnat"], after["lb_dnat"]-before["lb_dnat"]
	// Delivered by tern_from_uplink's bpf_redirect_peer either way (with
	// XDP: tc recognised the translated frames), not by the host stack.
	if peer := after["redirect_peer"] - before["redirect_peer"]; peer < 9 {
		t.Errorf("redirect_peer +%d, want >= 9 (one per packet from outside)", peer)
	}
	switch accel {
	case "xdp":
		// Every packet of these flows from outside: at least the 9
		// first ones. tc translated none (only this network's pods
		// could make it count, and they sent nothing to a Service).
		if xdp < 9 || tc != 0 {
			t.Errorf("with XDP: lb_xdp_dnat +%d (want >= 9), lb_dnat +%d (want 0)", xdp, tc)
		}
	default:
		if xdp != 0 || tc < 9 {
			t.Errorf("without XDP: lb_xdp_dnat +%d (want 0), lb_dnat +%d (want >= 9)", xdp, tc)
		}
	}

	// The backend's ingress policy still decides what XDP translated.
	w.apply("deny-prod.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: deny-all}
spec: {podSelector: {}, policyTypes: [Ingress]}
`)
	expect(t, "deny-all ingress in prod", w.ext("prod/who-local NodePort", xdpTCPLocal, false))
	w.apply("allow-ext.yaml", fmt.Sprintf(`
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: allow-ext}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress: [{from: [{ipBlock: {cidr: %s/32}}], ports: [{protocol: TCP, port: 7000}]}]
`, extIP))
	expect(t, "ext allowed by ipBlock", w.ext("prod/who-local NodePort", xdpTCPLocal, true))
}

// lbMetrics reads the node's counters through ternctl (packets by name).
func (w *svcWorld) lbMetrics() map[string]uint64 {
	w.t.Helper()
	out, err := w.node.Exec(w.t, w.bin, "--cni-conf", w.confFile, "-o", "json", "get", "metrics")
	if err != nil {
		w.t.Fatalf("ternctl get metrics: %v\n%s", err, out)
	}
	var m map[string]map[string]uint64
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		w.t.Fatalf("ternctl get metrics: %v\n%s", err, out)
	}
	got := map[string]uint64{}
	for name, v := range m {
		got[name] = v["packets"]
	}
	return got
}

// serveUDPWhoami answers every datagram on port in n with "<source>
// <payload>" (udpSeen's protocol).
func serveUDPWhoami(t *testing.T, n ns.NetNS, port int) {
	t.Helper()
	pc, err := testutil.ListenUDP(n, "0.0.0.0:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		pc.Close()
		<-done
	})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			k, peer, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(append([]byte(peer.String()+" "), buf[:k]...), peer)
		}
	}()
}

// udpWhoami is udpSeen with the host part of the source only.
func udpWhoami(n ns.NetNS, addr string) (string, error) {
	seen, err := udpSeen(n, addr, 0)
	if err != nil {
		return "", err
	}
	host, _, err := net.SplitHostPort(seen)
	return host, err
}
