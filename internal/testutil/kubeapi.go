package testutil

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// KubeAssetsEnv names the directory holding kube-apiserver and etcd
// (scripts/kube-testenv.sh prints it); TERN_KUBE_ASSETS is accepted too.
const KubeAssetsEnv = "KUBEBUILDER_ASSETS"

// ControlPlane is a real etcd and kube-apiserver, on loopback ports of the
// test process's network namespace, with their data in per-test
// directories. Clients authenticate with a static token of a member of
// system:masters; the apiserver's serving certificate is self-signed
// (clients skip verification).
type ControlPlane struct {
	// Host is the API server's URL, https://127.0.0.1:<port>.
	Host  string
	Token string
	// APIServerPort is the secure port; a proxy may forward to it.
	APIServerPort int

	t         testing.TB
	assets    string
	dir       string
	etcd      *process
	apiserver *process
	apiArgs   []string
}

// KubeAssets returns the directory with kube-apiserver and etcd, skipping
// the test when there is none, or failing it when skips are forbidden
// (TERN_REQUIRE_PRIVILEGED=1 or CI=true).
func KubeAssets(t testing.TB) string {
	t.Helper()
	dir := os.Getenv(KubeAssetsEnv)
	if dir == "" {
		dir = os.Getenv("TERN_KUBE_ASSETS")
	}
	missing := ""
	switch {
	case dir == "":
		missing = "KUBEBUILDER_ASSETS is not set (run scripts/kube-testenv.sh)"
	default:
		for _, b := range []string{"kube-apiserver", "etcd"} {
			if err := checkExecutable(filepath.Join(dir, b)); err != nil {
				missing = fmt.Sprintf("%s: %v", KubeAssetsEnv, err)
			}
		}
	}
	if missing == "" {
		return dir
	}
	if os.Getenv("TERN_REQUIRE_PRIVILEGED") == "1" || os.Getenv("CI") == "true" {
		t.Fatalf("control-plane test cannot run: %s", missing)
	}
	t.Skipf("control-plane test skipped: %s", missing)
	return ""
}

// StartControlPlane starts etcd and kube-apiserver and waits until the API
// server is ready. Both are stopped, and their files removed, when the
// test ends; they die with the test process (SIGKILL on parent death).
func StartControlPlane(t testing.TB) *ControlPlane {
	t.Helper()
	assets := KubeAssets(t)
	dir := t.TempDir()
	cp := &ControlPlane{t: t, assets: assets, dir: dir, Token: "tern-test-" + randomBase36(16)}
	ports := freePorts(t, 3)
	etcdClient := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	etcdPeer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	cp.APIServerPort = ports[2]
	cp.Host = fmt.Sprintf("https://127.0.0.1:%d", cp.APIServerPort)

	cp.etcd = cp.start("etcd", filepath.Join(assets, "etcd"),
		"--name", "default",
		"--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", etcdClient, "--advertise-client-urls", etcdClient,
		"--listen-peer-urls", etcdPeer, "--initial-advertise-peer-urls", etcdPeer,
		"--initial-cluster", "default="+etcdPeer)
	t.Cleanup(func() { stopProcess(cp.etcd) })

	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	saKey := filepath.Join(dir, "sa.key")
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	tokens := filepath.Join(dir, "tokens.csv")
	for path, data := range map[string][]byte{saKey: pemKey, tokens: []byte(cp.Token + ",tern-test,tern-test,system:masters\n")} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cp.apiArgs = []string{
		"--etcd-servers", etcdClient,
		"--bind-address", "127.0.0.1",
		"--advertise-address", "127.0.0.1",
		"--endpoint-reconciler-type", "none", // loopback cannot be advertised
		"--secure-port", strconv.Itoa(cp.APIServerPort),
		"--cert-dir", filepath.Join(dir, "certs"),
		"--token-auth-file", tokens,
		"--authorization-mode", "RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc",
		"--service-account-key-file", saKey,
		"--service-account-signing-key-file", saKey,
		"--service-cluster-ip-range", "10.96.0.0/16",
		"--disable-admission-plugins", "ServiceAccount",
		"--allow-privileged",
	}
	cp.StartAPIServer()
	t.Cleanup(func() {
		cp.StopAPIServer()
		if t.Failed() {
			for _, name := range []string{"kube-apiserver", "etcd"} {
				t.Logf("%s log ends with:\n%s", name, cp.logTail(name, 15))
			}
		}
	})
	return cp
}

