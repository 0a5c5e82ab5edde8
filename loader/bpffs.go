// Package loader loads Tern's BPF objects once per node, pins their maps and
// programs under the node's bpffs directory, and attaches the programs to
// interfaces so they keep running after the short-lived CNI process exits.
package loader

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// EnsureBPFFS makes dir a directory on a bpffs. When dir is not already on
// one, a new bpffs is mounted on it, as Cilium does for /sys/fs/bpf: on
// machines that do not mount one at boot, pins elsewhere would fail.
func EnsureBPFFS(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create bpffs dir %s: %w", dir, err)
	}
	onBPFFS, err := IsBPFFS(dir)
	if err != nil {
		return err
	}
	if onBPFFS {
		return nil
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs on %s: %w", dir, err)
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
