package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/ternlabs/tern/internal/testutil"
)

// enforceBound is the most an API write may take to reach the datapath
// while the agent runs and the API server is up (generous: a third of the
// CPU may be stolen; this is not a benchmark).
const enforceBound = 10 * time.Second

func terndBinary(t *testing.T) string {
	t.Helper()
	if dir := os.Getenv("TERN_CNI_PATH"); dir != "" {
		if p, err := filepath.Abs(filepath.Join(dir, "ternd")); err == nil {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	out := filepath.Join(t.TempDir(), "ternd")
	cmd := exec.Command("go", "build", "-o", out, "github.com/ternlabs/tern/cmd/ternd")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build ternd: %v\n%s", err, b)
	}
	return out
}

// apiProxy makes the host's API server reachable from inside a node
// namespace: it listens on 127.0.0.1 there and forwards every connection
// to the API server's port on the test process's own loopback.
func apiProxy(t *testing.T, node ns.NetNS, port int) string {
	t.Helper()
	l, err := testutil.ListenTCP(node, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
			if err != nil {
				in.Close() // the API server is down
				continue
			}
			mu.Lock()
			conns = append(conns, in, out)
			mu.Unlock()
			wg.Go(func() { io.Copy(out, in); out.Close() })
			wg.Go(func() { io.Copy(in, out); in.Close() })
		}
	})
	return l.Addr().String()
}

// ternd is an agent process in a node namespace.
type ternd struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func startTernd(t *testing.T, node *testutil.Node, args []string) *ternd {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), "ternd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	d := &ternd{done: make(chan struct{}), log: logPath}
	d.cmd = exec.Command(terndBinary(t), args...)
	d.cmd.Stdout, d.cmd.Stderr = logf, logf
	// In the node namespace, as a hostNetwork DaemonSet pod runs in the
	// node's.
	exited, err := testutil.StartProcess(d.cmd, node.NS)
	if err != nil {
		t.Fatalf("start ternd: %v", err)
	}
	go func() { <-exited; logf.Close(); close(d.done) }()
	t.Cleanup(func() {
		d.stop()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("ternd log (%s):\n%s", logPath, tail(string(b), 40))
		}
	})
	return d
}

