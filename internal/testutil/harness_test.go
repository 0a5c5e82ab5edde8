package testutil

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestUniqueName(t *testing.T) {
	seen := map[string]bool{}
	for range 2000 {
		n := UniqueName("tern-pod-")
		if len(n) > 15 {
			t.Fatalf("UniqueName gave %q, longer than 15", n)
		}
		if !strings.HasPrefix(n, "tern-pod") {
			t.Fatalf("UniqueName gave %q, want prefix cut to tern-pod", n)
		}
		if seen[n] {
			t.Fatalf("UniqueName repeated %q", n)
		}
		seen[n] = true
	}
	if n := UniqueName("v"); len(n) != 1+suffixLen {
		t.Errorf("UniqueName(\"v\") = %q, want %d characters", n, 1+suffixLen)
	}
}

// netnsList returns the names `ip netns list` prints.
func netnsList(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names
}

// assertNetNSGone checks that neither `ip netns list` nor /run/netns shows
// any of names.
func assertNetNSGone(t *testing.T, names ...string) {
	t.Helper()
	listed := netnsList(t)
	for _, name := range names {
		if slices.Contains(listed, name) {
			t.Errorf("netns %s still listed by ip netns list", name)
		}
		if _, err := os.Stat(filepath.Join(NetNSRunDir, name)); !os.IsNotExist(err) {
			t.Errorf("%s/%s still exists (stat: %v)", NetNSRunDir, name, err)
		}
	}
}

