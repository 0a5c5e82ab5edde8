package loader

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// The socket hooks of Tern's load balancer for the node's own processes
// (bpf/sock_lb.c), attached to a cgroup v2 directory with bpf_links pinned
// as links/cgroup@<hook>: like the TCX links, they outlive the process
// that attached them and follow upgrades (upgradeAttachments updates every
// pinned link to the new version's program).
const (
	HookSockConnect4    Hook = "connect4"
	HookSockSendmsg4    Hook = "sendmsg4"
	HookSockRecvmsg4    Hook = "recvmsg4"
	HookSockGetpeername Hook = "getpeername4"
)

// CgroupHooks are the socket hooks, in the order they are attached: the
// reverse translation first, so no answer to a translated socket is
// missed.
var CgroupHooks = []Hook{HookSockRecvmsg4, HookSockGetpeername, HookSockSendmsg4, HookSockConnect4}

// cgroupPinName is the "interface" part of the socket hooks' pins: one
// attachment per node, whatever the cgroup.
const cgroupPinName = "cgroup"

func cgroupHookProgram(h Hook) string {
	switch h {
	case HookSockConnect4:
		return "tern_sock_connect4"
	case HookSockSendmsg4:
		return "tern_sock_sendmsg4"
	case HookSockRecvmsg4:
		return "tern_sock_recvmsg4"
	case HookSockGetpeername:
		return "tern_sock_getpeername4"
	}
	return ""
}

func cgroupAttachType(h Hook) ebpf.AttachType {
	switch h {
	case HookSockConnect4:
		return ebpf.AttachCGroupInet4Connect
	case HookSockSendmsg4:
		return ebpf.AttachCGroupUDP4Sendmsg
	case HookSockRecvmsg4:
		return ebpf.AttachCGroupUDP4Recvmsg
	case HookSockGetpeername:
		return ebpf.AttachCgroupInet4GetPeername
	}
	return ebpf.AttachNone
}

// Cgroup2Root returns the mount point of the cgroup v2 hierarchy, read
// from /proc/self/mountinfo: /sys/fs/cgroup on a unified host,
// /sys/fs/cgroup/unified on a hybrid one. Empty when none is mounted.
func Cgroup2Root() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	defer f.Close()
	return cgroup2RootIn(bufio.NewScanner(f))
}

func cgroup2RootIn(sc *bufio.Scanner) (string, error) {
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source super
		fields := strings.Fields(sc.Text())
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && i >= 5 {
				if fields[i+1] == "cgroup2" && fields[3] == "/" {
					return unescapeMountPath(fields[4]), nil
				}
				break
			}
		}
	}
	return "", sc.Err()
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cgroupID is the id the kernel reports for the cgroup at path (its
// kernfs inode number).
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat cgroup %s: %w", path, err)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("statfs cgroup %s: %w", path, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return 0, fmt.Errorf("%s is not on a cgroup v2 filesystem", path)
	}
	return st.Ino, nil
}

// AttachCgroup attaches the socket hooks to the cgroup v2 directory at
// path, for its processes and all below it. Already attached there: the
// links are kept (and pointed at objs' programs); attached to another
// cgroup: moved. Idempotent; one set per node (the last path wins).
func (l *Loader) AttachCgroup(objs *Objects, path string) error {
	id, err := cgroupID(path)
	if err != nil {
		return err
	}
	return l.Held(func() error {
		if err := l.current(objs); err != nil {
			return err
		}
		for _, hook := range CgroupHooks {
			prog, err := objs.Program(hook.program())
			if err != nil {
				return err
			}
			if err := l.attachCgroupHook(prog, path, id, hook); err != nil {
				return err
			}
		}
		return nil
	})
}

func (l *Loader) attachCgroupHook(prog *ebpf.Program, path string, id uint64, hook Hook) error {
	pin := l.linkPin(cgroupPinName, hook)
	if lk, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := lk.Info()
		if ierr == nil {
			if cg := info.Cgroup(); cg != nil && cg.CgroupId == id && ebpf.AttachType(cg.AttachType) == cgroupAttachType(hook) {
				err := updateIfOther(lk, info.Program, prog)
				lk.Close()
				if err != nil {
					return fmt.Errorf("update %s link %s: %w", hook, pin, err)
				}
				return nil
			}
		}
		_ = lk.Detach() // elsewhere (the path changed), or severed
		lk.Close()
	}
	if err := os.Remove(pin); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("remove stale link pin %s: %w", pin, err)
	}
	if err := os.MkdirAll(filepath.Join(l.BPFFSDir, linksDir), 0o700); err != nil {
		return fmt.Errorf("create link pin dir: %w", err)
	}
	lk, err := link.AttachCgroup(link.CgroupOptions{Path: path, Attach: cgroupAttachType(hook), Program: prog})
	if err != nil {
		return fmt.Errorf("attach %s to cgroup %s: %w", hook, path, err)
	}
	defer lk.Close()
	if err := lk.Pin(pin); err != nil {
		_ = lk.Detach()
		return fmt.Errorf("pin cgroup link %s: %w", pin, err)
	}
	return nil
}

// updateIfOther points lk at prog unless it runs prog already.
func updateIfOther(lk link.Link, cur ebpf.ProgramID, prog *ebpf.Program) error {
	if id, err := ProgramID(prog); err == nil && id == cur {
		return nil
	}
	return lk.Update(prog)
}

// DetachCgroup detaches the socket hooks, wherever they are attached.
// Nothing attached is fine.
func (l *Loader) DetachCgroup() error {
	var errs []error
	for _, hook := range CgroupHooks {
		if err := l.Detach(cgroupPinName, hook); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// CgroupAttached reports whether every socket hook has its link pin.
func (l *Loader) CgroupAttached() bool {
	for _, hook := range CgroupHooks {
		if _, err := os.Stat(l.linkPin(cgroupPinName, hook)); err != nil {
			return false
		}
	}
	return true
}
