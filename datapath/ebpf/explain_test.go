package ebpf

import (
	"encoding/binary"
	"net"
	"path/filepath"
	"slices"
	"testing"

	cilium "github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/loader"
)

// TestDryRunLiveMapsReadOnly: no program of either object passes a map a
// dry run shares with the node (DryRunLiveMaps) to a helper that writes
// it. (The maps are read through bpf_map_lookup_elem and copied; a store
// through a looked-up pointer would not show here: the C keeps to copies,
// see policy_check.)
func TestDryRunLiveMapsReadOnly(t *testing.T) {
	specs, err := ternbpf.LoadSpecs()
	if err != nil {
		t.Fatal(err)
	}
	writers := map[asm.BuiltinFunc]bool{asm.FnMapUpdateElem: true, asm.FnMapDeleteElem: true}
	for _, spec := range specs {
		for name, p := range spec.Programs {
			r1 := "" // the map last loaded into R1, the helpers' map argument
			for _, ins := range p.Instructions {
				if ins.IsLoadFromMap() || (ins.OpCode.IsDWordLoad() && ins.Reference() != "") {
					if ins.Dst == asm.R1 {
						r1 = ins.Reference()
					}
					continue
				}
				if ins.IsBuiltinCall() && writers[asm.BuiltinFunc(ins.Constant)] && slices.Contains(DryRunLiveMaps, r1) {
					t.Errorf("program %s writes %s, which dry runs share with the node", name, r1)
				}
				if ins.Dst == asm.R1 && !ins.IsBuiltinCall() {
					r1 = ""
				}
			}
		}
	}
}

// synFrame is a TCP SYN from a to b (sport 45678, dport 80) in an Ethernet
// frame from srcMAC.
func synFrame(srcMAC, dstMAC net.HardwareAddr, a, b net.IP) []byte {
	f := append(append(append([]byte{}, dstMAC...), srcMAC...), 0x08, 0x00)
	ip := []byte{0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0}
	ip = append(append(ip, a.To4()...), b.To4()...)
	tcp := make([]byte, 20)
	binary.BigEndian.PutUint16(tcp[0:], 45678)
	binary.BigEndian.PutUint16(tcp[2:], 80)
	tcp[12], tcp[13] = 5<<4, 0x02
	return append(append(f, ip...), tcp...)
}

// pinnedEntries counts a pinned map's entries.
func pinnedEntries(t *testing.T, bpffs, name string) int {
	t.Helper()
	m, err := cilium.LoadPinnedMap(filepath.Join(bpffs, "maps", name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var k, v []byte
	c := 0
	it := m.Iterate()
	for it.Next(&k, &v) {
		c++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestDryRunLeavesNoTrace: a dry run of a flow that the node's programs
// would track (the destination has policy state) reports the redirect and
// its trace, and leaves the node's conntrack, counters and events as they
// were; the same packet through the node's own program does track the flow
// (so the check can see a side effect when there is one).
func TestDryRunLeavesNoTrace(t *testing.T) {
	n := newNode(t, loader.ModeTCX)
	a := n.endpoint(t, "10.244.7.2/24")
	n.add(t, a)
	b := n.endpoint(t, "10.244.7.3/24")
	n.add(t, b)
	epPolicy, err := cilium.LoadPinnedMap(filepath.Join(n.bpffs, "maps", ternbpf.TernMapTernEpPolicy), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer epPolicy.Close()
	key, _ := EndpointKey(b.IP.IP)
	if err := epPolicy.Put(key, ternbpf.TernEpPolicy{LocalId: 2}); err != nil { // policy state, not isolated
		t.Fatal(err)
	}
	frame := synFrame(a.PodMAC, a.HostMAC, a.IP.IP, b.IP.IP)

	var run *DryRun
	n.do(t, func() error {
		var err error
		run, err = DryRunProgram(n.bpffs, ternbpf.TernProgTernFromPod, a.HostIfindex, frame)
		return err
	})
	if run.Action != "redirect" || !slices.Equal(run.Metrics, []string{"redirect_peer"}) {
		t.Errorf("dry run: %s, counted %v; want redirect, [redirect_peer]", run.Action, run.Metrics)
	}
	if len(run.Events) != 1 || run.Events[0].Kind != "trace" || run.Events[0].Reason != "redirect_peer" || run.Events[0].Dst.String() != "10.244.7.3" {
		t.Errorf("dry run events %+v, want one redirect_peer trace to 10.244.7.3", run.Events)
	}
	if c := pinnedEntries(t, n.bpffs, ternbpf.TernMapTernPolicyCt); c != 0 {
		t.Errorf("the node's policy conntrack has %d entries after a dry run", c)
	}
	metrics, err := cilium.LoadPinnedMap(filepath.Join(n.bpffs, "maps", ternbpf.TernMapTernMetrics), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer metrics.Close()
	counts, err := ReadMetrics(metrics)
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range counts {
		if v.Packets != 0 {
			t.Errorf("the node's counter %s moved by %d in a dry run", name, v.Packets)
		}
	}

	// The node's own program, on the same packet, tracks the flow.
	prog, err := cilium.LoadPinnedProgram(filepath.Join(n.bpffs, "progs", ternbpf.ObjectVersion(), ternbpf.TernProgTernFromPod), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	n.do(t, func() error {
		_, err := prog.Run(&cilium.RunOptions{Data: frame, Context: skbContext{Ifindex: uint32(a.HostIfindex)}})
		return err
	})
	if c := pinnedEntries(t, n.bpffs, ternbpf.TernMapTernPolicyCt); c != 1 {
		t.Errorf("the node's program left %d policy conntrack entries, want 1", c)
	}
}
