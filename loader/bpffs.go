// Package loader loads Tern's BPF objects once per node, pins their maps and
// programs under the node's bpffs directory, and attaches the programs to
// interfaces so they keep running after the short-lived CNI process exits.
package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// EnsureBPFFS makes dir a directory on a bpffs, mounting one when dir is not
// on one yet, as Cilium's agent does for /sys/fs/bpf on machines that do not
// mount it at boot.
//
// Where: on dir itself when dir exists or can be created; otherwise on its
// nearest existing ancestor, if that is an empty directory. The default
// /sys/fs/bpf/tern is the second case: sysfs refuses mkdir, so the bpffs goes
// on the empty /sys/fs/bpf, where other eBPF tools look for it.
//
// In which mount namespace: the node's (that of PID 1), whose mounts outlive
// this process. A plugin started in a private mount namespace (`ip netns
// exec` unshares one and mounts a fresh sysfs on /sys) would otherwise pin
// into a bpffs that vanishes when it exits, and take the pods' TCX links with
// it. There the bpffs is made sure of in the node's namespace and a clone of
// that mount is moved onto the same path in this one, so both see the same
// pins.
func EnsureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("bpffs dir %s is not an absolute path", dir)
	}
	if ok, _ := IsBPFFS(dir); ok {
		return nil
	}
	private, err := inPrivateMountNS()
	if err != nil {
		return err
	}
	if private {
		if err := borrowNodeBPFFS(dir); err != nil {
			return err
		}
	} else if err := ensureLocalBPFFS(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create bpffs dir %s: %w", dir, err)
	}
	ok, err := IsBPFFS(dir)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("bpffs dir %s: not on a bpffs after mounting one", dir)
	}
	return nil
}

// IsBPFFS reports whether path lives on a bpffs.
func IsBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", path, err)
	}
	return uint32(st.Type) == unix.BPF_FS_MAGIC, nil
}

// ensureLocalBPFFS puts dir on a bpffs in the calling thread's mount
// namespace, mounting one on mountTarget(dir) when needed. A lock on the
// mount point serialises concurrent plugins, so they never stack two bpffs
// instances (the second would hide the first one's pins).
func ensureLocalBPFFS(dir string) error {
	target, err := mountTarget(dir)
	if err != nil || target == "" {
		return err
	}
	f, err := os.Open(target)
	if err != nil {
		return fmt.Errorf("open bpffs mount point %s: %w", target, err)
	}
	defer f.Close()
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("lock bpffs mount point %s: %w", target, err)
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN)
	if ok, err := IsBPFFS(target); err != nil || ok {
		return err // mounted meanwhile by another plugin
	}
	if err := unix.Mount("bpf", target, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", target, err)
	}
	return nil
}

// mountTarget returns where to mount a bpffs so that dir can live on it, or
// "" when dir's nearest existing ancestor is on a bpffs already (then dir is
// only a mkdir away).
func mountTarget(dir string) (string, error) {
	anc := dir
	for {
		if _, err := os.Stat(anc); err == nil {
			break
		} else if !errors.Is(err, os.ErrNotExist) {
			return "", fmt.Errorf("bpffs dir %s: %w", dir, err)
		}
		parent := filepath.Dir(anc)
		if parent == anc {
			break
		}
		anc = parent
	}
	ok, err := IsBPFFS(anc)
	if err != nil {
		return "", err
	}
	if ok {
		return "", nil
	}
	if anc == dir {
		return dir, nil
	}
	mkErr := os.MkdirAll(dir, 0o700)
	if mkErr == nil {
		return dir, nil
	}
	// dir cannot be created where it is (sysfs, a read-only filesystem):
	// mount on the ancestor, but never over content the mount would hide.
	entries, err := os.ReadDir(anc)
	if err != nil {
		return "", fmt.Errorf("create bpffs dir %s: %w (and read %s: %v)", dir, mkErr, anc, err)
	}
	if len(entries) > 0 {
		return "", fmt.Errorf("create bpffs dir %s: %w; %s is not empty, so no bpffs is mounted over it: mount one on %s or choose another bpffsDir", dir, mkErr, anc, anc)
	}
	return anc, nil
}

// nodeMountNS is the mount namespace whose mounts the node's processes share.
var nodeMountNS = "/proc/1/ns/mnt"

// inPrivateMountNS reports whether this process runs in a mount namespace
// other than the node's. When the node's cannot be inspected (PID 1 belongs
// to another user, or a PID namespace hides it) this one is taken for the
// node's: there is no other to mount in.
func inPrivateMountNS() (bool, error) {
	var node, self unix.Stat_t
	if err := unix.Stat(nodeMountNS, &node); err != nil {
		return false, nil
	}
	if err := unix.Stat("/proc/self/ns/mnt", &self); err != nil {
		return false, fmt.Errorf("stat own mount namespace: %w", err)
	}
	return node.Dev != self.Dev || node.Ino != self.Ino, nil
}

// borrowNodeBPFFS makes dir live on the node's bpffs while this process runs
// in a private mount namespace: on a dedicated OS thread, it enters the
// node's mount namespace, makes sure of the bpffs there, clones the mount
// tree at the mount target, returns to this namespace and moves the clone
// onto the same path. The thread is never given back to the Go runtime
// (unshare(CLONE_FS), needed for setns into a mount namespace, makes it
// unfit for other goroutines), so it exits with the goroutine.
func borrowNodeBPFFS(dir string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- borrowOnLockedThread(dir)
	}()
	return <-errc
}

func borrowOnLockedThread(dir string) error {
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("bpffs: unshare fs: %w", err)
	}
	self, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/mnt", unix.Gettid()))
	if err != nil {
		return fmt.Errorf("bpffs: open own mount namespace: %w", err)
	}
	defer self.Close()
	node, err := os.Open(nodeMountNS)
	if err != nil {
		return fmt.Errorf("bpffs: open node mount namespace: %w", err)
	}
	defer node.Close()
	// Where to attach the clone here: computed in this namespace, where
	// dir may have no existing ancestor the node's view has.
	target, err := mountTarget(dir)
	if err != nil {
		return err
	}
	if target == "" {
		return nil
	}
	if err := unix.Setns(int(node.Fd()), unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("bpffs: enter node mount namespace: %w", err)
	}
	if err := ensureLocalBPFFS(dir); err != nil {
		return fmt.Errorf("in the node's mount namespace: %w", err)
	}
	if err := os.MkdirAll(target, 0o700); err != nil {
		return fmt.Errorf("in the node's mount namespace: create %s: %w", target, err)
	}
	tree, err := unix.OpenTree(unix.AT_FDCWD, target, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC|unix.AT_RECURSIVE)
	if err != nil {
		return fmt.Errorf("bpffs: clone the node's mount at %s: %w", target, err)
	}
	defer unix.Close(tree)
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("bpffs: return to own mount namespace: %w", err)
	}
	if err := unix.MoveMount(tree, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("bpffs: attach the node's bpffs at %s: %w", target, err)
	}
	return nil
}
