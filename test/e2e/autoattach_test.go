package e2e

import (
	"os"
	"path/filepath"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// vethHooks is how a pod's host veth runs Tern's programs, seen from the
// kernel (TCX programs, cls_bpf filters, both directions) and from Tern's
// records (link pins, clsact records).
type vethHooks struct {
	tcx, clsBPF   int
	pins, clsRecs int
	ingressQdisc  bool // the bandwidth plugin's
}

func hooksOf(t *testing.T, n *testutil.Node, veth string) vethHooks {
	t.Helper()
	var h vethHooks
	err := n.NS.Do(func(ns.NetNS) error {
		lk, err := netlink.LinkByName(veth)
		if err != nil {
			return err
		}
		for _, at := range []ebpf.AttachType{ebpf.AttachTCXIngress, ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: lk.Attrs().Index, Attach: at})
			if err != nil {
				return err
			}
			h.tcx += len(res.Programs)
		}
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			filters, err := netlink.FilterList(lk, parent)
			if err != nil {
				continue // no clsact or ingress qdisc
			}
			for _, f := range filters {
				if _, ok := f.(*netlink.BpfFilter); ok {
					h.clsBPF++
				}
			}
		}
		qdiscs, err := netlink.QdiscList(lk)
		if err != nil {
			return err
		}
		for _, q := range qdiscs {
			h.ingressQdisc = h.ingressQdisc || q.Type() == "ingress"
		}
		return nil
	})
	if err != nil {
		t.Fatalf("hooks of %s: %v", veth, err)
	}
	for _, hook := range []string{"ingress", "egress"} {
		if _, err := os.Stat(filepath.Join(n.BPFFSDir, "links", veth+"@"+hook)); err == nil {
			h.pins++
		}
		if _, err := os.Stat(filepath.Join(n.StateDir, "bpf-legacy", veth+"@"+hook)); err == nil {
			h.clsRecs++
		}
	}
	return h
}

// wantKind checks that the pod's veth runs both programs the way auto mode
// chooses for it: TCX for a shaped pod, cls_bpf filters for the others.
func wantKind(t *testing.T, n *testutil.Node, when string, p *chainPod, shaped bool) {
	t.Helper()
	veth := hostVethFor(p.ID, "eth0")
	h := hooksOf(t, n, veth)
	if shaped {
		if h.tcx != 2 || h.clsBPF != 0 || h.pins != 2 || h.clsRecs != 0 || !h.ingressQdisc {
			t.Errorf("%s: shaped pod %s (%s): %+v, want 2 TCX programs and pins, no cls_bpf filter or record, the bandwidth plugin's ingress qdisc", when, p.Name, veth, h)
		}
		return
	}
	if h.tcx != 0 || h.clsBPF != 2 || h.pins != 0 || h.clsRecs != 2 || h.ingressQdisc {
		t.Errorf("%s: unshaped pod %s (%s): %+v, want 2 cls_bpf filters and records, no TCX program or pin", when, p.Name, veth, h)
	}
}

