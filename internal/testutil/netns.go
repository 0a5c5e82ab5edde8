package testutil

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NetNSRunDir is where named network namespaces are bind-mounted, the
// directory `ip netns` lists.
const NetNSRunDir = "/run/netns"

// maxNameLen is the longest interface name the kernel accepts (IFNAMSIZ-1).
const maxNameLen = 15

// suffixLen is the number of random base36 characters UniqueName appends:
// 36^7 ≈ 7.8e10 values, so names from parallel test processes do not collide.
const suffixLen = 7

// defaultExecTimeout bounds commands run by ExecIn and Node.Exec.
const defaultExecTimeout = 30 * time.Second

var (
	namesMu sync.Mutex
	names   = map[string]bool{}
)

// UniqueName returns prefix followed by random base36 characters, at most 15
// characters in all, so the result is valid as a link name as well as a
// netns name. The prefix is cut to 8 characters when longer. Names are unique
// within the process and random across processes.
func UniqueName(prefix string) string {
	if room := maxNameLen - suffixLen; len(prefix) > room {
		prefix = prefix[:room]
	}
	namesMu.Lock()
	defer namesMu.Unlock()
	for {
		name := prefix + randomBase36(suffixLen)
		if !names[name] {
			names[name] = true
			return name
		}
	}
}

func randomBase36(n int) string {
	limit := big.NewInt(36)
	var b strings.Builder
	for range n {
		d, err := rand.Int(rand.Reader, limit)
		if err != nil {
			panic(fmt.Sprintf("testutil: read random: %v", err))
		}
		b.WriteByte("0123456789abcdefghijklmnopqrstuvwxyz"[d.Int64()])
	}
	return b.String()
}

// NewNetNS creates a named network namespace, bind-mounted at
// /run/netns/<UniqueName(prefix)> the way `ip netns add` does it, so that
// `ip netns list` shows it. The loopback link inside is up. A cleanup closes
// the handle, unmounts and removes the mount point, also when the test fails.
func NewNetNS(t testing.TB, prefix string) ns.NetNS {
	t.Helper()
	RequirePrivileged(t)

	if err := ensureNetNSRunDir(); err != nil {
		t.Fatalf("prepare %s: %v", NetNSRunDir, err)
	}

	var (
		name string
		path string
	)
	for attempt := 0; ; attempt++ {
		name = UniqueName(prefix)
		path = filepath.Join(NetNSRunDir, name)
		f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
		if err == nil {
			f.Close()
			break
		}
		if !errors.Is(err, os.ErrExist) || attempt >= 5 {
			t.Fatalf("create netns mount point: %v", err)
		}
	}

	if err := mountNewNetNS(path); err != nil {
		os.Remove(path)
		t.Fatalf("create netns %s: %v", name, err)
	}

	nsobj, err := ns.GetNS(path)
	if err != nil {
		if uerr := removeNetNSMount(path); uerr != nil {
			t.Errorf("remove netns %s: %v", name, uerr)
		}
		t.Fatalf("open netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := nsobj.Close(); err != nil {
			t.Errorf("close netns %s: %v", name, err)
		}
		if err := removeNetNSMount(path); err != nil {
			t.Errorf("remove netns %s: %v", name, err)
		}
	})

	err = nsobj.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("find lo: %w", err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("set lo up: %w", err)
		}
		// A new namespace inherits IPv4 settings from the host's (see
		// net.core.devconf_inherit_init_net): start from a known state,
		// not from whatever the machine's ip_forward is. Namespaces
		// that route (Tern's datapaths, routers in tests) turn it on.
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("0"), 0o644); err != nil {
			return fmt.Errorf("ip_forward off: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("netns %s: %v", name, err)
	}
	return nsobj
}

// NSName returns the name of a namespace created by NewNetNS (the base name
// of its path).
func NSName(n ns.NetNS) string {
	return filepath.Base(n.Path())
}

// mountNewNetNS creates a network namespace and bind-mounts it on path. The
// unshare happens on a locked thread that is never unlocked, so the Go
// runtime discards the thread instead of reusing it in the wrong namespace.
func mountNewNetNS(path string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread ends with this goroutine.
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		src := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind mount %s on %s: %w", src, path, err)
			return
		}
		errc <- nil
	}()
	return <-errc
}

// removeNetNSMount undoes mountNewNetNS, like `ip netns del`.
func removeNetNSMount(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

var (
	runDirOnce sync.Once
	runDirErr  error
)

// ensureNetNSRunDir makes /run/netns a shared mount point, as `ip netns add`
// does, so namespace mounts propagate to other mount namespaces. A lock on
// the directory keeps parallel test processes from stacking bind mounts.
func ensureNetNSRunDir() error {
	runDirOnce.Do(func() { runDirErr = prepareNetNSRunDir() })
	return runDirErr
}

func prepareNetNSRunDir() error {
	if err := os.MkdirAll(NetNSRunDir, 0o755); err != nil {
		return err
	}
	dir, err := os.Open(NetNSRunDir)
	if err != nil {
		return err
	}
	defer dir.Close()
	if err := unix.Flock(int(dir.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("lock: %w", err)
	}
	defer unix.Flock(int(dir.Fd()), unix.LOCK_UN)

	err = unix.Mount("", NetNSRunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("make shared: %w", err)
	}
	// Not a mount point yet: bind it on itself, then share it.
	if err := unix.Mount(NetNSRunDir, NetNSRunDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind on itself: %w", err)
	}
	if err := unix.Mount("", NetNSRunDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make shared: %w", err)
	}
	return nil
}

// ExecIn runs a command with its process inside the network namespace n and
// returns its standard output. The error carries the standard error text.
// The command is killed after 30 s.
func ExecIn(n ns.NetNS, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), defaultExecTimeout)
	defer cancel()
	return execIn(ctx, n, name, args...)
}

// execIn starts the command from the thread ns.Do has locked in n: the child
// process inherits the netns of the thread that forks it.
func execIn(ctx context.Context, n ns.NetNS, name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	err := n.Do(func(ns.NetNS) error {
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Stdout = &stdout
		cmd.Stderr = &stderr
		return cmd.Run()
	})
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = strings.TrimSpace(stdout.String())
		}
		return stdout.String(), fmt.Errorf("%s %s in netns %s: %w: %s",
			name, strings.Join(args, " "), NSName(n), err, msg)
	}
	return stdout.String(), nil
}
