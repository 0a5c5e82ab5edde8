package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestDelLeavesNoAttachment: DEL deletes the pod's veth before it removes
// the endpoint, without detaching the programs first (the kernel takes
// them off with the device). In both attach modes nothing may remain: no
// link pin, no clsact record, and, for TCX, no link object of the node's
// pod programs in the kernel (a pinned link of a deleted device would
// otherwise live on, detached, for as long as its pin).
func TestDelLeavesNoAttachment(t *testing.T) {
	for _, mode := range []string{"tcx", "legacy"} {
		t.Run(mode, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: "10.77.214.0/24",
				Extra: map[string]any{"tcAttach": mode, "ipMasq": false}})
			p := addPod(t, n, conf, "dl")
			ids := podProgramIDs(t, n)
			if mode == "tcx" {
				if got := podLinks(t, n, ids); got != 2 {
					t.Fatalf("after ADD: %d TCX links of the pod programs, want 2", got)
				}
			}
			veth := hostVethFor(p.ID, "eth0")
			if err := n.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
				t.Fatalf("DEL: %v", err)
			}
			if out, err := n.Exec(t, "ip", "link", "show", veth); err == nil {
				t.Errorf("host veth %s left after DEL:\n%s", veth, out)
			}
			if pins := linkPins(t, n); len(pins) != 0 {
				t.Errorf("link pins left after DEL: %v", pins)
			}
			if recs, _ := filepath.Glob(filepath.Join(n.StateDir, "bpf-legacy", "*")); len(recs) != 0 {
				t.Errorf("clsact records left after DEL: %v", recs)
			}
			// The kernel frees an unpinned link asynchronously.
			deadline := time.Now().Add(10 * time.Second)
			for {
				got := podLinks(t, n, ids)
				if got == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d TCX link(s) of the pod programs still in the kernel 10 s after DEL", got)
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
}

// podProgramIDs returns the kernel IDs of the node's pinned tern_from_pod
// and tern_to_pod.
func podProgramIDs(t *testing.T, n *testutil.Node) map[int]bool {
	t.Helper()
	ids := map[int]bool{}
	for _, prog := range []string{"tern_from_pod", "tern_to_pod"} {
		pinned, _ := filepath.Glob(filepath.Join(n.BPFFSDir, "progs", "*", prog))
		if len(pinned) != 1 {
			t.Fatalf("want one pinned %s, got %v", prog, pinned)
		}
		out, err := n.Exec(t, "bpftool", "-j", "prog", "show", "pinned", pinned[0])
		if err != nil {
			t.Fatal(err)
		}
		var info struct{ ID int }
		if err := json.Unmarshal([]byte(out), &info); err != nil || info.ID == 0 {
			t.Fatalf("bpftool prog show %s: %q %v", pinned[0], out, err)
		}
		ids[info.ID] = true
	}
	return ids
}

// podLinks counts the BPF links in the kernel whose program is one of ids.
func podLinks(t *testing.T, n *testutil.Node, ids map[int]bool) int {
	t.Helper()
	out, err := n.Exec(t, "bpftool", "-j", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	var links []struct {
		ProgID int `json:"prog_id"`
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &links); err != nil {
		t.Fatal(fmt.Errorf("bpftool link show: %w: %q", err, out))
	}
	c := 0
	for _, l := range links {
		if ids[l.ProgID] {
			c++
		}
	}
	return c
}
