package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// The chain tests run Tern as the first plugin of the conflists in
// examples/ (20-tern-*.conflist), followed by the reference plugins
// v1.9.1 (portmap, bandwidth, tuning, sbr), through libcni: ADD, CHECK and
// DEL of the whole chain, with traffic proving what each plugin set up.

// exampleConflist reads examples/<file> and points its tern plugin at node
// n: datapath dp, the node's state and bpffs directories, a unique bridge
// and network name, and subnet. extra fields are set on the tern plugin.
func exampleConflist(t *testing.T, n *testutil.Node, file, dp, subnet string, extra map[string]any) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "examples", file))
	if err != nil {
		t.Fatal(err)
	}
	var list map[string]any
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	list["name"] = testutil.UniqueName("chain")
	plugins := list["plugins"].([]any)
	tern := plugins[0].(map[string]any)
	if tern["type"] != "tern" {
		t.Fatalf("%s: first plugin is %v, want tern", file, tern["type"])
	}
	tern["datapath"] = dp
	tern["stateDir"] = n.StateDir
	tern["bpffsDir"] = n.BPFFSDir
	tern["bridge"] = testutil.UniqueName("tb")
	tern["clusterCIDR"] = "10.77.0.0/16"
	tern["ipam"] = map[string]any{"type": "tern-ipam", "subnet": subnet}
	for k, v := range extra {
		tern[k] = v
	}
	out, err := json.Marshal(list)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// chainPod is a pod added through a chained conflist.
type chainPod struct {
	*pod
	rc *libcni.RuntimeConf
}

// addChainPod runs ADD of the whole chain for a new pod with the given
// capability arguments, then CHECK. DEL runs at cleanup (again: DEL is
// idempotent for every plugin).
func addChainPod(t *testing.T, n *testutil.Node, conf []byte, prefix string, caps map[string]any) *chainPod {
	t.Helper()
	return addChainPodIn(t, n, conf, n.Pod(t, prefix), "eth0", caps)
}

// addChainPodIn is addChainPod for an existing pod namespace and an
// interface name.
func addChainPodIn(t *testing.T, n *testutil.Node, conf []byte, p *testutil.Pod, ifname string, caps map[string]any) *chainPod {
	t.Helper()
	rc := &libcni.RuntimeConf{
		ContainerID:    "c-" + p.Name,
		NetNS:          p.Path,
		IfName:         ifname,
		Args:           append(k8sArgs, [2]string{"K8S_POD_NAME", p.Name}),
		CapabilityArgs: caps,
	}
	t.Cleanup(func() { _ = n.DelRuntime(context.Background(), conf, rc) })
	res, err := n.AddRuntime(t.Context(), conf, rc)
	if err != nil {
		t.Fatalf("ADD %s through the chain: %v", p.Name, err)
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IPs) != 1 {
		t.Fatalf("ADD %s: want 1 IP, got %v", p.Name, r.IPs)
	}
	if err := n.CheckRuntime(t.Context(), conf, rc); err != nil {
		t.Errorf("CHECK %s through the chain: %v", p.Name, err)
	}
	return &chainPod{pod: &pod{Pod: p, ID: rc.ContainerID, IP: r.IPs[0].Address.IP.String()}, rc: rc}
}

// del runs DEL of the chain for the pod, twice (the second finds nothing).
func (p *chainPod) del(t *testing.T, n *testutil.Node, conf []byte) {
	t.Helper()
	for i := 0; i < 2; i++ {
		if err := n.DelRuntime(t.Context(), conf, p.rc); err != nil {
			t.Errorf("DEL %s through the chain (%d): %v", p.Name, i+1, err)
		}
	}
}

// serveTCP listens on port in n and hands each connection to handle (in
// the accepting goroutine: handle starts its own for long work) until the
// test ends and closes the listener.
func serveTCP(t *testing.T, n ns.NetNS, port int, handle func(net.Conn)) {
	t.Helper()
	l, err := testutil.ListenTCP(n, "0.0.0.0:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			handle(c)
		}
	}()
}

