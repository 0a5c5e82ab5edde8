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
	for _, ep := range eps {
		if (ep.IP != a.IP && ep.IP != b.IP) || !ep.InMap || !strings.Contains(ep.Program, "tcx/ingress tern_from_pod") || !strings.HasPrefix(ep.Pod, "default/") {
			t.Errorf("unexpected endpoint row %+v", ep)
		}
	}

	out, err = n.Exec(t, bin, "--cni-conf", confFile, "-o", "json", "get", "metrics")
	if err != nil {
		t.Fatalf("ternctl get metrics: %v", err)
	}
	var metrics map[string]map[string]uint64
	if err := json.Unmarshal([]byte(out), &metrics); err != nil {
		t.Fatalf("decode %q: %v", out, err)
	}
	if metrics["redirect_peer"]["packets"] < 6 {
		t.Errorf("redirect_peer after 3 pings each way: %v", metrics["redirect_peer"])
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
