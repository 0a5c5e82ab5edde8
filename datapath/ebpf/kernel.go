package ebpf

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	cilium "github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"
)

// MinKernel is the oldest kernel the eBPF datapath runs on: 6.3, the first
// with BPF_FIB_LOOKUP_SKIP_NEIGH. On older kernels bpf_fib_lookup rejects
// that flag at run time (not at load), so every masqueraded packet would
// fail its route lookup. Everything else the programs use is older
// (bpf_redirect_peer 5.10, bpf_redirect_neigh 5.10, bpf_timer 5.15,
// bpf_for_each_map_elem 5.13, BPF atomics 5.12); TCX (6.6) is optional,
// the loader falls back to clsact.
var MinKernel = [2]int{6, 3}

// kernelRelease parses the major and minor version out of a release
// string as uname(2) gives it ("6.18.44-cloud-amd64").
func kernelRelease(release string) (major, minor int, err error) {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return 0, 0, fmt.Errorf("kernel release %q: no major.minor", release)
	}
	major, err = strconv.Atoi(parts[0])
	if err != nil {
		return 0, 0, fmt.Errorf("kernel release %q: %w", release, err)
	}
	// The minor number may run straight into a suffix ("6.3-rc1").
	m := parts[1]
	if i := strings.IndexFunc(m, func(r rune) bool { return r < '0' || r > '9' }); i >= 0 {
		m = m[:i]
	}
	minor, err = strconv.Atoi(m)
	if err != nil {
		return 0, 0, fmt.Errorf("kernel release %q: %w", release, err)
	}
	return major, minor, nil
}

// checkKernelRelease refuses releases older than MinKernel.
func checkKernelRelease(release string) error {
	major, minor, err := kernelRelease(release)
	if err != nil {
		return err
	}
	if major < MinKernel[0] || (major == MinKernel[0] && minor < MinKernel[1]) {
		return fmt.Errorf("kernel %s is older than %d.%d, the minimum of the eBPF datapath "+
			"(bpf_fib_lookup with BPF_FIB_LOOKUP_SKIP_NEIGH); use \"datapath\": \"iptables\" on this node",
			release, MinKernel[0], MinKernel[1])
	}
	return nil
}

// errFIBFlagRejected: the kernel's bpf_fib_lookup refused the flags the
// programs use.
var errFIBFlagRejected = errors.New("bpf_fib_lookup rejects BPF_FIB_LOOKUP_SKIP_NEIGH")

// probeFIBSkipNeigh runs bpf_fib_lookup with BPF_FIB_LOOKUP_SKIP_NEIGH
// once, as the programs call it, and fails if this kernel rejects the
// flag: the verifier accepts any flags, only the call tells (a backport or
// a distribution kernel may differ from what its version says).
func probeFIBSkipNeigh() error {
	const (
		fibLookupSize  = 64 // sizeof(struct bpf_fib_lookup)
		fibSkipNeigh   = 1 << 2
		afInet         = 2
		ifindexOffset  = 8
		familyOffset   = 0
		fibLookupStart = -fibLookupSize
	)
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1), asm.Mov.Imm(asm.R1, 0)}
	for off := int16(fibLookupStart); off < 0; off += 8 {
		insns = append(insns, asm.StoreMem(asm.RFP, off, asm.R1, asm.DWord))
	}
	insns = append(insns,
		asm.Mov.Imm(asm.R1, afInet),
		asm.StoreMem(asm.RFP, fibLookupStart+familyOffset, asm.R1, asm.Byte),
		asm.Mov.Imm(asm.R1, 1), // lo: always there
		asm.StoreMem(asm.RFP, fibLookupStart+ifindexOffset, asm.R1, asm.Word),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, fibLookupStart),
		asm.Mov.Imm(asm.R3, fibLookupSize),
		asm.Mov.Imm(asm.R4, fibSkipNeigh),
		asm.FnFibLookup.Call(),
		asm.Return(),
	)
	prog, err := cilium.NewProgram(&cilium.ProgramSpec{
		Name:         "tern_probe_fib",
		Type:         cilium.SchedCLS,
		License:      "GPL",
		Instructions: insns,
	})
	if err != nil {
		return fmt.Errorf("probe bpf_fib_lookup: %w", err)
	}
	defer prog.Close()
	ret, _, err := prog.Test(make([]byte, 14))
	if err != nil {
		return fmt.Errorf("probe bpf_fib_lookup: %w", err)
	}
	if int32(ret) == -int32(unix.EINVAL) {
		return errFIBFlagRejected
	}
	return nil
}

// checkKernel refuses to load the programs on a kernel that cannot run
// them as they must run: older than MinKernel, or rejecting the
// bpf_fib_lookup flags at run time.
func checkKernel() error {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return fmt.Errorf("uname: %w", err)
	}
	if err := checkKernelRelease(unix.ByteSliceToString(u.Release[:])); err != nil {
		return err
	}
	if err := probeFIBSkipNeigh(); err != nil {
		return fmt.Errorf("this kernel cannot run the eBPF datapath: %w", err)
	}
	return nil
}
