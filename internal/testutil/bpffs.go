package testutil

import (
	"testing"

	"golang.org/x/sys/unix"
)

// MountBPFFS mounts a fresh bpffs on a new directory under t.TempDir() and
// returns the directory. Pins made there vanish with the mount, which the
// cleanup detaches before the temporary directory is removed.
//
// Use it instead of /sys/fs/bpf: `ip netns exec` remounts /sys, so pins under
// /sys/fs/bpf are not reliably visible to tests.
func MountBPFFS(t testing.TB) string {
	t.Helper()
	RequirePrivileged(t)

	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs on %s: %v", dir, err)
	}
	// Registered after TempDir, so it runs before the directory is removed.
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return dir
}
