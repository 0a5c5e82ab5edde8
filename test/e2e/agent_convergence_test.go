// The policy convergence benchmark is built only with -tags convergence:
// it is a measurement (it writes a report), not a check for make test.

//go:build convergence

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/routing"
)

// convergenceOutEnv names the directory TestAgentPolicyConvergence writes
// its report into (required).
const convergenceOutEnv = "TERN_CONVERGENCE_OUT"

// Benchmark parameters (the issue's: 100 writes, 300 pods, 3 nodes).
const (
	convWrites = 100
	convPods   = 300
	convNodes  = 3
	// convGap separates a write from the previous one's convergence by
	// more than --sync-min-interval, so each write meets an idle agent.
	convGap = 300 * time.Millisecond
	// convPoll is how often each agent's /metrics is read.
	convPoll = 10 * time.Millisecond
)

// TestAgentPolicyConvergence is a benchmark, not a timed test: three
// simulated nodes under their own agents (eBPF datapath, native routing),
// 300 pods in the API spread over them, and 100 writes of one
// NetworkPolicy (its allowed port alternating 80 and 8080). For each write
// it measures the time from the API call until each agent's
// tern_agent_applied_resource_version{resource="networkpolicies"} reaches
// the write's resourceVersion (polled every 10 ms): the write is then in
// force on that node's datapath. Every 10th write is spot-checked with a
// probe between real pods on two other nodes. Writes p50/p99/max per node
// and for "every node" to $TERN_CONVERGENCE_OUT/report.md and results.json.
//
// Pods: 3 are real (a netns each, wired by CNI ADD through the agents'
// conflists, one per node); the other 297 are Pod objects with nodeName
// and status.podIPs in their node's pod CIDR (identities every agent
// compiles, local endpoints only for the real ones).
func TestAgentPolicyConvergence(t *testing.T) {
	out := os.Getenv(convergenceOutEnv)
	if out == "" {
		t.Fatalf("benchmark: set %s to the directory for its report", convergenceOutEnv)
	}
	testutil.RequirePrivileged(t)
	load0, _ := os.ReadFile("/proc/loadavg")
	c := newAgentCluster(t, routing.ModeNative, "ebpf")
	createNamespaces(t, c.client, "x", "y")
	var nodes []*agentWorld
	for i := range convNodes {
		nodes = append(nodes, c.joinNode(fmt.Sprintf("10.77.%d.0/24", 170+i)))
	}
	waitMesh("nodes joined", time.Now(), nodes...)

	// Real pods: the server (selected) on node 2, clients on nodes 1 and 3.
	srv := nodes[1].addPod("x", "srv", map[string]string{"tier": "web"})
	cli := nodes[0].addPod("x", "cli", map[string]string{"role": "client"})
	far := nodes[2].addPod("y", "far", map[string]string{"role": "client"})
	createConvergencePods(t, c, nodes, convPods-3)

	policy := func(port int) *networkingv1.NetworkPolicy {
		tcp := corev1.ProtocolTCP
		p := intstr.FromInt32(int32(port))
		return &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "web-from-clients"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"tier": "web"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: &metav1.LabelSelector{}, PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &p}},
				}},
			},
		}
	}
	np, err := c.client.NetworkingV1().NetworkPolicies("x").Create(t.Context(), policy(8080), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rv, _ := strconv.ParseInt(np.ResourceVersion, 10, 64)
	for _, w := range nodes {
		w.waitApplied("networkpolicies", rv, time.Now())
	}
	expect(t, "initial policy", tcp(cli, srv, 8080, true), tcp(cli, srv, 80, false))

	apply0 := applyTotals(t, nodes)
	perNode := make([][]time.Duration, len(nodes))
	var all []time.Duration
	probes := 0
	for i := range convWrites {
		port := 80
		if i%2 == 1 {
			port = 8080
		}
		np.Spec = policy(port).Spec
		start := time.Now()
		np, err = c.client.NetworkingV1().NetworkPolicies("x").Update(t.Context(), np, metav1.UpdateOptions{})
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		rv, _ := strconv.ParseInt(np.ResourceVersion, 10, 64)
		took := convergedOn(t, nodes, rv, start)
		for k, d := range took {
			perNode[k] = append(perNode[k], d)
		}
		all = append(all, slices.Max(took))
		if i%10 == 9 {
			// Spot check: the datapath of node 2 enforces what the
			// metric says, for clients on nodes 1 and 3.
			other := 80 + 8080 - port
			expect(t, fmt.Sprintf("write %d (port %d)", i+1, port),
				tcp(cli, srv, port, true), tcp(far, srv, port, true), tcp(cli, srv, other, false))
			probes++
		}
		time.Sleep(convGap)
	}
	load1, _ := os.ReadFile("/proc/loadavg")
	apply1 := applyTotals(t, nodes)
	var applyMean []string
	for k := range nodes {
		n := apply1[k][1] - apply0[k][1]
		applyMean = append(applyMean, fmt.Sprintf("node %d: %.1f ms over %.0f syncs", k+1, 1000*(apply1[k][0]-apply0[k][0])/max(n, 1), n))
	}
	writeConvergenceReport(t, out, perNode, all, probes, strings.Join(applyMean, "; "), strings.TrimSpace(string(load0)), strings.TrimSpace(string(load1)))
}

