package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// netnsDir is where named network namespaces live (iproute2's convention),
// so `ip netns list` shows the harness's namespaces while it runs.
const netnsDir = "/run/netns"

// Netns is a named network namespace created by the harness: the node of a
// path, a pod, or a control-plane pod.
type Netns struct {
	Name string
	Path string

	ns    ns.NetNS
	nl    *netlink.Handle // netlink socket opened inside the namespace
	procs *procTracker
}

// createNetns creates the named namespace name with its loopback up.
func createNetns(name string, procs *procTracker) (*Netns, error) {
	path := filepath.Join(netnsDir, name)
	// netns.NewNamed moves the calling thread into the new namespace, so it
	// runs on a thread of its own that is moved back before it is released;
	// if moving back fails the thread stays locked and the runtime discards
	// it with the goroutine.
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		h, err := netns.NewNamed(name)
		if err == nil {
			h.Close()
		}
		if serr := netns.Set(orig); serr != nil {
			errc <- errors.Join(err, fmt.Errorf("restore thread netns: %w", serr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	n := &Netns{Name: name, Path: path, procs: procs}
	var err error
	if n.ns, err = ns.GetNS(path); err != nil {
		n.Close()
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	h, err := netns.GetFromPath(path)
	if err != nil {
		n.Close()
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	n.nl, err = netlink.NewHandleAt(h)
	h.Close()
	if err != nil {
		n.Close()
		return nil, fmt.Errorf("netlink handle in netns %s: %w", name, err)
	}
	lo, err := n.nl.LinkByName("lo")
	if err == nil {
		err = n.nl.LinkSetUp(lo)
	}
	if err != nil {
		n.Close()
		return nil, fmt.Errorf("set lo up in netns %s: %w", name, err)
	}
	return n, nil
}

// Close deletes the namespace. Links inside it (veths, bridges), its
// routes and its netfilter rules go with it once no process holds it.
func (n *Netns) Close() error {
	if n == nil {
		return nil
	}
	if n.nl != nil {
		n.nl.Close()
		n.nl = nil
	}
	if n.ns != nil {
		n.ns.Close()
		n.ns = nil
	}
	if _, err := os.Stat(n.Path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := netns.DeleteNamed(n.Name); err != nil {
		return fmt.Errorf("delete netns %s: %w", n.Name, err)
	}
	return nil
}

// Do runs f on an OS thread switched into the namespace. Sockets created
// and processes started inside f belong to the namespace.
func (n *Netns) Do(f func() error) error {
	return n.ns.Do(func(ns.NetNS) error { return f() })
}

// Netlink is a netlink handle bound to the namespace.
func (n *Netns) Netlink() *netlink.Handle { return n.nl }

// Sysctl writes value to the sysctl key (dotted form, e.g.
// "net.ipv4.ip_forward") of the namespace.
func (n *Netns) Sysctl(key, value string) error {
	file := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	err := n.Do(func() error { return os.WriteFile(file, []byte(value), 0o644) })
	if err != nil {
		return fmt.Errorf("sysctl %s=%s in %s: %w", key, value, n.Name, err)
	}
	return nil
}

// Listen opens a listener whose socket lives in the namespace.
func (n *Netns) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() error {
		var err error
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// Dial connects from the namespace.
func (n *Netns) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var err error
		c, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return c, err
}

// Proc is a process started inside a namespace, in a process group of its
// own so that stopping it stops its children too.
type Proc struct {
	Argv   []string
	cmd    *exec.Cmd
	stderr *tailBuffer
	done   chan struct{}
	err    error
	procs  *procTracker
}

// Start starts argv inside the namespace. The process is forked from a
// thread that is inside the namespace, so it inherits it; it gets SIGKILL
// if the harness dies, and when ctx ends. stdout may be nil.
func (n *Netns) Start(ctx context.Context, argv []string, stdout io.Writer) (*Proc, error) {
	p := &Proc{Argv: argv, stderr: &tailBuffer{max: 8 << 10}, done: make(chan struct{}), procs: n.procs}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Stdout = stdout
	cmd.Stderr = p.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	p.cmd = cmd
	if err := n.Do(cmd.Start); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", strings.Join(argv, " "), n.Name, err)
	}
	if p.procs != nil {
		p.procs.add(p)
	}
	go func() {
		p.err = cmd.Wait()
		if p.procs != nil {
			p.procs.remove(p)
		}
		close(p.done)
	}()
	return p, nil
}

// Run runs argv inside the namespace and returns its standard output. The
// error carries the end of its standard error.
func (n *Netns) Run(ctx context.Context, argv ...string) ([]byte, error) {
	var out bytes.Buffer
	p, err := n.Start(ctx, argv, &out)
	if err != nil {
		return nil, err
	}
	<-p.done
	if p.err != nil {
		return out.Bytes(), p.exitError()
	}
	return out.Bytes(), nil
}

// Exited reports whether the process has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for the process to end by itself, then stops it.
func (p *Proc) Wait(timeout time.Duration) error {
	select {
	case <-p.done:
	case <-time.After(timeout):
		p.Stop()
		return fmt.Errorf("%s: still running after %s, killed", p.Argv[0], timeout)
	}
	if p.err != nil {
		return p.exitError()
	}
	return nil
}

// Stop sends SIGTERM to the process group, then SIGKILL after a grace
// period, and waits for the process.
func (p *Proc) Stop() {
	if p.Exited() {
		return
	}
	pid := p.cmd.Process.Pid
	_ = syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(2 * time.Second):
	}
	_ = syscall.Kill(-pid, syscall.SIGKILL)
	<-p.done
}

func (p *Proc) exitError() error {
	msg := strings.TrimSpace(p.stderr.String())
	if msg == "" {
		return fmt.Errorf("%s: %w", strings.Join(p.Argv, " "), p.err)
	}
	return fmt.Errorf("%s: %w: %s", strings.Join(p.Argv, " "), p.err, lastLines(msg, 6))
}

// procTracker knows the processes still running, for teardown and the
// leak check.
type procTracker struct {
	mu    sync.Mutex
	procs map[*Proc]struct{}
}

func (t *procTracker) add(p *Proc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.procs == nil {
		t.procs = make(map[*Proc]struct{})
	}
	t.procs[p] = struct{}{}
}

func (t *procTracker) remove(p *Proc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.procs, p)
}

// stopAll stops every process still running and returns their command
// lines.
func (t *procTracker) stopAll() []string {
	t.mu.Lock()
	var ps []*Proc
	for p := range t.procs {
		ps = append(ps, p)
	}
	t.mu.Unlock()
	var names []string
	for _, p := range ps {
		names = append(names, strings.Join(p.Argv, " "))
		p.Stop()
	}
	return names
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if over := len(b.buf) - b.max; over > 0 {
		b.buf = append(b.buf[:0], b.buf[over:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}

// waitListening waits until a socket of proto ("tcp" or "udp") is bound to
// port in the namespace (listening, for TCP), or until p exits.
func (n *Netns) waitListening(ctx context.Context, proto string, port int, p *Proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := n.bound(proto, port)
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if p != nil && p.Exited() {
			if p.err != nil {
				return fmt.Errorf("exited before listening on %s/%d: %w", proto, port, p.exitError())
			}
			return fmt.Errorf("%s exited before listening on %s/%d", p.Argv[0], proto, port)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listening on %s/%d in %s after %s", proto, port, n.Name, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// bound reads /proc/thread-self/net/{proto,proto6} from inside the
// namespace (/proc/self/net would show the namespace of the main thread).
func (n *Netns) bound(proto string, port int) (bool, error) {
	found := false
	err := n.Do(func() error {
		for _, f := range []string{proto, proto + "6"} {
			data, err := os.ReadFile("/proc/thread-self/net/" + f)
			if err != nil {
				if errors.Is(err, os.ErrNotExist) {
					continue
				}
				return err
			}
			if procNetHasPort(data, port, proto == "tcp") {
				found = true
				return nil
			}
		}
		return nil
	})
	return found, err
}

// procNetHasPort parses /proc/net/{tcp,udp}[6]: "sl local_address
// rem_address st ...", local_address being HEXIP:HEXPORT and st 0A for a
// TCP listener.
func procNetHasPort(data []byte, port int, listen bool) bool {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Scan() // header
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 {
			continue
		}
		i := strings.LastIndexByte(f[1], ':')
		if i < 0 {
			continue
		}
		p, err := strconv.ParseUint(f[1][i+1:], 16, 16)
		if err != nil || int(p) != port {
			continue
		}
		if listen && f[3] != "0A" {
			continue
		}
		return true
	}
	return false
}