// logTail returns the last n lines of a component's log.
func (cp *ControlPlane) logTail(name string, n int) string {
	log, _ := os.ReadFile(filepath.Join(cp.dir, name+".log"))
	lines := strings.Split(strings.TrimSpace(string(log)), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// StopAPIServer stops kube-apiserver (etcd keeps running); StartAPIServer
// starts it again on the same port with the same data.
func (cp *ControlPlane) StopAPIServer() {
	stopProcess(cp.apiserver)
	cp.apiserver = nil
}

// StartAPIServer starts kube-apiserver and waits until /readyz answers ok
// (at most 90 s).
func (cp *ControlPlane) StartAPIServer() {
	cp.t.Helper()
	cp.apiserver = cp.start("kube-apiserver", filepath.Join(cp.assets, "kube-apiserver"), cp.apiArgs...)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	deadline := time.Now().Add(90 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		req, _ := http.NewRequest(http.MethodGet, cp.Host+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+cp.Token)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		if cp.apiserver.exited() {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	cp.t.Fatalf("kube-apiserver not ready: %s; its log ends with:\n%s", last, cp.logTail("kube-apiserver", 20))
}

// RESTConfig is a client configuration for the API server.
func (cp *ControlPlane) RESTConfig() *rest.Config {
	return &rest.Config{
		Host:            cp.Host,
		BearerToken:     cp.Token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		QPS:             1000,
		Burst:           1000,
	}
}

// Client is a clientset for the API server.
func (cp *ControlPlane) Client(t testing.TB) kubernetes.Interface {
	c, err := kubernetes.NewForConfig(cp.RESTConfig())
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Kubeconfig writes a kubeconfig for server (default: cp.Host) and
// returns its path.
func (cp *ControlPlane) Kubeconfig(t testing.TB, server string) string {
	if server == "" {
		server = cp.Host
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	data := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: %q, insecure-skip-tls-verify: true}
users:
- name: test
  user: {token: %q}
contexts:
- name: test
  context: {cluster: test, user: test}
current-context: test
`, server, cp.Token)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// process is a child process and the channel closed when it has exited.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (cp *ControlPlane) start(name, bin string, args ...string) *process {
	cp.t.Helper()
	logf, err := os.OpenFile(filepath.Join(cp.dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		cp.t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	done, err := StartProcess(cmd, nil)
	if err != nil {
		logf.Close()
		cp.t.Fatalf("start %s: %v", name, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() {
		<-done
		logf.Close()
		close(p.done)
	}()
	return p
}

// stopProcess sends SIGTERM, then SIGKILL after 10 s, and waits.
func stopProcess(p *process) {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// freePorts returns n distinct free TCP ports on 127.0.0.1.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

// WaitFor polls cond every 50 ms until it returns nil or timeout passes,
// and returns the time it took or the last error.
func WaitFor(ctx context.Context, timeout time.Duration, cond func() error) (time.Duration, error) {
	start := time.Now()
	for {
		err := cond()
		if err == nil {
			return time.Since(start), nil
		}
		if time.Since(start) > timeout || ctx.Err() != nil {
			return time.Since(start), err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StartProcess starts cmd, in network namespace n (nil: the test
// process's), with SIGKILL as its parent-death signal, so it dies with the
// test process. The kernel sends that signal when the *thread* that forked
// the child exits, and Go ends threads that goroutines leave locked (netns
// helpers do, ns.Do among them, which also runs its callback on a thread of
// its own): cmd is therefore forked from a thread this function locks, and
// switches into n itself, for the child's whole life. done is closed once
// the child has exited and been waited for.
func StartProcess(cmd *exec.Cmd, n ns.NetNS) (done <-chan struct{}, err error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	exited := make(chan struct{})
	errc := make(chan error)
	go func() {
		runtime.LockOSThread()
		restored := true
		defer func() {
			if restored {
				runtime.UnlockOSThread()
			} // else: the thread ends with this goroutine, after the child
		}()
		if n != nil {
			orig, err := ns.GetCurrentNS()
			if err != nil {
				errc <- err
				return
			}
			defer orig.Close()
			if err := n.Set(); err != nil {
				errc <- err
				return
			}
			err = cmd.Start()
			if serr := orig.Set(); serr != nil {
				restored = false
			}
			errc <- err
		} else {
			errc <- cmd.Start()
		}
		if cmd.Process == nil {
			return
		}
		_ = cmd.Wait()
		close(exited)
	}()
	if err := <-errc; err != nil {
		return nil, err
	}
	return exited, nil
}
