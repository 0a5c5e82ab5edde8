package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// ternctlBinary returns the ternctl built by make (TERN_CNI_PATH) or
// builds one.
func ternctlBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("TERN_CNI_PATH"); dir != "" {
		if p, err := filepath.Abs(filepath.Join(dir, "ternctl")); err == nil {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	out := filepath.Join(t.TempDir(), "ternctl")
	cmd := exec.Command("go", "build", "-o", out, "github.com/ternlabs/tern/cmd/ternctl")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build ternctl: %v\n%s", err, b)
	}
	return out
}

// TestTernctl shows endpoints with their map entry and attached program,
// and counters that move with traffic.
func TestTernctl(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	bin := ternctlBinary(t)
	n := testutil.NewNode(t)
	conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: "10.77.8.0/24"})
	confFile := filepath.Join(t.TempDir(), "10-tern.conflist")
	if err := os.WriteFile(confFile, conf, 0o600); err != nil {
		t.Fatal(err)
	}
	a := addPod(t, n, conf, "a")
	b := addPod(t, n, conf, "b")
	if err := testutil.Ping(a.NS, b.IP, 3); err != nil {
		t.Fatal(err)
	}

	out, err := n.Exec(t, bin, "--cni-conf", confFile, "-o", "json", "get", "endpoints")
	if err != nil {
		t.Fatalf("ternctl get endpoints: %v", err)
	}
	var eps []struct {
		IP      string `json:"ip"`
		Pod     string `json:"pod"`
		InMap   bool   `json:"inMap"`
		Program string `json:"program"`
	}
	if err := json.Unmarshal([]byte(out), &eps); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	if len(eps) != 2 {
		t.Fatalf("want 2 endpoints, got %s", out)
	}
	// Unshaped pods under the default tcAttach (auto): a cls_bpf filter.
	for _, ep := range eps {
		if (ep.IP != a.IP && ep.IP != b.IP) || !ep.InMap || !strings.Contains(ep.Program, "tc/ingress tern_from_pod") || !strings.HasPrefix(ep.Pod, "default/") {
			t.Errorf("unexpected endpoint row %+v", ep)
		}
	}

	out, err = n.Exec(t, bin, "--cni-conf", confFile, "-o", "json", "get", "metrics")
	if err != nil {
		t.Fatalf("ternctl get metrics: %v", err)
	}
	// get metrics -o json keeps its earlier shape: every counter by name.
	var metrics map[string]map[string]uint64
	if err := json.Unmarshal([]byte(out), &metrics); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	if metrics["redirect_peer"]["packets"] < 6 {
		t.Errorf("redirect_peer after 3 pings each way: %v", metrics["redirect_peer"])
	}
	if _, ok := metrics["drop_spoofed"]; !ok {
		t.Errorf("get metrics -o json leaves out zero counters: %s", out)
	}
	if _, err := n.Exec(t, bin, "--cni-conf", confFile, "get", "nothing"); err == nil {
		t.Error("ternctl accepted an unknown resource")
	}
}

// kubectlList is what `kubectl get ns,pods,netpol -n shop -o yaml` prints
// for the objects TestTernctlKubectlList uses (trimmed server fields kept
// where they test strictness: resourceVersion, uid, managedFields, status).
const kubectlList = `apiVersion: v1
items:
- apiVersion: v1
  kind: Namespace
  metadata:
    creationTimestamp: "2026-11-20T09:12:44Z"
    labels: {kubernetes.io/metadata.name: shop}
    name: shop
    resourceVersion: "412"
    uid: 0b7c8f0e-5a0c-4c2e-9d59-3f1b7b1b2a10
  spec: {finalizers: [kubernetes]}
  status: {phase: Active}
- apiVersion: v1
  kind: Pod
  metadata:
    labels: {app: web}
    name: web
    namespace: shop
    resourceVersion: "530"
  spec:
    containers:
    - image: nginx:1.27
      name: nginx
      ports: [{containerPort: 80, name: http, protocol: TCP}]
      resources: {}
    nodeName: node-1
  status: {phase: Running, podIP: 10.77.31.9, qosClass: BestEffort}
- apiVersion: v1
  kind: Pod
  metadata: {labels: {app: client}, name: client, namespace: shop}
  spec: {containers: [{name: main, image: busybox}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata:
    generation: 1
    managedFields:
    - apiVersion: networking.k8s.io/v1
      fieldsType: FieldsV1
      fieldsV1: {f:spec: {f:ingress: {}, f:podSelector: {}}}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2026-11-20T09:14:10Z"
    name: web-allow-http
    namespace: shop
  spec:
    ingress:
    - ports: [{port: http, protocol: TCP}]
    podSelector: {matchLabels: {app: web}}
    policyTypes: [Ingress]
kind: List
metadata:
  resourceVersion: ""
`