// isMounted reports whether dir is a mount point in this mount namespace.
func isMounted(t *testing.T, dir string) bool {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

func TestNewNetNSCleanup(t *testing.T) {
	RequirePrivileged(t)
	var name string
	t.Run("create", func(t *testing.T) {
		n := NewNetNS(t, "tt")
		name = NSName(n)
		if n.Path() != filepath.Join(NetNSRunDir, name) {
			t.Errorf("path %s, want under %s", n.Path(), NetNSRunDir)
		}
		if !slices.Contains(netnsList(t), name) {
			t.Errorf("ip netns list does not show %s", name)
		}
		out, err := exec.Command("ip", "-n", name, "-o", "link", "show", "lo").CombinedOutput()
		if err != nil {
			t.Fatalf("ip -n %s link: %v: %s", name, err, out)
		}
		if !strings.Contains(string(out), "UP") {
			t.Errorf("lo not up in %s: %s", name, out)
		}
	})
	assertNetNSGone(t, name)
}

// connectVeth joins a and b with a veth pair, a side aIP/30 and b side
// bIP/30, both up, and returns the name of a's side.
func connectVeth(t *testing.T, a, b ns.NetNS, aIP, bIP string) string {
	t.Helper()
	aName, bName := UniqueName("va"), UniqueName("vb")
	err := a.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: aName},
			PeerName:      bName,
			PeerNamespace: netlink.NsFd(int(b.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth: %w", err)
		}
		return setAddrUp(aName, aIP)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Do(func(ns.NetNS) error { return setAddrUp(bName, bIP) }); err != nil {
		t.Fatal(err)
	}
	return aName
}

func setAddrUp(name, cidr string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	if err := netlink.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("add %s to %s: %w", cidr, name, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func TestTrafficOverVeth(t *testing.T) {
	RequirePrivileged(t)
	var names []string
	t.Run("traffic", func(t *testing.T) {
		a, b := NewNetNS(t, "pa"), NewNetNS(t, "pb")
		names = []string{NSName(a), NSName(b)}
		aVeth := connectVeth(t, a, b, "10.77.3.1/30", "10.77.3.2/30")

		if err := Ping(a, "10.77.3.2", 3); err != nil {
			t.Errorf("Ping: %v", err)
		}
		if err := TCPTransfer(a, b, "10.77.3.2", 1<<20); err != nil {
			t.Errorf("TCPTransfer 1 MiB: %v", err)
		}
		if err := TCPTransfer(b, a, "10.77.3.1", 0); err != nil {
			t.Errorf("TCPTransfer 0 bytes the other way: %v", err)
		}
		if err := UDPEcho(a, b, "10.77.3.2"); err != nil {
			t.Errorf("UDPEcho: %v", err)
		}

		// The listener really lives in b: b's own address is reachable from b
		// while the same port on a's loopback is not.
		l, err := ListenTCP(b, "10.77.3.2:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if _, err := Dial(a, "tcp", l.Addr().String()); err != nil {
			// Not accepted, but the handshake completes through the backlog.
			t.Errorf("dial listener in b from a: %v", err)
		}
		_, port, _ := net.SplitHostPort(l.Addr().String())
		if c, err := Dial(a, "tcp", "127.0.0.1:"+port); err == nil {
			c.Close()
			t.Errorf("listener in b answered on a's loopback")
		}

		// With a's side down there is no route: every helper must fail.
		err = a.Do(func(ns.NetNS) error {
			link, err := netlink.LinkByName(aVeth)
			if err != nil {
				return err
			}
			return netlink.LinkSetDown(link)
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := Ping(a, "10.77.3.2", 1); err == nil {
			t.Error("Ping succeeded with the link down")
		}
		if err := TCPTransfer(a, b, "10.77.3.2", 1024); err == nil {
			t.Error("TCPTransfer succeeded with the link down")
		}
	})
	assertNetNSGone(t, names...)
}

func TestMountBPFFS(t *testing.T) {
	RequirePrivileged(t)
	var dir string
	t.Run("mount", func(t *testing.T) {
		dir = MountBPFFS(t)
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil {
			t.Fatal(err)
		}
		if st.Type != unix.BPF_FS_MAGIC {
			t.Errorf("statfs %s: type %#x, want bpffs %#x", dir, st.Type, unix.BPF_FS_MAGIC)
		}
		if !isMounted(t, dir) {
			t.Errorf("%s not in mountinfo", dir)
		}
	})
	if isMounted(t, dir) {
		t.Errorf("bpffs %s still mounted after the test", dir)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists after the test (stat: %v)", dir, err)
	}
}

// nsInode returns the inode of a netns file, as readlink shows it.
func nsInode(t *testing.T, path string) string {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("net:[%d]", st.Ino)
}

// testNetNS is the network namespace the test process started in, read
// during package initialisation (on the main thread, before any test ran).
// /proc/self/ns/net is the main thread's, which a locked goroutine that
// unshared and exited may have left elsewhere: the Go runtime parks such a
// main thread rather than ending it.
var testNetNS = func() string {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return ""
	}
	return fmt.Sprintf("net:[%d]", st.Ino)
}()

func TestNodeExec(t *testing.T) {
	RequirePrivileged(t)
	hostForward, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	var name, bpffs string
	t.Run("node", func(t *testing.T) {
		node := newNode(t, t.TempDir())
		name, bpffs = node.Name, node.BPFFSDir

		out, err := node.Exec(t, "ip", "-o", "link")
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) != 1 || !strings.Contains(lines[0], ": lo:") {
			t.Errorf("ip -o link in node shows more than lo:\n%s", out)
		}

		out, err = node.Exec(t, "readlink", "/proc/self/ns/net")
		if err != nil {
			t.Fatal(err)
		}
		want := nsInode(t, node.NS.Path())
		if got := strings.TrimSpace(out); got != want {
			t.Errorf("command ran in netns %s, node is %s", got, want)
		}
		if want == testNetNS {
			t.Errorf("node netns is the test's own netns")
		}

		out, err = node.Exec(t, "cat", "/proc/sys/net/ipv4/ip_forward")
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) != "1" {
			t.Errorf("ip_forward in node = %q, want 1", out)
		}

		var st unix.Statfs_t
		if err := unix.Statfs(node.BPFFSDir, &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
			t.Errorf("node BPFFSDir %s is not a bpffs (type %#x, err %v)", node.BPFFSDir, st.Type, err)
		}

		if _, err := node.Exec(t, "false"); err == nil {
			t.Error("Exec of a failing command returned no error")
		}
	})
	after, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	if string(after) != string(hostForward) {
		t.Errorf("host ip_forward changed from %q to %q", hostForward, after)
	}
	assertNetNSGone(t, name)
	if isMounted(t, bpffs) {
		t.Errorf("node bpffs %s still mounted", bpffs)
	}
}

func TestBuildHostLocal(t *testing.T) {
	bin, err := buildBinary("host-local", hostLocalPkg)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(bin) != binDir() {
		t.Errorf("built %s, want it in %s", bin, binDir())
	}
	cmd := exec.Command(bin)
	cmd.Env = []string{"CNI_COMMAND=VERSION"}
	cmd.Stdin = strings.NewReader(`{"cniVersion":"1.1.0"}`)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s VERSION: %v", bin, err)
	}
	if !strings.Contains(string(out), `"supportedVersions"`) {
		t.Errorf("%s VERSION printed %s", bin, out)
	}

	again, err := buildBinary("host-local", hostLocalPkg)
	if err != nil || again != bin {
		t.Errorf("second build gave %q, %v; want cached %q", again, err, bin)
	}
}

// shimPlugin is a main plugin that logs the command and the netns it runs
// in, then hands over to host-local, which reads the same stdin config.
const shimPlugin = `#!/bin/sh
echo "$CNI_COMMAND $CNI_CONTAINERID $(readlink /proc/self/ns/net)" >> %q
exec "$(dirname "$0")/host-local"
`

// TestNodeCNI drives ADD, CHECK, GC, STATUS and DEL through libcni with a
// shim plugin chained to the real host-local, and checks that every plugin
// process ran in the node netns.
func TestNodeCNI(t *testing.T) {
	RequirePrivileged(t)
	hostLocal, err := buildBinary("host-local", hostLocalPkg)
	if err != nil {
		t.Fatal(err)
	}
	cniPath := t.TempDir()
	if err := os.Symlink(hostLocal, filepath.Join(cniPath, "host-local")); err != nil {
		t.Fatal(err)
	}
	logFile := filepath.Join(t.TempDir(), "calls.log")
	if err := os.WriteFile(filepath.Join(cniPath, "shim"), fmt.Appendf(nil, shimPlugin, logFile), 0o755); err != nil {
		t.Fatal(err)
	}

	node := newNode(t, cniPath)
	dataDir := filepath.Join(node.StateDir, "ipam")
	conflist := fmt.Appendf(nil, `{
		"cniVersion": "1.1.0",
		"name": "shimnet",
		"plugins": [{
			"type": "shim",
			"ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": "10.78.0.0/24"}]]}
		}]
	}`, dataDir)
	ipFile := func(ip string) string { return filepath.Join(dataDir, "shimnet", ip) }
	ctx := context.Background()

	podA, podB := node.Pod(t, "pa"), node.Pod(t, "pb")
	add := func(id string, pod *Pod) string {
		t.Helper()
		res, err := node.Add(ctx, conflist, id, pod.Path, "eth0", [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAME", id}})
		if err != nil {
			t.Fatalf("Add %s: %v", id, err)
		}
		r, err := current.NewResultFromResult(res)
		if err != nil {
			t.Fatal(err)
		}
		if len(r.IPs) != 1 {
			t.Fatalf("Add %s: result IPs %v, want one", id, r.IPs)
		}
		return r.IPs[0].Address.IP.String()
	}
	ipA, ipB := add("ctr-a", podA), add("ctr-b", podB)
	for _, ip := range []string{ipA, ipB} {
		if _, err := os.Stat(ipFile(ip)); err != nil {
			t.Errorf("host-local has no record of %s: %v", ip, err)
		}
	}

	if err := node.Check(ctx, conflist, "ctr-a", podA.Path, "eth0", nil); err != nil {
		t.Errorf("Check: %v", err)
	}
	if err := node.Status(ctx, conflist); err != nil {
		t.Errorf("Status: %v", err)
	}
	// GC keeps ctr-a and deletes the stale ctr-b attachment.
	if err := node.GC(ctx, conflist, []types.GCAttachment{{ContainerID: "ctr-a", IfName: "eth0"}}); err != nil {
		t.Errorf("GC: %v", err)
	}
	if _, err := os.Stat(ipFile(ipB)); !os.IsNotExist(err) {
		t.Errorf("GC left the IPAM record of ctr-b (%s): %v", ipB, err)
	}
	if _, err := os.Stat(ipFile(ipA)); err != nil {
		t.Errorf("GC removed the IPAM record of valid ctr-a (%s): %v", ipA, err)
	}
	if err := node.Del(ctx, conflist, "ctr-a", podA.Path, "eth0", nil); err != nil {
		t.Errorf("Del: %v", err)
	}
	if _, err := os.Stat(ipFile(ipA)); !os.IsNotExist(err) {
		t.Errorf("Del left the IPAM record of ctr-a (%s): %v", ipA, err)
	}

	// A failing plugin surfaces as a CNI error.
	bad := []byte(`{"cniVersion":"1.1.0","name":"shimnet","plugins":[{"type":"missing"}]}`)
	if _, err := node.Add(ctx, bad, "ctr-c", podA.Path, "eth0", nil); err == nil {
		t.Error("Add with a missing plugin succeeded")
	}

	log, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	nodeNS := nsInode(t, node.NS.Path())
	var cmds []string
	for _, line := range strings.Split(strings.TrimSpace(string(log)), "\n") {
		f := strings.Fields(line)
		if f[len(f)-1] != nodeNS {
			t.Errorf("plugin call %q did not run in node netns %s", line, nodeNS)
		}
		cmds = append(cmds, strings.Join(f[:len(f)-1], " "))
	}
	want := []string{"ADD ctr-a", "ADD ctr-b", "CHECK ctr-a", "STATUS", "DEL ctr-b", "GC", "DEL ctr-a"}
	if !slices.Equal(cmds, want) {
		t.Errorf("plugin calls %q, want %q", cmds, want)
	}
}

func TestBuildPluginsFromEnv(t *testing.T) {
	dir := t.TempDir()
	for _, p := range plugins {
		if err := os.WriteFile(filepath.Join(dir, p.name), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("TERN_CNI_PATH", dir)
	if got := BuildPlugins(t); got != dir {
		t.Errorf("BuildPlugins = %s, want TERN_CNI_PATH %s", got, dir)
	}
}