// closeConn is serveTCP's handler that accepts and closes.
func closeConn(c net.Conn) { c.Close() }

// greeter serves TCP on port in namespace n: it writes the address the
// connection came from and a newline, then echoes. It stops with the test.
func greeter(t *testing.T, n ns.NetNS, port int) {
	t.Helper()
	serveTCP(t, n, port, func(c net.Conn) {
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
			buf := make([]byte, 512)
			for {
				k, err := c.Read(buf)
				if err != nil {
					return
				}
				if _, err := c.Write(buf[:k]); err != nil {
					return
				}
			}
		}()
	})
}

// greet connects from n to addr, reads the greeting (the source address
// the server saw) and checks an echo: the replies came back.
func greet(n ns.NetNS, addr string) (string, error) {
	c, err := dialFrom(n, "tcp", addr, 0)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	rd := bufio.NewReader(c)
	seen, err := rd.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read greeting from %s: %w", addr, err)
	}
	if _, err := c.Write([]byte("chain-echo")); err != nil {
		return "", err
	}
	buf := make([]byte, len("chain-echo"))
	if _, err := rd.Read(buf); err != nil || string(buf) != "chain-echo" {
		return "", fmt.Errorf("echo from %s: %q, %v", addr, buf, err)
	}
	return strings.TrimSpace(seen), nil
}

// udpEchoServer answers every datagram on port in namespace n with itself.
func udpEchoServer(t *testing.T, n ns.NetNS, port int) {
	t.Helper()
	pc, err := testutil.ListenUDP(n, "0.0.0.0:"+strconv.Itoa(port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			k, peer, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:k], peer)
		}
	}()
}

// udpEchoVia sends datagrams from n to addr until one comes back (5 s).
func udpEchoVia(n ns.NetNS, addr string) error { return udpEchoFrom(n, addr, 0) }

// udpEchoFrom is udpEchoVia from local port lport (0: any). The socket is
// connected to addr: an answer from any other address is not read.
func udpEchoFrom(n ns.NetNS, addr string, lport int) error {
	c, err := dialFrom(n, "udp", addr, lport)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, 64)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if _, err := c.Write([]byte("udp-chain")); err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if k, err := c.Read(buf); err == nil && string(buf[:k]) == "udp-chain" {
			return nil
		}
	}
	return fmt.Errorf("udp echo via %s: no answer", addr)
}

// TestChainPortmap: hostPorts through portmap (capability portMappings)
// reachable from an external namespace and from another pod, replies
// included, TCP and UDP; gone after DEL.
func TestChainPortmap(t *testing.T) {
	for _, dp := range []string{"iptables", "ebpf"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			testChainPortmap(t, dp)
		})
	}
}

