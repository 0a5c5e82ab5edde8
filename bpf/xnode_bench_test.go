package bpf

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"runtime"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// BenchmarkXNodePath: the programs one packet of an established UDP flow
// meets on the cross-node path with native routing (ternbench's
// ebpf-native), kernel-timed with BPF_PROG_TEST_RUN in the multi-node
// tests' namespace (remoteWorld): "from-pod" is pod a's packet to a pod of
// another node (anti-spoofing, policy conntrack, tern_stack_ct, FIB lookup,
// bpf_redirect_neigh), "to-uplink" the same packet leaving by the uplink,
// "from-uplink" that pod's answer arriving for a (tern_stack_ct, policy
// conntrack, bpf_redirect_peer). No NetworkPolicy selects the pods (as in
// ternbench). One run per call: the redirects rewrite the frame (TTL,
// MACs). Reported: the mean and the median of the kernel's per-run times.
// "empty" is a program that only returns TC_ACT_UNSPEC: the floor of the
// method (the clock reads and the run's own setup), to subtract.
//
//	go test -run XXX -bench BenchmarkXNodePath ./bpf/
func BenchmarkXNodePath(b *testing.B) {
	w := newRemoteWorld(b)
	w.reset(b)
	w.setRemote(b, false)
	// No Service frontend, as on ternbench's nodes (kube-proxy mode):
	// the node's set-up marks tern_lb_empty (datapath/ebpf syncLBEmpty).
	// By name: the same file benchmarks objects without the flag.
	if m, ok := w.maps["tern_lb_empty"]; ok {
		if err := m.Put(uint32(0), uint32(1)); err != nil {
			b.Fatal(err)
		}
	}
	out := natPkt{srcMAC: w.a.mac, dstMAC: w.a.hostMAC, src: w.a.ip, dst: natOtherPod,
		proto: unix.IPPROTO_UDP, sport: 40000, dport: 11111, payload: make([]byte, 14)}.frame()
	left := natPkt{srcMAC: w.uplinkMAC, dstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, src: w.a.ip, dst: natOtherPod,
		ttl: 63, proto: unix.IPPROTO_UDP, sport: 40000, dport: 11111, payload: make([]byte, 14)}.frame()
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	in := natPkt{srcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, dstMAC: w.uplinkMAC, src: natOtherPod, dst: w.a.ip,
		proto: unix.IPPROTO_UDP, sport: 11111, dport: 40000, payload: make([]byte, 14)}.frame()
	for _, c := range []struct {
		name    string
		prog    *ebpf.Program
		ifindex int
		frame   []byte
		verdict uint32
	}{
		{"empty", empty, w.uplink, in, natActOK},
		{"from-pod", w.fromPod, w.a.ifindex, out, natActRedirect},
		{"to-uplink", w.toUplink, w.uplink, left, natActOK},
		{"from-uplink", w.fromUplink, w.uplink, in, natActRedirect},
	} {
		b.Run(c.name, func(b *testing.B) {
			frame := func(int) []byte { return c.frame }
			// The first packet opens the flow's conntrack entry.
			err := w.ns.Do(func(ns.NetNS) error { return benchRuns(b, c.prog, c.ifindex, frame, c.verdict) })
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// benchRuns runs prog once on frame(-1) (a flow's first packet, which
// opens its entries), then b.N times on frame(run), each a single timed
// BPF_PROG_TEST_RUN that must give verdict, and reports the mean and the
// median of the kernel's per-run times. Call it inside the namespace of
// prog's interfaces.
func benchRuns(b *testing.B, prog *ebpf.Program, ifindex int, frame func(run int) []byte, verdict uint32) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if _, _, err := timedRun(prog, ifindex, frame(-1)); err != nil {
		return err
	}
	times := make([]time.Duration, 0, b.N)
	for run := range b.N {
		v, d, err := timedRun(prog, ifindex, frame(run))
		if err != nil {
			return err
		}
		if v != verdict {
			return fmt.Errorf("verdict %#x, want %#x", v, verdict)
		}
		times = append(times, d)
	}
	var total time.Duration
	for _, d := range times {
		total += d
	}
	slices.Sort(times)
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N), "ns/pkt")
	b.ReportMetric(float64(times[len(times)/2].Nanoseconds()), "p50-ns/pkt")
	return nil
}

// timedRun is one BPF_PROG_TEST_RUN of prog on frame as received on
// ifindex, with the kernel's run time: ebpf.Program.Benchmark cannot pass
// the context (the interface), ebpf.Program.Run does not return the time.
func timedRun(prog *ebpf.Program, ifindex int, frame []byte) (uint32, time.Duration, error) {
	var ctx bytes.Buffer
	if err := binary.Write(&ctx, binary.NativeEndian, natSkb{Ifindex: uint32(ifindex)}); err != nil {
		return 0, 0, err
	}
	ctxIn := ctx.Bytes()
	data := make([]byte, len(frame)+256)
	ctxOut := make([]byte, 512)
	// union bpf_attr, the test member (include/uapi/linux/bpf.h).
	attr := struct {
		progFD, retval, dataSizeIn, dataSizeOut uint32
		dataIn, dataOut                         uint64
		repeat, duration, ctxSizeIn, ctxSizeOut uint32
		ctxIn, ctxOut                           uint64
		flags, cpu, batchSize, _                uint32
	}{
		progFD:      uint32(prog.FD()),
		dataSizeIn:  uint32(len(frame)),
		dataSizeOut: uint32(len(data)),
		dataIn:      uint64(uintptr(unsafe.Pointer(&frame[0]))),
		dataOut:     uint64(uintptr(unsafe.Pointer(&data[0]))),
		repeat:      1,
		ctxSizeIn:   uint32(len(ctxIn)),
		ctxSizeOut:  uint32(len(ctxOut)),
		ctxIn:       uint64(uintptr(unsafe.Pointer(&ctxIn[0]))),
		ctxOut:      uint64(uintptr(unsafe.Pointer(&ctxOut[0]))),
	}
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_TEST_RUN, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(frame)
	runtime.KeepAlive(data)
	runtime.KeepAlive(ctxIn)
	runtime.KeepAlive(ctxOut)
	if errno != 0 {
		return 0, 0, fmt.Errorf("BPF_PROG_TEST_RUN: %w", errno)
	}
	return attr.retval, time.Duration(attr.duration), nil
}
