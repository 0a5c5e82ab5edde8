package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ternlabs/tern/internal/testutil"
)

// chainedConflist reads examples/30-tern-chained-<under>.conflist (ptp or
// bridge with host-local, then tern in chained mode) and points it at node
// n: subnet, the node's directories, unique names. Under "standalone" it
// is tern alone, for comparison.
func chainedConflist(t *testing.T, n *testutil.Node, under, subnet string) []byte {
	t.Helper()
	if under == "standalone" {
		return conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: subnet})
	}
	b, err := os.ReadFile(filepath.Join("..", "..", "examples", "30-tern-chained-"+under+".conflist"))
	if err != nil {
		t.Fatal(err)
	}
	var list map[string]any
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	list["name"] = testutil.UniqueName("chd")
	plugins := list["plugins"].([]any)
	first, tern := plugins[0].(map[string]any), plugins[1].(map[string]any)
	if first["type"] != under || tern["type"] != "tern" || tern["mode"] != "chained" {
		t.Fatalf("example for %s: plugins %v", under, plugins)
	}
	ipam := first["ipam"].(map[string]any)
	ipam["dataDir"] = filepath.Join(n.StateDir, "host-local")
	ipam["ranges"] = [][]map[string]string{{{"subnet": subnet}}}
	if under == "bridge" {
		first["bridge"] = testutil.UniqueName("cb")
	}
	tern["clusterCIDR"] = "10.77.0.0/16"
	tern["stateDir"] = n.StateDir
	tern["bpffsDir"] = n.BPFFSDir
	if b, err = json.Marshal(list); err != nil {
		t.Fatal(err)
	}
	return b
}

const chainedCluster = `
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: web, labels: {app: web}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: db, labels: {app: db}}
spec: {containers: [{name: main}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: dev, name: client, labels: {app: client}}
spec: {containers: [{name: main}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: deny-all}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: db-from-web}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
`

// TestChainedMode runs Tern behind ptp and behind bridge ("mode":
// "chained", eBPF datapath) and standalone, with the same pods and
// policies: the same verdicts everywhere, pod-to-pod traffic on Tern's
// fast path (redirect_peer), anti-spoofing, CHECK, and a DEL that leaves
// nothing of Tern's while the first plugin removes its own.
func TestChainedMode(t *testing.T) {
	subnets := map[string]string{"standalone": "10.77.70.0/24", "ptp": "10.77.71.0/24", "bridge": "10.77.72.0/24"}
	for _, under := range []string{"standalone", "ptp", "bridge"} {
		t.Run(under, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := &policyWorld{t: t, bin: ternctlBinary(t), node: testutil.NewNode(t), dir: t.TempDir()}
			w.conf = chainedConflist(t, w.node, under, subnets[under])
			w.confFile = filepath.Join(t.TempDir(), "10-tern.conflist")
			if err := os.WriteFile(w.confFile, w.conf, 0o600); err != nil {
				t.Fatal(err)
			}
			web := addK8sPod(t, w.node, w.conf, "prod", "web")
			db := addK8sPod(t, w.node, w.conf, "prod", "db")
			client := addK8sPod(t, w.node, w.conf, "dev", "client")
			for _, p := range []*k8sPod{web, db, client} {
				args := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", p.Namespace}, {"K8S_POD_NAME", p.Name}}
				if err := w.node.Check(t.Context(), w.conf, p.ID, p.Path, "eth0", args); err != nil {
					t.Errorf("CHECK %s: %v", p, err)
				}
			}
			expect(t, "no policy", tcp(client, web, 8080, true), tcp(web, db, 5432, true), tcp(client, db, 5432, true))

			w.mustTernctl("apply", "-f", w.write("cluster.yaml", chainedCluster))
			expect(t, "policies",
				tcp(client, web, 8080, false), udp(client, web, 53, false),
				tcp(web, db, 5432, true), tcp(web, db, 80, false), tcp(client, db, 5432, false),
				tcp(db, client, 80, true), tcp(web, client, 1000, true))
			got := decodeCounters(t, w.mustTernctl("get", "counters", "-o", "json"))
			if got["redirect_peer"].Packets == 0 || got["drop_policy_ingress"].Packets == 0 {
				t.Errorf("counters: redirect_peer %+v, drop_policy_ingress %+v", got["redirect_peer"], got["drop_policy_ingress"])
			}

			// Anti-spoofing: a source address that is not the pod's.
			forged := strings.TrimSuffix(subnets[under], "0/24") + "200"
			if _, err := testutil.ExecIn(client.NS, "ip", "addr", "add", forged+"/32", "dev", "eth0"); err != nil {
				t.Fatal(err)
			}
			if _, err := testutil.ExecIn(client.NS, "ping", "-n", "-c", "1", "-W", "1", "-I", forged, db.IP); err == nil {
				t.Error("a ping from a forged source address got an answer")
			}
			if got := decodeCounters(t, w.mustTernctl("get", "counters", "-o", "json")); got["drop_spoofed"].Packets == 0 {
				t.Errorf("drop_spoofed after a forged ping: %+v", got["drop_spoofed"])
			}

			// GC with every attachment valid changes nothing.
			valid := []types.GCAttachment{{ContainerID: web.ID, IfName: "eth0"}, {ContainerID: db.ID, IfName: "eth0"}, {ContainerID: client.ID, IfName: "eth0"}}
			if err := w.node.GC(t.Context(), w.conf, valid); err != nil {
				t.Errorf("GC: %v", err)
			}
			expect(t, "after GC", tcp(web, db, 5432, true), tcp(client, web, 8080, false))

			for _, p := range []*k8sPod{web, db, client} {
				args := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", p.Namespace}, {"K8S_POD_NAME", p.Name}}
				if err := w.node.Del(context.Background(), w.conf, p.ID, p.Path, "eth0", args); err != nil {
					t.Errorf("DEL %s: %v", p, err)
				}
			}
			if keys := endpointKeys(t, w.node); len(keys) != 0 {
				t.Errorf("endpoints left after DEL: %v", keys)
			}
			if out, _ := w.node.Exec(t, "ip", "-o", "link", "show", "type", "veth"); strings.TrimSpace(out) != "" {
				t.Errorf("veths left after DEL:\n%s", out)
			}
			if recs, _ := filepath.Glob(filepath.Join(w.node.StateDir, "attachments", "*", "*.json")); len(recs) != 0 {
				t.Errorf("records left after DEL: %v", recs)
			}
		})
	}
}