// TestTernctlKubectlList pipes kubectl's List output into `ternctl apply
// -f -` and `delete -f -` (the built binary, standard input) on a node with
// pods, and checks that the policy in it is enforced and withdrawn, and
// that deleting what is not there succeeds with a "not found" line.
func TestTernctlKubectlList(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	w := newPolicyWorld(t, "ebpf")
	web := addK8sPod(t, w.node, w.conf, "shop", "web")
	client := addK8sPod(t, w.node, w.conf, "shop", "client")

	stdin := func(input string, args ...string) (string, error) {
		var stdout, stderr bytes.Buffer
		err := w.node.NS.Do(func(ns.NetNS) error {
			cmd := exec.Command(w.bin, append([]string{"--cni-conf", w.confFile}, args...)...)
			cmd.Stdin = strings.NewReader(input)
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			return cmd.Run()
		})
		if err != nil {
			err = fmt.Errorf("ternctl %v: %w: %s", args, err, stderr.String())
		}
		return stdout.String(), err
	}

	expect(t, "before apply", tcp(client, web, 80, true), tcp(client, web, 8080, true))
	out, err := stdin(kubectlList, "apply", "-f", "-")
	if err != nil {
		t.Fatal(err)
	}
	if want := "Namespace shop created\nPod shop/web created\nPod shop/client created\nNetworkPolicy shop/web-allow-http created\n"; out != want {
		t.Errorf("apply -f - output:\n%s\nwant:\n%s", out, want)
	}
	expect(t, "after apply", tcp(client, web, 80, true), tcp(client, web, 8080, false))

	// A list with one invalid item changes nothing.
	bad := strings.Replace(kubectlList, "port: http, protocol: TCP", "port: 0, protocol: TCP", 1)
	if _, err := stdin(bad, "delete", "-f", "-"); err == nil || !strings.Contains(err.Error(), "List items[3]: NetworkPolicy shop/web-allow-http") {
		t.Errorf("invalid list item: %v", err)
	}
	expect(t, "after a rejected delete", tcp(client, web, 8080, false))

	out, err = stdin(kubectlList, "delete", "-f", "-")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "NetworkPolicy shop/web-allow-http deleted\n") {
		t.Errorf("delete -f - output:\n%s", out)
	}
	expect(t, "after delete", tcp(client, web, 8080, true))

	out, err = stdin(kubectlList, "delete", "-f", "-")
	if err != nil {
		t.Fatalf("delete of objects that are gone: %v", err)
	}
	if want := "Namespace shop not found\nPod shop/web not found\nPod shop/client not found\nNetworkPolicy shop/web-allow-http not found\n"; out != want {
		t.Errorf("second delete output:\n%s\nwant:\n%s", out, want)
	}
}

// counterRow is one row of `ternctl get counters -o json`.
type counterRow struct {
	Name             string   `json:"name"`
	Packets          uint64   `json:"packets"`
	Bytes            uint64   `json:"bytes"`
	Description      string   `json:"description"`
	PacketsPerSecond *float64 `json:"packetsPerSecond"`
	BytesPerSecond   *float64 `json:"bytesPerSecond"`
}

func decodeCounters(t *testing.T, out string) map[string]counterRow {
	t.Helper()
	var rows []counterRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("decode counters %q: %v", out, err)
	}
	m := map[string]counterRow{}
	for _, r := range rows {
		if r.Description == "" {
			t.Errorf("counter %s has no description", r.Name)
		}
		m[r.Name] = r
	}
	return m
}