// createConvergencePods creates n Pod objects spread over the nodes, in
// namespaces x and y, a third each labelled tier=web (selected by the
// benchmark's policy), role=client (its peers) and app=other, each with an
// address of its node's pod CIDR from .100 up (the real pods' IPAM hands
// out the low ones).
func createConvergencePods(t *testing.T, c *agentCluster, nodes []*agentWorld, n int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 4)
	for k := range n {
		w := nodes[k%len(nodes)]
		ns := []string{"x", "y"}[k%2]
		labels := []map[string]string{{"tier": "web"}, {"role": "client"}, {"app": "other"}}[(k/len(nodes))%3]
		base, _, _ := strings.Cut(w.podCIDR, "/")
		ip := strings.TrimSuffix(base, "0") + strconv.Itoa(100+k/len(nodes))
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			po := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("p%03d", k), Labels: labels},
				Spec:       corev1.PodSpec{NodeName: w.nodeName, Containers: []corev1.Container{{Name: "c", Image: "example.invalid/c"}}},
			}
			po, err := c.client.CoreV1().Pods(ns).Create(t.Context(), po, metav1.CreateOptions{})
			if err != nil {
				errs <- err
				return
			}
			po.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
			if _, err := c.client.CoreV1().Pods(ns).UpdateStatus(t.Context(), po, metav1.UpdateOptions{}); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// convergedOn polls every node's applied NetworkPolicy resourceVersion
