package bpf

import (
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// The socket programs (sock_lb.c). BPF_PROG_TEST_RUN does not run cgroup
// sock_addr programs, so they run for real: attached to a test cgroup,
// for a client process (this binary, re-executed by testutil.SockClient)
// in a test network namespace whose loopback addresses stand for the
// backends; the frontends have no route there, so only a translated
// connect reaches anything.

func init() { testutil.SockClientMain() }

type sockWorld struct {
	ns     ns.NetNS
	cgroup string
	tern   *ebpf.Collection
	sock   *ebpf.Collection
}

// newSockWorld loads Tern and TernSock with their maps pinned by name in
// a test bpffs, as the loader does on a node, and attaches the socket
// programs to a test cgroup; tern_sock_config names the test netns.
func newSockWorld(t *testing.T) *sockWorld {
	t.Helper()
	testutil.RequirePrivileged(t)
	w := &sockWorld{ns: testutil.NewNetNS(t, "sockt")}
	pins := testutil.MountBPFFS(t)
	for _, load := range []struct {
		spec func() (*ebpf.CollectionSpec, error)
		coll **ebpf.Collection
	}{{LoadTern, &w.tern}, {LoadTernSock, &w.sock}} {
		spec, err := load.spec()
		if err != nil {
			t.Fatal(err)
		}
		coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pins}})
		if err != nil {
			t.Fatalf("load %+v", err)
		}
		t.Cleanup(coll.Close)
		*load.coll = coll
	}
	w.cgroup = testutil.NewCgroup(t)
	for name, at := range map[string]ebpf.AttachType{
		TernSockProgTernSockConnect4:     ebpf.AttachCGroupInet4Connect,
		TernSockProgTernSockSendmsg4:     ebpf.AttachCGroupUDP4Sendmsg,
		TernSockProgTernSockRecvmsg4:     ebpf.AttachCGroupUDP4Recvmsg,
		TernSockProgTernSockGetpeername4: ebpf.AttachCgroupInet4GetPeername,
	} {
		lk, err := link.AttachCgroup(link.CgroupOptions{Path: w.cgroup, Attach: at, Program: w.sock.Programs[name]})
		if err != nil {
			t.Fatalf("attach %s: %v", name, err)
		}
		// Closing an unpinned link detaches it; before the cgroup goes.
		t.Cleanup(func() { lk.Close() })
	}
	var cookie uint64
	err := w.ns.Do(func(ns.NetNS) error {
		if _, err := testutil.ExecIn(w.ns, "ip", "link", "set", "lo", "up"); err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, 71 /* SO_NETNS_COOKIE */)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.sock.Maps[TernSockMapTernSockConfig].Put(uint32(0), TernSockSockConfig{NetnsCookie: cookie}); err != nil {
		t.Fatal(err)
	}
	return w
}

// service writes a frontend with its backend slots, into the maps as the
// Tern object (tc) sees them: the socket programs must read the same.
func (w *sockWorld) service(t *testing.T, vip netip.Addr, port uint16, proto uint8, id uint32, svc TernLbSvc, backends ...lbBackend) {
	t.Helper()
	svc.Id, svc.Count = id, uint32(len(backends))
	for i, b := range backends {
		if err := w.tern.Maps[TernMapTernLbBackends].Put(TernLbSlotKey{Id: id, Slot: uint32(i)}, TernLbBackend{Addr: natAddr(b.ip), Port: natPort(b.port)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.tern.Maps[TernMapTernLbSvc].Put(TernLbSvcKey{Addr: natAddr(vip), Port: natPort(port), Proto: proto}, svc); err != nil {
		t.Fatal(err)
	}
}

// serveTCP greets each connection on addr (in the test netns) with name.
func (w *sockWorld) serveTCP(t *testing.T, addr, name string) {
	t.Helper()
	l, err := testutil.ListenTCP(w.ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			_, _ = c.Write([]byte(name + "\n"))
			c.Close()
		}
	})
}

// serveUDP answers each datagram on addr with "name payload".
func (w *sockWorld) serveUDP(t *testing.T, addr, name string) {
	t.Helper()
	c, err := testutil.ListenUDP(w.ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { c.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = c.WriteTo([]byte(name+" "+string(buf[:n])), from)
		}
	})
}

func (w *sockWorld) client(args ...string) (string, error) {
	return testutil.SockClient(w.ns, w.cgroup, args...)
}