// TestTernctlCounters reads `ternctl get counters` on both datapaths while
// real traffic flows between two pods: forwarded and policy-dropped packets
// are counted with their bytes, zero rows are hidden unless --all, and
// --watch reports a rate while a ping runs.
func TestTernctlCounters(t *testing.T) {
	for _, dp := range []string{"ebpf", "iptables"} {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := newPolicyWorld(t, dp)
			a := addK8sPod(t, w.node, w.conf, "default", "a")
			b := addK8sPod(t, w.node, w.conf, "default", "b")
			// Forwarded pod to pod: redirect_peer on eBPF; on iptables the
			// FORWARD jump sees every packet and the bridge accept the
			// first of each connection.
			forwarded, newConn := "redirect_peer", "redirect_peer"
			if dp == "iptables" {
				forwarded, newConn = "forward", "accept_new_from_pods"
			}
			if err := testutil.Ping(a.NS, b.IP, 3); err != nil {
				t.Fatal(err)
			}
			got := decodeCounters(t, w.mustTernctl("get", "counters", "-o", "json"))
			if c := got[forwarded]; c.Packets < 6 || c.Bytes < 6*84 {
				t.Errorf("%s after 3 pings each way: %+v", forwarded, c)
			}
			if c := got[newConn]; c.Packets < 1 {
				t.Errorf("%s after a ping: %+v", newConn, c)
			}
			for name, c := range got {
				if c.Packets == 0 && c.Bytes == 0 {
					t.Errorf("zero row %s shown without --all", name)
				}
			}
			if _, ok := got["drop_policy_ingress"]; ok {
				t.Errorf("drop_policy_ingress counted before any policy: %+v", got["drop_policy_ingress"])
			}
			all := decodeCounters(t, w.mustTernctl("get", "counters", "--all", "-o", "json"))
			if _, ok := all["drop_policy_ingress"]; !ok || len(all) <= len(got) {
				t.Errorf("--all lists %d rows, without %d (drop_policy_ingress there: %v)", len(all), len(got), ok)
			}
			if table := w.mustTernctl("get", "metrics"); !strings.Contains(table, "COUNTER") || !strings.Contains(table, forwarded) {
				t.Errorf("get metrics (alias) table:\n%s", table)
			}

			// --watch while a ping runs: at least one sample shows a rate.
			stop := make(chan struct{})
			pinged := make(chan struct{})
			go func() {
				defer close(pinged)
				for i := 0; i < 100; i++ {
					select {
					case <-stop:
						return
					default:
					}
					_ = testutil.Ping(a.NS, b.IP, 2)
				}
			}()
			out := w.mustTernctl("get", "counters", "--watch", "--interval", "500ms", "--count", "3", "-o", "json")
			close(stop)
			<-pinged
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if len(lines) != 3 {
				t.Fatalf("--count 3: %d lines:\n%s", len(lines), out)
			}
			var rate float64
			for _, l := range lines {
				var s struct {
					Seconds  float64      `json:"seconds"`
					Counters []counterRow `json:"counters"`
				}
				if err := json.Unmarshal([]byte(l), &s); err != nil || s.Seconds <= 0 {
					t.Fatalf("watch sample %q: %v", l, err)
				}
				for _, c := range s.Counters {
					if c.PacketsPerSecond == nil || c.BytesPerSecond == nil {
						t.Fatalf("watch sample without rates: %q", l)
					}
					if c.Name == forwarded {
						rate = max(rate, *c.PacketsPerSecond)
					}
				}
			}
			if rate <= 0 {
				t.Errorf("no %s rate while pinging:\n%s", forwarded, out)
			}

			// Deny ingress to every pod of the namespace: the blocked
			// connection attempts are counted as policy drops.
			w.mustTernctl("apply", "-f", w.write("deny.yaml", "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: default}\nspec: {podSelector: {}}\n"))
			expect(t, "deny", tcp(a, b, 80, false))
			got = decodeCounters(t, w.mustTernctl("get", "counters", "-o", "json"))
			if c := got["drop_policy_ingress"]; c.Packets < 1 || c.Bytes < 40 {
				t.Errorf("drop_policy_ingress after a denied connection: %+v", c)
			}
		})
	}
}