// testChainPortmap: hostPort through portmap's DNAT. On the eBPF datapath
// the replies go back through the host stack, which reverses the DNAT
// (bpf/lib/stack.h: answers of stack-delivered flows).
func testChainPortmap(t *testing.T, dp string) {
	w := newSNATWorld(t)
	extra := map[string]any{}
	if dp == "ebpf" {
		extra["uplink"] = w.uplink
	}
	conf := exampleConflist(t, w.node, "20-tern-portmap.conflist", dp, "10.77.61.0/24", extra)
	mappings := []map[string]any{
		{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"},
		{"hostPort": 18053, "containerPort": 53, "protocol": "udp"},
	}
	server := addChainPod(t, w.node, conf, "pms", map[string]any{"portMappings": mappings})
	client := addChainPod(t, w.node, conf, "pmc", nil)
	greeter(t, server.NS, 80)
	udpEchoServer(t, server.NS, 53)

	hostTCP := net.JoinHostPort(extNodeIP, "18080")
	hostUDP := net.JoinHostPort(extNodeIP, "18053")
	seen, err := greet(w.ext, hostTCP)
	if err != nil {
		t.Errorf("hostPort %s from the external namespace: %v", hostTCP, err)
	} else if !strings.HasPrefix(seen, extIP+":") {
		t.Errorf("hostPort from ext: the pod saw %s, want ext's address %s", seen, extIP)
	}
	if err := udpEchoVia(w.ext, hostUDP); err != nil {
		t.Errorf("UDP hostPort from the external namespace: %v", err)
	}
	if _, err := greet(client.NS, hostTCP); err != nil {
		t.Errorf("hostPort %s from another pod: %v", hostTCP, err)
	}
	if err := udpEchoVia(client.NS, hostUDP); err != nil {
		t.Errorf("UDP hostPort from another pod: %v", err)
	}
	// The pod itself still answers on its own address.
	if _, err := greet(client.NS, net.JoinHostPort(server.IP, "80")); err != nil {
		t.Errorf("pod to pod next to the hostPort: %v", err)
	}

	server.del(t, w.node, conf)
	if _, err := greet(w.ext, hostTCP); err == nil {
		t.Error("hostPort still answers after DEL")
	}
	save, err := w.node.Exec(t, "iptables-save", "-t", "nat")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(save, server.IP) {
		t.Errorf("nat rules for %s left after DEL:\n%s", server.IP, save)
	}
}

// iperf3Rate runs iperf3 for 4 s (the first omitted) from client to the
// server at ip:port in server's namespace and returns the received rate in
// bit/s. reverse makes the server send.
func iperf3Rate(t *testing.T, client, server ns.NetNS, ip string, port int, reverse bool) float64 {
	t.Helper()
	srvDone := make(chan error, 1)
	go func() {
		_, err := testutil.ExecIn(server, "iperf3", "-s", "-1", "-B", ip, "-p", strconv.Itoa(port))
		srvDone <- err
	}()
	args := []string{"-c", ip, "-p", strconv.Itoa(port), "-t", "4", "-O", "1", "-J"}
	if reverse {
		args = append(args, "-R")
	}
	listening := false
	for i := 0; i < 50 && !listening; i++ {
		ss, _ := testutil.ExecIn(server, "ss", "-Hltn", "sport = :"+strconv.Itoa(port))
		if listening = strings.TrimSpace(ss) != ""; !listening {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if !listening {
		t.Fatalf("iperf3 server on %s:%d does not listen", ip, port)
	}
	out, err := testutil.ExecIn(client, "iperf3", args...)
	if err != nil {
		t.Fatalf("iperf3 %v: %v\n%s", args, err, out)
	}
	if err := <-srvDone; err != nil {
		t.Fatalf("iperf3 server: %v (client:\n%s)", err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.End.SumReceived.BitsPerSecond == 0 {
		t.Fatalf("iperf3 output: %v\n%s", err, out)
	}
	return res.End.SumReceived.BitsPerSecond
}

// Rates the bandwidth test configures (bit/s) and their bursts (bits).
const (
	bwIngressRate = 20_000_000
	bwEgressRate  = 10_000_000
	bwBurst       = 512_000
)

// TestChainBandwidth: the bandwidth plugin (capability bandwidth) after
// Tern. iptables datapath: the pod receives at its ingress rate and sends
// at its egress rate, within 20%, measured with iperf3 from another pod;
// DEL removes the ifb and the qdiscs. eBPF datapath: Tern sees the limits
// (it declares the capability too) and refuses the ADD with an error that
// says why, instead of wiring a pod whose limits would not apply.
func TestChainBandwidth(t *testing.T) {
	limits := map[string]any{"bandwidth": map[string]any{
		"ingressRate": bwIngressRate, "ingressBurst": bwBurst,
		"egressRate": bwEgressRate, "egressBurst": bwBurst,
	}}
	t.Run("iptables", func(t *testing.T) {
		testutil.RequirePrivileged(t)
		t.Parallel()
		n := testutil.NewNode(t)
		conf := exampleConflist(t, n, "20-tern-bandwidth.conflist", "iptables", "10.77.62.0/24", nil)
		limited := addChainPod(t, n, conf, "bwl", limits)
		peer := addChainPod(t, n, conf, "bwp", nil)

		check := func(what string, got, want float64) {
			t.Logf("%s: %.1f Mbit/s (configured %.1f)", what, got/1e6, want/1e6)
			if got < want*0.8 || got > want*1.2 {
				t.Errorf("%s: %.1f Mbit/s, want %.1f ± 20%%", what, got/1e6, want/1e6)
			}
		}
		check("to the limited pod (its ingress)", iperf3Rate(t, peer.NS, limited.NS, limited.IP, 5201, false), bwIngressRate)
		check("from the limited pod (its egress)", iperf3Rate(t, peer.NS, limited.NS, limited.IP, 5202, true), bwEgressRate)
		limited.del(t, n, conf)
		out, err := n.Exec(t, "ip", "-o", "link", "show", "type", "ifb")
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) != "" {
			t.Errorf("ifb left after DEL:\n%s", out)
		}
	})
	t.Run("ebpf-clsact", func(t *testing.T) {
		// Tern's programs in a clsact qdisc (tcAttach legacy): the
		// bandwidth plugin cannot add its ingress qdisc next to it, and
		// its ADD fails (the chain fails closed, nothing is bypassed).
		testutil.RequirePrivileged(t)
		t.Parallel()
		n := testutil.NewNode(t)
		conf := exampleConflist(t, n, "20-tern-bandwidth.conflist", "ebpf", "10.77.64.0/24", map[string]any{"tcAttach": "legacy"})
		p := n.Pod(t, "bwc")
		rc := &libcni.RuntimeConf{ContainerID: "c-" + p.Name, NetNS: p.Path, IfName: "eth0", Args: k8sArgs, CapabilityArgs: limits}
		t.Cleanup(func() { _ = n.DelRuntime(context.Background(), conf, rc) })
		_, err := n.AddRuntime(t.Context(), conf, rc)
		if err == nil || !strings.Contains(err.Error(), `type="bandwidth" failed`) {
			t.Fatalf("ADD with limits, Tern in clsact: %v, want the bandwidth plugin's failure", err)
		}
		if err := n.DelRuntime(t.Context(), conf, rc); err != nil {
			t.Error(err)
		}
		if v := hostVeths(t, n); len(v) != 0 {
			t.Errorf("veths left after DEL: %v", v)
		}
	})
	t.Run("ebpf", func(t *testing.T) {
		testutil.RequirePrivileged(t)
		t.Parallel()
		// A node with an uplink to an external namespace: the limited
		// pod's traffic to it is masqueraded (at the uplink's egress, the
		// pod being shaped: bpf/lib/shaped.h).
		w := newSNATWorld(t)
		n := w.node
		srv := w.serve(t)
		conf := exampleConflist(t, n, "20-tern-bandwidth.conflist", "ebpf", "10.77.63.0/24", nil)
		limited := addChainPod(t, n, conf, "bwe", limits)
		peer := addChainPod(t, n, conf, "bwq", nil)

		check := func(what string, got, want float64) {
			t.Logf("%s: %.1f Mbit/s (configured %.1f)", what, got/1e6, want/1e6)
			if got < want*0.8 || got > want*1.2 {
				t.Errorf("%s: %.1f Mbit/s, want %.1f ± 20%%", what, got/1e6, want/1e6)
			}
		}
		check("pod to the limited pod (its ingress)", iperf3Rate(t, peer.NS, limited.NS, limited.IP, 5201, false), bwIngressRate)
		check("limited pod to a pod (its egress)", iperf3Rate(t, peer.NS, limited.NS, limited.IP, 5202, true), bwEgressRate)
		check("limited pod to ext, masqueraded (its egress)", iperf3Rate(t, limited.NS, w.ext, extIP, 5203, false), bwEgressRate)
		check("ext to the limited pod, replies of a masqueraded flow (its ingress)", iperf3Rate(t, limited.NS, w.ext, extIP, 5204, true), bwIngressRate)
		seen, err := tcpSeen(limited.NS, srv.tcpAddr(), 0, []byte("shaped"))
		if err != nil {
			t.Fatal(err)
		}
		checkMasqueraded(t, "ebpf", "TCP from the limited pod", seen)
		if err := testutil.Ping(limited.NS, extIP, 2); err != nil {
			t.Error(err)
		}

		// NetworkPolicy still holds for the shaped pod: its egress at
		// tern_from_pod, its ingress at tern_to_pod (through the stack).
		confFile := filepath.Join(t.TempDir(), "20-tern-bandwidth.conflist")
		if err := os.WriteFile(confFile, conf, 0o600); err != nil {
			t.Fatal(err)
		}
		pw := &policyWorld{t: t, bin: ternctlBinary(t), node: n, conf: conf, confFile: confFile, dir: t.TempDir()}
		serve(t, limited.NS)
		serve(t, peer.NS)
		lim := &k8sPod{pod: limited.pod, Namespace: "default", Name: limited.Name}
		other := &k8sPod{pod: peer.pod, Namespace: "default", Name: peer.Name}
		_, extPort, _ := net.SplitHostPort(srv.tcpAddr())
		extPortN, _ := strconv.Atoi(extPort)
		toExt := reach{from: limited.NS, fromS: lim.String(), ip: extIP, toS: "ext", proto: "tcp", port: extPortN}
		pw.mustTernctl("apply", "-f", pw.write("shaped.yaml", fmt.Sprintf(`
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {namespace: default, name: %s, labels: {app: limited}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: default, name: %s, labels: {app: peer}}
spec: {containers: [{name: main}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: default, name: limited}
spec:
  podSelector: {matchLabels: {app: limited}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: peer}}}], ports: [{port: 8080}]}]
  egress: [{to: [{podSelector: {matchLabels: {app: peer}}}], ports: [{port: 8080}]}]
`, limited.Name, peer.Name)))
		toExtDenied := toExt
		expect(t, "policy on the shaped pod",
			tcp(other, lim, 8080, true), tcp(other, lim, 80, false),
			tcp(lim, other, 8080, true), tcp(lim, other, 80, false), toExtDenied)
		pw.mustTernctl("delete", "-f", pw.write("shaped-policy.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: default, name: limited}
`))
		toExt.want = true
		expect(t, "policy deleted", tcp(other, lim, 80, true), tcp(lim, other, 80, true), toExt)

		// The shaped pod's traffic went through the stack (counted), and
		// CHECK accepts the shaping it asked for.
		var metrics map[string]map[string]uint64
		if err := json.Unmarshal([]byte(pw.mustTernctl("-o", "json", "get", "metrics")), &metrics); err != nil {
			t.Fatal(err)
		}
		if metrics["pass_shaped"]["packets"] == 0 {
			t.Errorf("pass_shaped %v after the shaped pod's traffic, want > 0", metrics["pass_shaped"])
		}
		if err := n.CheckRuntime(t.Context(), conf, limited.rc); err != nil {
			t.Errorf("CHECK of the shaped pod: %v", err)
		}
		limited.del(t, n, conf)

		// Limits in the bandwidth plugin's own entry: Tern cannot see them
		// at ADD and takes the pod for unshaped (cls_bpf filters in a
		// clsact qdisc, auto mode). An ingress limit (a tbf root qdisc)
		// goes in next to them and Tern's CHECK finds the shaping it
		// would bypass; an egress limit needs an ingress qdisc, which
		// clsact excludes: the bandwidth plugin's ADD fails, the chain
		// fails closed, and DEL leaves nothing.
		for _, dir := range []string{"ingress", "egress"} {
			var list map[string]any
			if err := json.Unmarshal(conf, &list); err != nil {
				t.Fatal(err)
			}
			list["plugins"].([]any)[1].(map[string]any)[dir+"Rate"] = bwIngressRate
			list["plugins"].([]any)[1].(map[string]any)[dir+"Burst"] = bwBurst
			static, _ := json.Marshal(list)
			p := n.Pod(t, "bws")
			rc := &libcni.RuntimeConf{ContainerID: "c-" + p.Name, NetNS: p.Path, IfName: "eth0", Args: k8sArgs}
			t.Cleanup(func() { _ = n.DelRuntime(context.Background(), static, rc) })
			_, err := n.AddRuntime(t.Context(), static, rc)
			if dir == "egress" {
				if err == nil || !strings.Contains(err.Error(), `type="bandwidth" failed`) {
					t.Errorf("ADD with egress limits in the bandwidth entry: %v, want the bandwidth plugin's failure", err)
				}
			} else {
				if err != nil {
					t.Fatalf("ADD with %s limits in the bandwidth entry: %v", dir, err)
				}
				if err := n.CheckRuntime(t.Context(), static, rc); err == nil || !strings.Contains(err.Error(), "has a tbf qdisc") {
					t.Errorf("CHECK with %s limits Tern bypasses: %v, want %q", dir, err, "has a tbf qdisc")
				}
			}
			if err := n.DelRuntime(t.Context(), static, rc); err != nil {
				t.Error(err)
			}
			if v := hostVethFor(rc.ContainerID, "eth0"); slices.Contains(hostVeths(t, n), v) {
				t.Errorf("veth %s left after DEL", v)
			}
		}
	})
}

// readSysctl reads a sysctl inside namespace n.
func readSysctl(t *testing.T, n ns.NetNS, name string) string {
	t.Helper()
	var v []byte
	err := n.Do(func(ns.NetNS) error {
		var err error
		v, err = os.ReadFile(filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/")))
		return err
	})
	if err != nil {
		t.Fatalf("sysctl %s: %v", name, err)
	}
	return strings.TrimSpace(string(v))
}

// podLink returns "mtu <n> mac <addr>" of the pod's eth0.
func podLink(t *testing.T, p *chainPod) (mtu, mac string) {
	t.Helper()
	out, err := testutil.ExecIn(p.NS, "ip", "-o", "link", "show", "dev", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(out)
	for i := 0; i+1 < len(f); i++ {
		switch f[i] {
		case "mtu":
			mtu = f[i+1]
		case "link/ether":
			mac = f[i+1]
		}
	}
	return mtu, mac
}

// TestChainTuning: tuning after Tern sets sysctls and the MTU in the pod;
// a MAC requested through the mac capability is set by Tern itself (which
// declares the capability too), so the datapath knows it: CHECK passes and
// traffic flows both ways on both datapaths. A MAC that tuning alone
// changes is reported by Tern's CHECK.
func TestChainTuning(t *testing.T) {
	for _, dp := range []string{"ebpf", "iptables"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			subnet := map[string]string{"ebpf": "10.77.64.0/24", "iptables": "10.77.65.0/24"}[dp]
			conf := exampleConflist(t, n, "20-tern-tuning.conflist", dp, subnet, nil)
			const mac = "c2:11:22:33:44:55"
			a := addChainPod(t, n, conf, "tua", map[string]any{"mac": mac})
			b := addChainPod(t, n, conf, "tub", nil)
			if got := readSysctl(t, a.NS, "net.ipv4.tcp_keepalive_time"); got != "600" {
				t.Errorf("tcp_keepalive_time in the pod: %s, want 600", got)
			}
			if got := readSysctl(t, a.NS, "net.ipv4.conf.eth0.accept_local"); got != "1" {
				t.Errorf("accept_local of eth0 in the pod: %s, want 1", got)
			}
			if mtu, got := podLink(t, a); mtu != "1400" || got != mac {
				t.Errorf("pod eth0: mtu %s mac %s, want 1400 and %s", mtu, got, mac)
			}
			if err := testutil.Ping(a.NS, b.IP, 2); err != nil {
				t.Error(err)
			}
			if err := testutil.Ping(b.NS, a.IP, 2); err != nil {
				t.Error(err)
			}
			for _, dir := range [][2]*chainPod{{a, b}, {b, a}} {
				if err := testutil.TCPTransfer(dir[0].NS, dir[1].NS, dir[1].IP, 1<<20); err != nil {
					t.Error(err)
				}
			}
			a.del(t, n, conf)
			b.del(t, n, conf)

			// tuning's own "mac", which Tern cannot see: CHECK says so.
			var list map[string]any
			if err := json.Unmarshal(conf, &list); err != nil {
				t.Fatal(err)
			}
			list["plugins"].([]any)[1].(map[string]any)["mac"] = "c2:11:22:33:44:66"
			static, _ := json.Marshal(list)
			p := n.Pod(t, "tus")
			rc := &libcni.RuntimeConf{ContainerID: "c-" + p.Name, NetNS: p.Path, IfName: "eth0", Args: k8sArgs}
			t.Cleanup(func() { _ = n.DelRuntime(context.Background(), static, rc) })
			if _, err := n.AddRuntime(t.Context(), static, rc); err != nil {
				t.Fatal(err)
			}
			if err := n.CheckRuntime(t.Context(), static, rc); err == nil || !strings.Contains(err.Error(), "has MAC c2:11:22:33:44:66") {
				t.Errorf("CHECK after tuning changed the MAC behind Tern: %v, want the MAC named", err)
			}
		})
	}
}

// TestChainSBR: sbr applies to a pod with more than one interface. Each
// pod here has a primary eth0 (a veth to nowhere holding the default route, standing
// in for another network) and Tern's interface net1; sbr after Tern moves
// net1's routes into table 100, chosen by net1's address. Traffic sourced
// from the Tern addresses flows both ways (the replies leave by net1 although
// the main default route points at eth0); CHECK and DEL pass on both
// datapaths.
func TestChainSBR(t *testing.T) {
	for _, dp := range []string{"ebpf", "iptables"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			subnet := map[string]string{"ebpf": "10.77.66.0/24", "iptables": "10.77.67.0/24"}[dp]
			conf := exampleConflist(t, n, "20-tern-sbr.conflist", dp, subnet, nil)
			pods := make([]*chainPod, 2)
			for i, name := range []string{"sba", "sbb"} {
				p := n.Pod(t, name)
				for _, cmd := range [][]string{
					{"ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"},
					{"ip", "link", "set", "eth0peer", "up"},
					{"ip", "addr", "add", "198.51.100.1" + strconv.Itoa(i) + "/24", "dev", "eth0"},
					{"ip", "link", "set", "eth0", "up"},
					{"ip", "route", "add", "default", "via", "198.51.100.254"},
				} {
					if _, err := testutil.ExecIn(p.NS, cmd[0], cmd[1:]...); err != nil {
						t.Fatal(err)
					}
				}
				pods[i] = addChainPodIn(t, n, conf, p, "net1", nil)
			}
			a, b := pods[0], pods[1]
			rules, err := testutil.ExecIn(a.NS, "ip", "-4", "rule", "show")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(rules, "from "+a.IP+" lookup 100") {
				t.Errorf("pod rules after sbr:\n%s", rules)
			}
			if out, _ := testutil.ExecIn(a.NS, "ip", "-4", "route", "show", "table", "100"); !strings.Contains(out, "default via") {
				t.Errorf("table 100 in the pod:\n%s", out)
			}
			if out, _ := testutil.ExecIn(a.NS, "ip", "-4", "route", "show", "default"); !strings.Contains(out, "dev eth0") || strings.Contains(out, "net1") {
				t.Errorf("main table default route in the pod:\n%s", out)
			}
			if _, err := testutil.ExecIn(a.NS, "ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-w", "4", "-I", a.IP, b.IP); err != nil {
				t.Errorf("ping from %s to %s: %v", a.IP, b.IP, err)
			}
			greeter(t, a.NS, 8080)
			var c net.Conn
			err = b.NS.Do(func(ns.NetNS) error {
				d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(b.IP)}}
				var err error
				c, err = d.Dial("tcp", net.JoinHostPort(a.IP, "8080"))
				return err
			})
			if err != nil {
				t.Fatalf("TCP from %s to %s: %v", b.IP, a.IP, err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if seen, err := bufio.NewReader(c).ReadString('\n'); err != nil || !strings.HasPrefix(seen, b.IP+":") {
				t.Errorf("TCP from %s to %s: greeting %q, %v", b.IP, a.IP, seen, err)
			}
			a.del(t, n, conf)
			if rules, _ := testutil.ExecIn(a.NS, "ip", "-4", "rule", "show"); strings.Contains(rules, "lookup 100") {
				t.Errorf("sbr rule left after DEL:\n%s", rules)
			}
		})
	}
}