// TestAutoAttachPerPod: with the default tcAttach (auto), Tern then the
// bandwidth plugin: a pod with bandwidth limits runs Tern's programs on TCX
// (its veth gets the bandwidth plugin's ingress qdisc, which excludes
// clsact), every other pod on cls_bpf filters in a clsact qdisc (no RCU
// grace period per attach). The node keeps both kinds apart through
// CHECK, lost pins (the next ADD restores each pod in its own kind), GC and
// DEL (nothing of either kind is left).
func TestAutoAttachPerPod(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	conf := exampleConflist(t, n, "20-tern-bandwidth.conflist", "ebpf", "10.77.215.0/24", map[string]any{"ipMasq": false})
	limits := map[string]any{"bandwidth": map[string]any{
		"ingressRate": bwIngressRate, "ingressBurst": bwBurst,
		"egressRate": bwEgressRate, "egressBurst": bwBurst,
	}}
	shaped := []*chainPod{addChainPod(t, n, conf, "aas", limits), addChainPod(t, n, conf, "aat", limits)}
	plain := []*chainPod{addChainPod(t, n, conf, "aap", nil), addChainPod(t, n, conf, "aaq", nil)}
	for _, p := range shaped {
		wantKind(t, n, "after ADD", p, true)
	}
	for _, p := range plain {
		wantKind(t, n, "after ADD", p, false)
	}
	if err := testutil.Ping(plain[0].NS, shaped[0].IP, 2); err != nil {
		t.Errorf("unshaped to shaped pod: %v", err)
	}
	if err := testutil.Ping(shaped[1].NS, plain[1].IP, 2); err != nil {
		t.Errorf("shaped to unshaped pod: %v", err)
	}

	// Pins lost: the shaped pods' TCX links go with them (their veths run
	// nothing), the unshaped pods' filters keep programs of orphaned maps.
	// The next ADD re-wires each pod in its own kind, on the pinned maps.
	if err := unix.Unmount(n.BPFFSDir, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", n.BPFFSDir, "bpf", 0, ""); err != nil {
		t.Fatal(err)
	}
	waitDetached(t, n, hostVethFor(shaped[0].ID, "eth0"))
	plain = append(plain, addChainPod(t, n, conf, "aar", nil))
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", "tern_metrics"), nil)
	if err != nil {
		t.Fatal(err)
	}
	info, err := m.Info()
	m.Close()
	if err != nil {
		t.Fatal(err)
	}
	pinned, _ := info.ID()
	for i, p := range append(slices.Clone(shaped), plain...) {
		wantKind(t, n, "after the restore", p, i < len(shaped))
		for _, id := range attachedPrograms(t, n, hostVethFor(p.ID, "eth0")) {
			if !slices.Contains(progMaps(t, id), pinned) {
				t.Errorf("%s: program %d does not use the pinned tern_metrics %d", p.Name, id, pinned)
			}
		}
		if err := n.CheckRuntime(t.Context(), conf, p.rc); err != nil {
			t.Errorf("CHECK %s after the restore: %v", p.Name, err)
		}
	}
	if err := testutil.Ping(plain[2].NS, shaped[0].IP, 2); err != nil {
		t.Errorf("new pod to a restored shaped pod: %v", err)
	}

	// GC with one pod of each kind no longer valid.
	gone := []*chainPod{shaped[1], plain[1]}
	var valid []types.GCAttachment
	for _, p := range []*chainPod{shaped[0], plain[0], plain[2]} {
		valid = append(valid, types.GCAttachment{ContainerID: p.ID, IfName: "eth0"})
	}
	if err := n.GC(t.Context(), conf, valid); err != nil {
		t.Fatalf("GC: %v", err)
	}
	for _, p := range gone {
		veth := hostVethFor(p.ID, "eth0")
		if slices.Contains(hostVeths(t, n), veth) {
			t.Errorf("GC left %s's veth %s", p.Name, veth)
		}
	}
	wantRecords(t, n, "after GC", []*chainPod{shaped[0]}, []*chainPod{plain[0], plain[2]})
	wantKind(t, n, "after GC", shaped[0], true)
	wantKind(t, n, "after GC", plain[0], false)

	// DEL of the rest: nothing of either kind remains, in the records or
	// in the kernel.
	ids := podProgramIDs(t, n)
	for _, p := range []*chainPod{shaped[0], plain[0], plain[2]} {
		p.del(t, n, conf)
	}
	wantRecords(t, n, "after DEL", nil, nil)
	if v := hostVeths(t, n); len(v) != 0 {
		t.Errorf("veths left after DEL: %v", v)
	}
	deadline := time.Now().Add(10 * time.Second)
	for podLinks(t, n, ids) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("TCX links of the pod programs still in the kernel 10 s after DEL")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wantRecords checks the node's link pins and clsact records: exactly the
// two hooks of each pod in tcx (pins) and in cls (records).
func wantRecords(t *testing.T, n *testutil.Node, when string, tcx, cls []*chainPod) {
	t.Helper()
	names := func(ps []*chainPod) []string {
		var out []string
		for _, p := range ps {
			v := hostVethFor(p.ID, "eth0")
			out = append(out, v+"@egress", v+"@ingress")
		}
		sort.Strings(out)
		return out
	}
	pins := linkPins(t, n)
	sort.Strings(pins)
	recs, _ := filepath.Glob(filepath.Join(n.StateDir, "bpf-legacy", "*"))
	for i := range recs {
		recs[i] = filepath.Base(recs[i])
	}
	sort.Strings(recs)
	if want := names(tcx); !slices.Equal(pins, want) {
		t.Errorf("%s: link pins %v, want %v", when, pins, want)
	}
	if want := names(cls); !slices.Equal(recs, want) {
		t.Errorf("%s: clsact records %v, want %v", when, recs, want)
	}
}