// until each has reached rv, and returns the time from start per node.
func convergedOn(t *testing.T, nodes []*agentWorld, rv int64, start time.Time) []time.Duration {
	t.Helper()
	took := make([]time.Duration, len(nodes))
	pending := len(nodes)
	deadline := start.Add(enforceBound)
	for pending > 0 {
		for k, w := range nodes {
			if took[k] != 0 {
				continue
			}
			got, err := w.appliedRV("networkpolicies")
			if err == nil && got >= rv {
				took[k] = time.Since(start)
				pending--
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("resourceVersion %d not applied on every node after %v: %v", rv, enforceBound, took)
		}
		time.Sleep(convPoll)
	}
	return took
}

type convStats struct {
	Node   string  `json:"node"`
	N      int     `json:"n"`
	P50ms  float64 `json:"p50Ms"`
	P99ms  float64 `json:"p99Ms"`
	MaxMs  float64 `json:"maxMs"`
	MeanMs float64 `json:"meanMs"`
}

// quantile is the nearest-rank quantile of ds (sorted in place).
func quantile(ds []time.Duration, q float64) time.Duration {
	slices.Sort(ds)
	i := int(q*float64(len(ds))+0.999999) - 1
	return ds[max(0, min(i, len(ds)-1))]
}

func statsOf(name string, ds []time.Duration) convStats {
	ds = slices.Clone(ds)
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	return convStats{Node: name, N: len(ds), P50ms: ms(quantile(ds, 0.5)), P99ms: ms(quantile(ds, 0.99)),
		MaxMs: ms(slices.Max(ds)), MeanMs: ms(sum / time.Duration(len(ds)))}
}

// applyTotals reads each agent's tern_policy_apply_duration_seconds sum
// and count.
func applyTotals(t *testing.T, nodes []*agentWorld) [][2]float64 {
	t.Helper()
	out := make([][2]float64, len(nodes))
	for k, w := range nodes {
		var body string
		if err := w.get("/metrics", "9962", &body); err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(body, "\n") {
			for i, name := range []string{"tern_policy_apply_duration_seconds_sum ", "tern_policy_apply_duration_seconds_count "} {
				if v, ok := strings.CutPrefix(l, name); ok {
					out[k][i], _ = strconv.ParseFloat(v, 64)
				}
			}
		}
	}
	return out
}

func writeConvergenceReport(t *testing.T, dir string, perNode [][]time.Duration, all []time.Duration, probes int, applyMean, load0, load1 string) {
	t.Helper()
	var rows []convStats
	for k, ds := range perNode {
		rows = append(rows, statsOf(fmt.Sprintf("node %d", k+1), ds))
	}
	rows = append(rows, statsOf("every node (slowest of the three, per write)", all))
	var b strings.Builder
	fmt.Fprintf(&b, "# Policy convergence across nodes — %s\n\n", time.Now().UTC().Format("2006-01-02 15:04:05 UTC"))
	fmt.Fprintf(&b, "`TERN_CONVERGENCE_OUT=<dir> go test ./test/e2e -run TestAgentPolicyConvergence -count=1 -v` "+
		"(real kube-apiserver + etcd, %d simulated nodes each running ternd with the eBPF datapath, native routing, "+
		"`--sync-min-interval` 100 ms).\n\n", convNodes)
	fmt.Fprintf(&b, "- %d pods in the API: 3 real (a netns each, wired by CNI ADD, one per node), %d Pod objects with `nodeName` "+
		"and `status.podIPs` spread over the nodes (a third selected by the policy, a third its peers).\n", convPods, convPods-3)
	fmt.Fprintf(&b, "- %d updates of one NetworkPolicy (allowed port alternating 80/8080), each %v after the previous one converged. "+
		"Time from the API call to each agent's `tern_agent_applied_resource_version{resource=\"networkpolicies\"}` reaching "+
		"the write's resourceVersion (the sync that applied it to the datapath ended), polled every %v.\n", convWrites, convGap, convPoll)
	fmt.Fprintf(&b, "- Spot checks: %d probes rounds (every 10th write, right after convergence): the new port open from pods on "+
		"nodes 1 and 3 to the selected pod on node 2, the old one closed. All passed.\n", probes)
	fmt.Fprintf(&b, "- Agents' mean sync time during the writes (compile + diff + datapath apply, `tern_policy_apply_duration_seconds`): %s.\n", applyMean)
	fmt.Fprintf(&b, "- Machine: %d CPUs, shared with other jobs; /proc/loadavg before `%s`, after `%s`.\n\n", runtime.NumCPU(), load0, load1)
	b.WriteString("| node | writes | p50 (ms) | p99 (ms) | max (ms) | mean (ms) |\n|---|--:|--:|--:|--:|--:|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %d | %.1f | %.1f | %.1f | %.1f |\n", r.Node, r.N, r.P50ms, r.P99ms, r.MaxMs, r.MeanMs)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "report.md"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	js, _ := json.MarshalIndent(map[string]any{"writes": convWrites, "pods": convPods, "nodes": convNodes, "stats": rows,
		"applyMean": applyMean, "loadBefore": load0, "loadAfter": load1}, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "results.json"), js, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("report:\n%s", b.String())
}