// TestChainedModeErrors: chained mode without a usable prevResult, with an
// ipam section, or on the iptables datapath fails ADD with a clear error.
func TestChainedModeErrors(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	alone := func(extra map[string]any) []byte {
		tern := map[string]any{"type": "tern", "mode": "chained", "datapath": "ebpf", "stateDir": n.StateDir, "bpffsDir": n.BPFFSDir}
		for k, v := range extra {
			tern[k] = v
		}
		b, _ := json.Marshal(map[string]any{"cniVersion": "1.1.0", "name": testutil.UniqueName("chd"), "plugins": []any{tern}})
		return b
	}
	for _, c := range []struct {
		name string
		conf []byte
		want string
	}{
		{"no prevResult", alone(nil), "prevResult: missing"},
		{"ipam", alone(map[string]any{"ipam": map[string]any{"type": "host-local"}}), "chained mode takes no ipam"},
		{"iptables", alone(map[string]any{"datapath": "iptables"}), "chained mode needs the eBPF datapath"},
		{"bad mode", alone(map[string]any{"mode": "behind"}), `mode: "behind" is not one of`},
	} {
		p := n.Pod(t, "chd")
		_, err := n.Add(t.Context(), c.conf, "c-"+p.Name, p.Path, "eth0", k8sArgs)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: ADD: %v, want an error containing %q", c.name, err, c.want)
		}
	}
	if v := hostVeths(t, n); len(v) != 0 {
		t.Errorf("veths after failed ADDs: %v", v)
	}
}

// TestChainedModeSNAT: behind ptp, with "ipMasq": true and an uplink,
// Tern masquerades pod traffic leaving the cluster in BPF (the source ext
// sees is the node's, from the NAT port range), and replies come back.
func TestChainedModeSNAT(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	w := newSNATWorld(t)
	b := chainedConflist(t, w.node, "ptp", "10.77.73.0/24")
	var list map[string]any
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	tern := list["plugins"].([]any)[1].(map[string]any)
	tern["ipMasq"] = true
	tern["uplink"] = w.uplink
	conf, _ := json.Marshal(list)
	p := addPod(t, w.node, conf, "chs")
	srv := w.serve(t)
	src, err := tcpSeen(p.NS, srv.tcpAddr(), 0, []byte("chained-snat"))
	if err != nil {
		t.Fatal(err)
	}
	checkMasqueraded(t, "ebpf", "TCP from a chained pod", src)
	if got := snatMetrics(t, w.node); got["snat"] == 0 || got["rev_snat"] == 0 {
		t.Errorf("SNAT counters: %v", got)
	}
}

// TestChainedModeBandwidth: ptp, Tern in chained mode, then bandwidth
// (examples/30-tern-chained-ptp-bandwidth.conflist): Tern takes the
// bandwidth capability, records the limited pod as shaped, and both of
// its limits hold pod to pod (measured with iperf3, within 20%).
func TestChainedModeBandwidth(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	b, err := os.ReadFile(filepath.Join("..", "..", "examples", "30-tern-chained-ptp-bandwidth.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	var list map[string]any
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	list["name"] = testutil.UniqueName("chb")
	plugins := list["plugins"].([]any)
	first, tern := plugins[0].(map[string]any), plugins[1].(map[string]any)
	if first["type"] != "ptp" || tern["type"] != "tern" || plugins[2].(map[string]any)["type"] != "bandwidth" {
		t.Fatalf("example: plugins %v", plugins)
	}
	ipam := first["ipam"].(map[string]any)
	ipam["dataDir"] = filepath.Join(n.StateDir, "host-local")
	ipam["ranges"] = [][]map[string]string{{{"subnet": "10.77.73.0/24"}}}
	tern["clusterCIDR"] = "10.77.0.0/16"
	tern["stateDir"] = n.StateDir
	tern["bpffsDir"] = n.BPFFSDir
	conf, err := json.Marshal(list)
	if err != nil {
		t.Fatal(err)
	}
	limits := map[string]any{"bandwidth": map[string]any{
		"ingressRate": bwIngressRate, "ingressBurst": bwBurst,
		"egressRate": bwEgressRate, "egressBurst": bwBurst,
	}}
	limited := addChainPod(t, n, conf, "cbl", limits)
	peer := addChainPod(t, n, conf, "cbp", nil)
	check := func(what string, got, want float64) {
		t.Logf("%s: %.1f Mbit/s (configured %.1f)", what, got/1e6, want/1e6)
		if got < want*0.8 || got > want*1.2 {
			t.Errorf("%s: %.1f Mbit/s, want %.1f ± 20%%", what, got/1e6, want/1e6)
		}
	}
	check("to the limited pod (its ingress)", iperf3Rate(t, peer.NS, limited.NS, limited.IP, 5201, false), bwIngressRate)
	check("from the limited pod (its egress)", iperf3Rate(t, peer.NS, limited.NS, limited.IP, 5202, true), bwEgressRate)
	limited.del(t, n, conf)
	peer.del(t, n, conf)
}
