package e2e

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestPinsLostRestored: the node's bpffs is remounted under running pods
// (every pin gone: TCX links released, so the pods' veths run no program,
// and legacy filters keep programs bound to orphaned maps). The next ADD
// must restore every pod on record before it wires its own: NetworkPolicy
// enforced again (a denied connection is denied, an allowed one allowed),
// every pod's hooks attached to programs that use the node's pinned maps,
// every pod in the endpoints map, CHECK green.
func TestPinsLostRestored(t *testing.T) {
	for _, v := range []struct {
		name  string
		extra map[string]any
	}{
		{"tcx", nil},
		{"clsact", map[string]any{"tcAttach": "legacy"}},
	} {
		t.Run(v.name, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := newPolicyWorld(t, "ebpf")
			extra := map[string]any{"ipMasq": false}
			for k, val := range v.extra {
				extra[k] = val
			}
			w.conf = conflist(t, w.node, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: "10.77.30.0/24", Extra: extra})
			if err := os.WriteFile(w.confFile, w.conf, 0o600); err != nil {
				t.Fatal(err)
			}
			n := w.node
			web := addK8sPod(t, n, w.conf, "prod", "web")
			api := addK8sPod(t, n, w.conf, "prod", "api")
			client := addK8sPod(t, n, w.conf, "dev", "client")
			w.mustTernctl("apply", "-f", w.write("cluster.yaml", policyCluster))
			w.mustTernctl("apply", "-f", w.write("a.yaml", webPolicyA))
			expect(t, "before", tcp(client, web, 8080, false), tcp(api, web, 8080, true))

			// The bpffs goes away and a fresh one takes its place.
			if err := unix.Unmount(n.BPFFSDir, unix.MNT_DETACH); err != nil {
				t.Fatal(err)
			}
			if err := unix.Mount("bpf", n.BPFFSDir, "bpf", 0, ""); err != nil {
				t.Fatal(err)
			}
			if v.name == "tcx" {
				// The scenario is real: the pods run no program, so
				// policy is gone.
				waitDetached(t, n, hostVethOf(t, n, web.pod))
				expect(t, "pins lost", tcp(client, web, 8080, true))
			}

			db := addK8sPod(t, n, w.conf, "prod", "db")
			expect(t, "after the next ADD", tcp(client, web, 8080, false), tcp(api, web, 8080, true), tcp(web, db, 5432, true))
			// Every program counts into tern_metrics.
			m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", "tern_metrics"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			info, err := m.Info()
			if err != nil {
				t.Fatal(err)
			}
			pinned, _ := info.ID()
			for _, p := range []*k8sPod{web, api, client, db} {
				veth := hostVethOf(t, n, p.pod)
				progs := attachedPrograms(t, n, veth)
				if len(progs) != 2 {
					t.Errorf("%s (%s): %d programs attached, want ingress and egress", p, veth, len(progs))
				}
				for _, id := range progs {
					if maps := progMaps(t, id); !slices.Contains(maps, pinned) {

						t.Errorf("%s (%s): program %d uses maps %v, not the pinned tern_metrics %d", p, veth, id, maps, pinned)
					}
				}
				if err := n.Check(t.Context(), w.conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
					t.Errorf("CHECK %s after the restore: %v", p, err)
				}
			}
			if keys := endpointKeys(t, n); len(keys) != 4 {
				t.Errorf("endpoints map after the restore: %v, want the 4 pods", keys)
			}
		})
	}
}

// attachedPrograms lists the IDs of the programs on the veth's TCX hooks
// and clsact cls_bpf filters, both directions.
func attachedPrograms(t *testing.T, n *testutil.Node, veth string) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
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
			for _, p := range res.Programs {
				ids = append(ids, p.ID)
			}
		}
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			filters, err := netlink.FilterList(lk, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range filters {
				if bf, ok := f.(*netlink.BpfFilter); ok {
					ids = append(ids, ebpf.ProgramID(bf.Id))
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

func progMaps(t *testing.T, id ebpf.ProgramID) []ebpf.MapID {
	t.Helper()
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	maps, _ := info.MapIDs()
	return maps
}

// waitDetached waits (at most 5 s) until the veth runs no TCX program: the
// kernel releases links of a destroyed bpffs asynchronously.
func waitDetached(t *testing.T, n *testutil.Node, veth string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(attachedPrograms(t, n, veth)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%s still runs programs after its link pins went away", veth)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
