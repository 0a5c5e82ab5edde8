package loader

import (
	"fmt"
	"runtime"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// loadPinnedProgram opens the program pinned at path, as
// ebpf.LoadPinnedProgram does but without its once-per-process feature
// probe (whether the kernel takes object names, a BPF_MAP_CREATE preceded
// by a scan of /proc/self/mountinfo for BPF token mounts). Every CNI
// command opens the pinned programs, and that probe was about 0.4 ms of
// an ADD's CPU time (docs/cni-add-profile.md). The probe only decides
// what Program.String prints on kernels older than 4.15, which Tern does
// not run on (TCX needs 6.6). The directory of a version's programs
// holds only the programs the loader pinned there.
func loadPinnedProgram(path string) (*ebpf.Program, error) {
	fd, err := objGet(path)
	if err != nil {
		return nil, err
	}
	p, err := ebpf.NewProgramFromFD(fd) // owns fd, closes it on error
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// objGet is BPF_OBJ_GET: a new fd of the object pinned at path.
func objGet(path string) (int, error) {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return -1, err
	}
	// union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags,
	// path_fd (unused: the path is absolute or relative to the cwd).
	attr := struct {
		pathname  uint64
		bpfFD     uint32
		fileFlags uint32
		pathFD    int32
		_         uint32
	}{pathname: uint64(uintptr(unsafe.Pointer(p)))}
	for {
		fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
		runtime.KeepAlive(p)
		switch errno {
		case 0:
			return int(fd), nil
		case unix.EINTR:
			continue
		}
		return -1, fmt.Errorf("open pin %s: %w", path, errno)
	}
}