// stop ends the agent with SIGTERM (SIGKILL after 10 s) and waits.
func (d *ternd) stop() {
	select {
	case <-d.done:
		return
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(10 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
}

func (d *ternd) kill9() {
	d.cmd.Process.Kill()
	<-d.done
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// agentWorld is a control plane, one simulated node running ternd, and
// pods wired the way kubelet wires them.
type agentWorld struct {
	t        *testing.T
	cp       *testutil.ControlPlane
	client   kubernetes.Interface
	node     *testutil.Node
	nodeName string
	podCIDR  string
	ip       string // InternalIP, once linked into a fabric (agentCluster)
	confDir  string
	args     []string
	http     *http.Client
	agent    *ternd // the running agent
}

// dialsWithin reports whether a TCP connection opens within timeout.
func dialsWithin(r reach, timeout time.Duration) bool {
	var c net.Conn
	err := r.from.Do(func(ns.NetNS) error {
		var err error
		c, err = net.DialTimeout("tcp4", net.JoinHostPort(r.ip, strconv.Itoa(r.port)), timeout)
		return err
	})
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// syncedAfter returns how long after since the first policy sync that
// started after since ended, from ternd's log (end time and duration).
func syncedAfter(logPath string, since time.Time) (time.Duration, bool) {
	b, err := os.ReadFile(logPath)
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, `msg="policy synced"`) || !strings.HasPrefix(line, "time=") {
			continue
		}
		ts, _, _ := strings.Cut(strings.TrimPrefix(line, "time="), " ")
		end, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil {
			continue
		}
		// The first sync that started after the write: one that started
		// before it cannot have read the change.
		_, ds, _ := strings.Cut(line, " duration=")
		ds, _, _ = strings.Cut(ds, " ")
		took, err := time.ParseDuration(ds)
		if err == nil && end.Add(-took).After(since) {
			return end.Sub(since), true
		}
	}
	return 0, false
}

func (w *agentWorld) ctx() context.Context { return w.t.Context() }

// waitReady waits until the agent wrote the conflist and /readyz is ok.
func (w *agentWorld) waitReady(bound time.Duration) time.Duration {
	w.t.Helper()
	took, err := testutil.WaitFor(w.ctx(), bound, func() error {
		if _, err := os.Stat(filepath.Join(w.confDir, "10-tern.conflist")); err != nil {
			return err
		}
		return w.get("/readyz", "9963", nil)
	})
	if err != nil {
		w.t.Fatalf("ternd not ready after %v: %v", took, err)
	}
	return took
}

// get fetches path from the agent's server on port inside the node.
func (w *agentWorld) get(path, port string, body *string) error {
	resp, err := w.http.Get("http://127.0.0.1:" + port + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, b)
	}
	if body != nil {
		*body = string(b)
	}
	return nil
}

// addPod creates the Pod object (scheduled to the node), runs CNI ADD with
// the conflist the agent installed and the CNI_ARGS kubelet passes, then
// sets status.podIPs, as kubelet does.
func (w *agentWorld) addPod(namespace, name string, labels map[string]string) *k8sPod {
	t := w.t
	t.Helper()
	po := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:   w.nodeName,
			Containers: []corev1.Container{{Name: "c", Image: "example.invalid/c", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}}}},
		},
	}
	po, err := w.client.CoreV1().Pods(namespace).Create(w.ctx(), po, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	conf, err := os.ReadFile(filepath.Join(w.confDir, "10-tern.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	p := w.node.Pod(t, name)
	id := "c-" + p.Name
	args := [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", namespace}, {"K8S_POD_NAME", name}, {"K8S_POD_UID", string(po.UID)}}
	t.Cleanup(func() { _ = w.node.Del(context.Background(), conf, id, p.Path, "eth0", args) })
	res, err := w.node.Add(w.ctx(), conf, id, p.Path, "eth0", args)
	if err != nil {
		t.Fatalf("ADD %s/%s: %v", namespace, name, err)
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	ip := r.IPs[0].Address.IP.String()
	po.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
	if _, err := w.client.CoreV1().Pods(namespace).UpdateStatus(w.ctx(), po, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	serve(t, p.NS)
	return &k8sPod{pod: &pod{Pod: p, ID: id, IP: ip}, Namespace: namespace, Name: name}
}

// enforced polls until every probe has its expected outcome and returns
// the time from since; it fails the test after bound.
func (w *agentWorld) enforced(step string, since time.Time, bound time.Duration, rs ...reach) time.Duration {
	w.t.Helper()
	for {
		// Concurrent probes: a round takes one probe timeout
		// (policyProbeTimeout) when a blocked outcome is expected, which
		// is the resolution of the measured time.
		var bad atomic.Int32
		var wg sync.WaitGroup
		for _, r := range rs {
			wg.Go(func() {
				if r.want && r.proto == "tcp" {
					// A fresh SYN every 250 ms rather than the kernel's
					// retransmission after 1 s: finer resolution; an
					// allowed outcome cannot be seen early.
					if !dialsWithin(r, 250*time.Millisecond) {
						bad.Add(1)
					}
					return
				}
				if got, err := r.connects(); err != nil || got != r.want {
					bad.Add(1)
				}
			})
		}
		wg.Wait()
		ok := bad.Load() == 0
		took := time.Since(since)
		if ok {
			applied := "no sync logged"
			if w.agent != nil {
				if d, found := syncedAfter(w.agent.log, since); found {
					applied = "the first ternd sync started after the write ended " + d.Round(time.Millisecond).String() + " after it"
				}
			}
			w.t.Logf("%s: enforcement observed %v after the API write (%s)", step, took.Round(time.Millisecond), applied)
			return took
		}
		if took > bound {
			w.t.Fatalf("%s: not enforced %v after the API write (bound %v)", step, took, bound)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (w *agentWorld) labelPod(namespace, name string, labels map[string]string) {
	w.t.Helper()
	p, err := w.client.CoreV1().Pods(namespace).Get(w.ctx(), name, metav1.GetOptions{})
	if err != nil {
		w.t.Fatal(err)
	}
	p.Labels = labels
	if _, err := w.client.CoreV1().Pods(namespace).Update(w.ctx(), p, metav1.UpdateOptions{}); err != nil {
		w.t.Fatal(err)
	}
}

func (w *agentWorld) labelNamespace(name string, labels map[string]string) {
	w.t.Helper()
	n, err := w.client.CoreV1().Namespaces().Get(w.ctx(), name, metav1.GetOptions{})
	if err != nil {
		w.t.Fatal(err)
	}
	n.Labels = labels
	if _, err := w.client.CoreV1().Namespaces().Update(w.ctx(), n, metav1.UpdateOptions{}); err != nil {
		w.t.Fatal(err)
	}
}

// stream keeps one TCP connection from one pod to another's echo server
// busy (a message every 20 ms, each echoed back within 2 s) until stopped,
// and counts the round trips and the failures.
type stream struct {
	ok, failed atomic.Int64
	firstErr   atomic.Value
	stop       chan struct{}
	done       chan struct{}
}

func startStream(t *testing.T, from *k8sPod, to *k8sPod, port int) *stream {
	t.Helper()
	serveTCP(t, to.NS, port, func(c net.Conn) { go func() { io.Copy(c, c); c.Close() }() })
	c, err := testutil.Dial(from.NS, "tcp", net.JoinHostPort(to.IP, strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	s := &stream{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer c.Close()
		r := bufio.NewReader(c)
		for i := 0; ; i++ {
			select {
			case <-s.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			msg := fmt.Sprintf("msg-%08d\n", i)
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := io.WriteString(c, msg); err != nil {
				s.fail(err)
				return
			}
			got, err := r.ReadString('\n')
			if err != nil || got != msg {
				s.fail(fmt.Errorf("echo %q: got %q, %v", msg, got, err))
				return
			}
			s.ok.Add(1)
		}
	}()
	return s
}

func (s *stream) fail(err error) {
	s.failed.Add(1)
	s.firstErr.CompareAndSwap(nil, err)
}

// finish stops the stream and fails the test if any round trip failed.
func (s *stream) finish(t *testing.T, step string) {
	t.Helper()
	close(s.stop)
	<-s.done
	if s.failed.Load() > 0 {
		t.Fatalf("%s: established flow broke after %d round trips: %v", step, s.ok.Load(), s.firstErr.Load())
	}
	t.Logf("%s: established flow kept: %d round trips, none lost", step, s.ok.Load())
}

// createNamespaces creates namespaces through the API.
func createNamespaces(t *testing.T, client kubernetes.Interface, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := client.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
}

// newAgentNode creates a Node object with podCIDR and a simulated node
// (network namespace, state and bpffs directories, CNI conf dir) running
// ternd against the control plane, and waits until the agent is ready.
func newAgentNode(t *testing.T, cp *testutil.ControlPlane, client kubernetes.Interface, podCIDR string, extraArgs ...string) *agentWorld {
	t.Helper()
	w := prepareAgentNode(t, cp, client, podCIDR, extraArgs...)
	w.start()
	return w
}

// start starts the node's ternd and waits until it is ready.
func (w *agentWorld) start() {
	w.t.Helper()
	w.agent = startTernd(w.t, w.node, w.args)
	w.t.Logf("agent on %s ready %v after start", w.nodeName, w.waitReady(60*time.Second).Round(time.Millisecond))
}

// prepareAgentNode is newAgentNode without starting ternd.
func prepareAgentNode(t *testing.T, cp *testutil.ControlPlane, client kubernetes.Interface, podCIDR string, extraArgs ...string) *agentWorld {
	t.Helper()
	w := &agentWorld{t: t, cp: cp, client: client, node: testutil.NewNode(t), podCIDR: podCIDR, confDir: t.TempDir()}
	w.nodeName = "node-" + strings.ToLower(testutil.UniqueName("n"))
	w.http = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return testutil.Dial(w.node.NS, network, addr)
		},
	}}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: w.nodeName},
		Spec:       corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}},
	}
	if _, err := client.CoreV1().Nodes().Create(t.Context(), node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	server := apiProxy(t, w.node.NS, cp.APIServerPort)
	w.args = []string{
		"--kubeconfig", cp.Kubeconfig(t, "https://"+server),
		"--node-name", w.nodeName,
		"--cni-conf-dir", w.confDir,
		"--cni-bin-dir", w.node.CNIPath,
		"--state-dir", w.node.StateDir,
		"--bpffs-dir", w.node.BPFFSDir,
		"--cluster-cidr", "10.77.0.0/16",
		"--metrics-addr", "127.0.0.1:9962",
		"--health-addr", "127.0.0.1:9963",
		"--gc-grace", "1s",
		"--log-level", "debug",
	}
	w.args = append(w.args, extraArgs...)
	return w
}

// TestAgent runs ternd against a real kube-apiserver and etcd, for a
// simulated node (a network namespace with its own CNI config, state and
// bpffs directories): NetworkPolicy, pod label and namespace label changes
// made through the API reach the datapath within enforceBound; kill -9 of
// the agent under traffic keeps the established flow and opens nothing; an
// agent started after the pods catches up; while the API server is down
// the datapath keeps forwarding, and the agent catches up when it is back;
// endpoints whose pods are deleted without CNI DEL are collected.
func TestAgent(t *testing.T) {
	testutil.RequirePrivileged(t)
	cp := testutil.StartControlPlane(t)
	client := cp.Client(t)
	ctx := t.Context()
	createNamespaces(t, client, "alpha", "beta", "gamma")
	w := newAgentNode(t, cp, client, "10.77.150.0/24")
	agent := w.agent

	srv := w.addPod("alpha", "srv", map[string]string{"app": "srv"})
	cli := w.addPod("alpha", "cli", map[string]string{"app": "cli"})
	out := w.addPod("beta", "out", map[string]string{"app": "out"})
	bad := w.addPod("gamma", "bad", map[string]string{"app": "bad"})
	expect(t, "no policy", tcp(cli, srv, 80, true), tcp(out, srv, 80, true), tcp(bad, srv, 80, true))

	// NetworkPolicy through the API.
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "alpha", Name: "srv-ingress"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "srv"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
				{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "friend"}}},
				{NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": "blue"}}},
			}}},
		},
	}
	start := time.Now()
	if _, err := w.client.NetworkingV1().NetworkPolicies("alpha").Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w.enforced("NetworkPolicy created", start, enforceBound, tcp(cli, srv, 80, false), tcp(out, srv, 80, false))

	// A pod label.
	start = time.Now()
	w.labelPod("alpha", "cli", map[string]string{"app": "cli", "role": "friend"})
	w.enforced("pod label added", start, enforceBound, tcp(cli, srv, 80, true))

	// A namespace label.
	start = time.Now()
	w.labelNamespace("beta", map[string]string{"team": "blue"})
	w.enforced("namespace label added", start, enforceBound, tcp(out, srv, 80, true))
	expect(t, "policy in force", tcp(bad, srv, 80, false), tcp(cli, srv, 80, true), tcp(out, srv, 80, true))

	// kill -9 under traffic: the established flow goes on, nothing opens.
	s := startStream(t, cli, srv, 7000)
	time.Sleep(300 * time.Millisecond)
	agent.kill9()
	expect(t, "agent killed", tcp(bad, srv, 80, false), tcp(cli, srv, 80, true), tcp(out, srv, 80, true))
	// A change made while no agent runs, and an agent started after the
	// pods: it resyncs from the API and reconciles by diff.
	w.labelNamespace("gamma", map[string]string{"team": "blue"})
	time.Sleep(500 * time.Millisecond)
	expect(t, "agent down", tcp(bad, srv, 80, false))
	start = time.Now()
	agent = startTernd(t, w.node, w.args)
	w.agent = agent
	w.waitReady(60 * time.Second)
	w.enforced("change made while the agent was down, new agent", start, enforceBound+5*time.Second, tcp(bad, srv, 80, true))
	s.finish(t, "agent kill -9 and restart")

	// The API server goes away for a while: forwarding and enforcement
	// go on; the agent catches up when it is back.
	s = startStream(t, out, srv, 7001)
	cp.StopAPIServer()
	expect(t, "API server down", tcp(cli, srv, 80, true), tcp(out, srv, 80, true), tcp(bad, srv, 80, true))
	if err := w.get("/healthz", "9963", nil); err != nil {
		t.Errorf("healthz while the API server is down: %v", err)
	}
	time.Sleep(3 * time.Second)
	cp.StartAPIServer()
	start = time.Now()
	w.labelNamespace("gamma", nil)
	w.enforced("change made right after the API server came back", start, 60*time.Second, tcp(bad, srv, 80, false))
	s.finish(t, "API server outage")

	// /metrics.
	var metrics string
	if err := w.get("/metrics", "9962", &metrics); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"tern_policy_apply_duration_seconds_count",
		`tern_datapath_dropped_packets_total{reason="policy_ingress"}`,
		`tern_datapath_forwarded_packets_total{path="redirect_peer"}`,
		`tern_datapath_map_entries{map="tern_endpoints"} 4`,
		"tern_agent_endpoints 4",
		`tern_agent_informer_events_total{resource="pods"}`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}

	// A pod deleted from the API whose CNI DEL never came: collected.
	// Grace period 0: no kubelet confirms the deletion here.
	if err := w.client.CoreV1().Pods("beta").Delete(ctx, "out", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	took, err := testutil.WaitFor(ctx, 30*time.Second, func() error {
		for _, k := range endpointKeys(t, w.node) {
			if k == out.IP {
				return fmt.Errorf("endpoint %s still in the datapath", out.IP)
			}
		}
		if recs, _ := filepath.Glob(filepath.Join(w.node.StateDir, "attachments", "*", out.ID+":*")); len(recs) > 0 {
			return fmt.Errorf("record of %s still there", out.ID)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("endpoint of a deleted pod not collected after %v: %v", took, err)
	}
	t.Logf("endpoint of the deleted pod collected %v after the delete", took.Round(time.Millisecond))
	expect(t, "after GC", tcp(cli, srv, 80, true), tcp(bad, srv, 80, false))

	// Uninstall removes the conflist.
	agent.stop()
	// In the node's namespace: uninstall also removes the routes to the
	// other nodes that the installed configuration's routing made.
	if b, err := w.node.Exec(t, terndBinary(t), "--uninstall", "--cni-conf-dir", w.confDir); err != nil {
		t.Fatalf("ternd --uninstall: %v\n%s", err, b)
	}
	if _, err := os.Stat(filepath.Join(w.confDir, "10-tern.conflist")); !os.IsNotExist(err) {
		t.Fatalf("conflist still there after --uninstall: %v", err)
	}
}

// TestAgentOffline: without an API server, ternd --offline installs the
// conflist for --pod-cidr once the datapath is loadable and reports ready;
// policy comes from ternctl apply (the file-based source) and is enforced
// on the pods wired with that conflist.
func TestAgentOffline(t *testing.T) {
	testutil.RequirePrivileged(t)
	w := &agentWorld{t: t, node: testutil.NewNode(t), confDir: t.TempDir()}
	w.http = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return testutil.Dial(w.node.NS, network, addr)
		},
	}}
	w.agent = startTernd(t, w.node, []string{
		"--offline", "--pod-cidr", "10.77.154.0/24",
		"--cni-conf-dir", w.confDir,
		"--cni-bin-dir", w.node.CNIPath,
		"--state-dir", w.node.StateDir,
		"--bpffs-dir", w.node.BPFFSDir,
		"--metrics-addr", "127.0.0.1:9962",
		"--health-addr", "127.0.0.1:9963",
	})
	w.waitReady(60 * time.Second)
	confFile := filepath.Join(w.confDir, "10-tern.conflist")
	conf, err := os.ReadFile(confFile)
	if err != nil {
		t.Fatal(err)
	}
	a := addK8sPod(t, w.node, conf, "default", "a")
	b := addK8sPod(t, w.node, conf, "default", "b")
	if !strings.HasPrefix(a.IP, "10.77.154.") {
		t.Fatalf("pod address %s is not from --pod-cidr", a.IP)
	}
	expect(t, "no policy", tcp(a, b, 80, true))
	manifest := filepath.Join(t.TempDir(), "deny.yaml")
	if err := os.WriteFile(manifest, []byte(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Ingress]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := w.node.Exec(t, ternctlBinary(t), "--cni-conf", confFile, "apply", "-f", manifest); err != nil {
		t.Fatalf("ternctl apply: %v\n%s", err, out)
	}
	expect(t, "ternctl deny-all", tcp(a, b, 80, false))
	var metrics string
	if err := w.get("/metrics", "9962", &metrics); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(metrics, `tern_datapath_dropped_packets_total{reason="policy_ingress"}`) {
		t.Errorf("/metrics lacks the policy drop counter")
	}
}