// TestSockLBSharedMaps: the socket programs use the very maps the tc
// programs use (pinned by name), not copies of their own.
func TestSockLBSharedMaps(t *testing.T) {
	w := newSockWorld(t)
	info, err := w.sock.Programs[TernSockProgTernSockConnect4].Info()
	if err != nil {
		t.Fatal(err)
	}
	used, _ := info.MapIDs()
	for _, name := range []string{TernMapTernLbSvc, TernMapTernLbBackends, TernMapTernLbAffinity, TernMapTernConfig} {
		mi, err := w.tern.Maps[name].Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := mi.ID()
		found := false
		for _, u := range used {
			found = found || u == id
		}
		if !found {
			t.Errorf("tern_sock_connect4 does not use the tc programs' %s (id %d; uses %v)", name, id, used)
		}
	}
}

// TestSockLBTranslate: a host process's TCP connect, unconnected and
// connected UDP reach the backends of a frontend, chosen over the slots,
// and see the frontend as their peer (getpeername, recvfrom); a frontend
// without backends refuses (ECONNREFUSED), one that drops (Local) fails
// with EPERM; a slot change is followed by the next socket; a process of
// another network namespace is not translated.
func TestSockLBTranslate(t *testing.T) {
	w := newSockWorld(t)
	vip := netip.MustParseAddr("10.96.0.10")
	b1, b2 := netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.3")
	w.serveTCP(t, "127.0.0.2:8080", "b1")
	w.serveTCP(t, "127.0.0.3:8080", "b2")
	w.serveUDP(t, "127.0.0.2:5353", "b1")
	w.service(t, vip, 80, unix.IPPROTO_TCP, 1, TernLbSvc{}, lbBackend{b1, 8080}, lbBackend{b2, 8080})
	w.service(t, vip, 53, unix.IPPROTO_UDP, 2, TernLbSvc{}, lbBackend{b1, 5353})
	w.service(t, vip, 81, unix.IPPROTO_TCP, 3, TernLbSvc{})
	w.service(t, vip, 82, unix.IPPROTO_TCP, 4, TernLbSvc{Flags: uint32(TernLbSvcFlagsLB_SVC_F_DROP)})

	seen := map[string]bool{}
	for i := 0; i < 30 && len(seen) < 2; i++ {
		out, err := w.client("tcp", "10.96.0.10:80")
		if err != nil {
			t.Fatal(err)
		}
		peer, name, _ := strings.Cut(out, " ")
		if peer != "10.96.0.10:80" {
			t.Errorf("getpeername: %s, want the frontend 10.96.0.10:80", peer)
		}
		seen[name] = true
	}
	if !seen["b1"] || !seen["b2"] {
		t.Errorf("connections reached %v, want both backends", seen)
	}
	for _, mode := range []string{"udp", "udpconn"} {
		if out, err := w.client(mode, "10.96.0.10:53", "q"); err != nil || out != "10.96.0.10:53 b1 q" {
			t.Errorf("%s: %q (%v), want the answer from the frontend 10.96.0.10:53", mode, out, err)
		}
	}
	for port, want := range map[int]string{81: "connection refused", 82: "operation not permitted"} {
		addr := "10.96.0.10:" + strconv.Itoa(port)
		if out, err := w.client("tcp", addr); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("tcp %s (no backend): %q (%v), want %s", addr, out, err, want)
		}
	}
	if out, err := w.client("udp", "10.96.0.10:81", "q"); err == nil || !strings.Contains(err.Error(), "network is unreachable") {
		// UDP 81 is no frontend (only TCP is): untranslated, no route.
		t.Errorf("udp to a TCP-only frontend: %q (%v), want it untranslated (no route)", out, err)
	}

	// The slots change (b2 leaves: count 1): every new socket gets b1.
	w.service(t, vip, 80, unix.IPPROTO_TCP, 1, TernLbSvc{}, lbBackend{b1, 8080})
	for i := 0; i < 8; i++ {
		if out, err := w.client("tcp", "10.96.0.10:80"); err != nil || out != "10.96.0.10:80 b1" {
			t.Fatalf("after b2 left: %q (%v), want b1", out, err)
		}
	}

	// Another namespace, same cgroup: not the node's, not translated.
	other := testutil.NewNetNS(t, "socko")
	if _, err := testutil.ExecIn(other, "ip", "link", "set", "lo", "up"); err != nil {
		t.Fatal(err)
	}
	if out, err := testutil.SockClient(other, w.cgroup, "tcp", "10.96.0.10:80"); err == nil || !strings.Contains(err.Error(), "network is unreachable") {
		t.Errorf("another netns: %q (%v), want it untranslated (no route)", out, err)
	}
}
