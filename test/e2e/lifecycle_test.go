package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestEBPFBypassesForward proves pod-to-pod traffic on the eBPF path never
// reaches the node's FORWARD chain: a DROP rule there that counts every
// packet stays at zero while pods talk, and the program shows up in
// bpftool on the host veth.
func TestEBPFBypassesForward(t *testing.T) {
	for _, mode := range []string{"tcx", "legacy"} {
		t.Run(mode, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: "ebpf", Subnet: "10.77.2.0/24",
				Extra: map[string]any{"tcAttach": mode}})
			a := addPod(t, n, conf, "a")
			b := addPod(t, n, conf, "b")

			if _, err := n.Exec(t, "iptables", "-w", "-I", "FORWARD", "1", "-j", "DROP"); err != nil {
				t.Fatal(err)
			}
			if err := testutil.Ping(a.NS, b.IP, 3); err != nil {
				t.Fatalf("ping with FORWARD DROP: %v", err)
			}
			if err := testutil.TCPTransfer(a.NS, b.NS, b.IP, 4<<20); err != nil {
				t.Fatalf("tcp with FORWARD DROP: %v", err)
			}
			out, err := n.Exec(t, "iptables", "-w", "-L", "FORWARD", "1", "-v", "-x", "-n")
			if err != nil {
				t.Fatal(err)
			}
			if pk := strings.Fields(out); len(pk) == 0 || pk[0] != "0" {
				t.Errorf("FORWARD DROP rule counted packets: %q", out)
			}

			// bpftool 7.1 (Debian 12) predates TCX: `net show` lists only
			// clsact filters, and `link show` prints TCX links as "type 11"
			// with their program id. Check what each mode can show.
			veth := hostVethOf(t, n, a)
			pinned, _ := filepath.Glob(filepath.Join(n.BPFFSDir, "progs", "*", "tern_from_pod"))
			if len(pinned) != 1 {
				t.Fatalf("want one pinned tern_from_pod, got %v", pinned)
			}
			progs, err := n.Exec(t, "bpftool", "prog", "show", "pinned", pinned[0])
			if err != nil {
				t.Fatal(err)
			}
			id := strings.TrimSuffix(strings.Fields(progs)[0], ":")
			if mode == "legacy" {
				show, err := n.Exec(t, "bpftool", "net", "show", "dev", veth)
				if err != nil {
					t.Fatal(err)
				}
				if !strings.Contains(show, "tern_from_pod") || !strings.Contains(show, "id "+id) {
					t.Errorf("bpftool net show dev %s does not show tern_from_pod (id %s):\n%s", veth, id, show)
				}
				return
			}
			links, err := n.Exec(t, "bpftool", "link", "show")
			if err != nil {
				t.Fatal(err)
			}
			re := regexp.MustCompile(`(?m)^\d+: (tcx|type 11)\s+prog ` + id + `\b`)
			if got := len(re.FindAllString(links, -1)); got != 2 {
				t.Errorf("bpftool link show: want 2 tcx links of prog %s (one per pod), got %d:\n%s", id, got, links)
			}
		})
	}
}

// hostVethOf finds the host veth of a pod from its alias.
func hostVethOf(t *testing.T, n *testutil.Node, p *pod) string {
	t.Helper()
	out, err := n.Exec(t, "ip", "-o", "link", "show", "type", "veth")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, ":"+p.ID+":eth0") {
			return strings.SplitN(strings.Fields(line)[1], "@", 2)[0]
		}
	}
	t.Fatalf("no host veth for %s in:\n%s", p.ID, out)
	return ""
}

// TestConcurrentAdds runs 30 ADDs at once: every pod gets a distinct IP
// and every pod reaches every other.
func TestConcurrentAdds(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.3.0/24"})
			const count = 30
			pods := make([]*testutil.Pod, count)
			for i := range pods {
				pods[i] = n.Pod(t, fmt.Sprintf("c%d", i))
			}
			ips := make([]string, count)
			errs := make([]error, count)
			var wg sync.WaitGroup
			for i, p := range pods {
				id := "c-" + p.Name
				t.Cleanup(func() { _ = n.Del(context.Background(), conf, id, p.Path, "eth0", k8sArgs) })
				wg.Add(1)
				go func() {
					defer wg.Done()
					res, err := n.Add(context.Background(), conf, id, p.Path, "eth0", k8sArgs)
					if err != nil {
						errs[i] = err
						return
					}
					ips[i] = resultIP(t, res)
				}()
			}
			wg.Wait()
			seen := map[string]bool{}
			for i, err := range errs {
				if err != nil {
					t.Fatalf("ADD %d: %v", i, err)
				}
				if seen[ips[i]] {
					t.Fatalf("IP %s handed out twice", ips[i])
				}
				seen[ips[i]] = true
			}
			// Each pod reaches the next one and one across the ring: every
			// pod sends and receives, bounded at 60 pings.
			for i := range pods {
				for _, j := range []int{(i + 1) % count, (i + count/2) % count} {
					if err := testutil.Ping(pods[i].NS, ips[j], 1); err != nil {
						t.Errorf("ping %s -> %s: %v", ips[i], ips[j], err)
					}
				}
			}
			if got := len(ipamRecords(t, n, network)); got != count {
				t.Errorf("IPAM records: %d, want %d", got, count)
			}
		})
	}
}

func resultIP(t testing.TB, res types.Result) string {
	b, err := resultJSON(res)
	if err != nil {
		return ""
	}
	m := regexp.MustCompile(`"address":"([0-9.]+)/`).FindStringSubmatch(string(b))
	if m == nil {
		return ""
	}
	return m[1]
}

// TestCheck verifies CHECK passes on a healthy pod and names the missing
// piece when a route is deleted or the program detached.
func TestCheck(t *testing.T) {
	for _, tc := range []struct{ name, dp, attach string }{
		{"ebpf", "ebpf", "tcx"},
		{"ebpf-clsact", "ebpf", "legacy"},
		{"iptables", "iptables", ""},
	} {
		dp := tc.dp
		t.Run(tc.name, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			extra := map[string]any{}
			if tc.attach != "" {
				extra["tcAttach"] = tc.attach
			}
			conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: dp, Subnet: "10.77.4.0/24", Extra: extra})
			p := addPod(t, n, conf, "k")
			if err := n.Check(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
				t.Fatalf("CHECK on a healthy pod: %v", err)
			}
			if _, err := testutil.ExecIn(p.NS, "ip", "route", "del", "default"); err != nil {
				t.Fatal(err)
			}
			err := n.Check(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs)
			if err == nil || !strings.Contains(err.Error(), "route") {
				t.Fatalf("CHECK after deleting the default route: %v", err)
			}
			if dp != "ebpf" {
				return
			}
			if _, err := testutil.ExecIn(p.NS, "ip", "route", "add", "default", "via", gatewayOf(t, p), "dev", "eth0"); err != nil {
				t.Fatal(err)
			}
			if err := n.Check(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
				t.Fatalf("CHECK after restoring the route: %v", err)
			}
			if tc.attach == "legacy" {
				// clsact: removing the qdisc takes both filters off the
				// host veth, and CHECK must see it.
				veth := hostVethFor(p.ID, "eth0")
				if _, err := n.Exec(t, "tc", "qdisc", "del", "dev", veth, "clsact"); err != nil {
					t.Fatal(err)
				}
				if pins, _ := filepath.Glob(filepath.Join(n.BPFFSDir, "links", "*")); len(pins) != 0 {
					t.Errorf("clsact mode pinned TCX links on a pod veth: %v", pins)
				}
				err = n.Check(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs)
				if err == nil || !strings.Contains(err.Error(), "not attached") {
					t.Fatalf("CHECK after deleting the clsact qdisc: %v", err)
				}
				return
			}
			// Detach: the pinned TCX links are what keep the programs on
			// (tc ingress and egress of the host veth).
			pins, _ := filepath.Glob(filepath.Join(n.BPFFSDir, "links", "*"))
			if len(pins) != 2 || !strings.HasSuffix(pins[0], "@egress") || !strings.HasSuffix(pins[1], "@ingress") {
				t.Fatalf("want an egress and an ingress link pin, got %v", pins)
			}
			for _, pin := range pins {
				if err := os.Remove(pin); err != nil {
					t.Fatal(err)
				}
				err = n.Check(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs)
				if err == nil || !strings.Contains(err.Error(), "not attached") {
					t.Fatalf("CHECK after detaching %s: %v", filepath.Base(pin), err)
				}
			}
		})
	}
}

func gatewayOf(t *testing.T, p *pod) string {
	out, err := testutil.ExecIn(p.NS, "ip", "-4", "neigh", "show", "nud", "permanent")
	if err != nil || len(strings.Fields(out)) == 0 {
		t.Fatalf("no permanent neighbour in pod: %q %v", out, err)
	}
	return strings.Fields(out)[0]
}

// TestGC removes an attachment missing from valid-attachments, with its
// veth, IP and map entry, and keeps the valid one working.
func TestGC(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.5.0/24"})
			keep := addPod(t, n, conf, "keep")
			stale := addPod(t, n, conf, "stale")
			other := addPod(t, n, conf, "other")
			staleVeth := hostVethOf(t, n, stale)

			err := n.GC(t.Context(), conf, []types.GCAttachment{
				{ContainerID: keep.ID, IfName: "eth0"},
				{ContainerID: other.ID, IfName: "eth0"},
			})
			if err != nil {
				t.Fatalf("GC: %v", err)
			}
			for _, v := range hostVeths(t, n) {
				if v == staleVeth {
					t.Errorf("GC left the stale veth %s", v)
				}
			}
			recs := ipamRecords(t, n, network)
			if len(recs) != 2 || strings.Contains(strings.Join(recs, " "), stale.IP+" ") {
				t.Errorf("IPAM records after GC: %v (stale IP %s)", recs, stale.IP)
			}
			if dp == "ebpf" {
				keys := endpointKeys(t, n)
				if len(keys) != 2 || strings.Contains(strings.Join(keys, " "), stale.IP) {
					t.Errorf("endpoint map after GC: %v (stale %s)", keys, stale.IP)
				}
			}
			if err := testutil.Ping(keep.NS, other.IP, 2); err != nil {
				t.Errorf("valid pods cannot talk after GC: %v", err)
			}
			if err := n.Check(t.Context(), conf, keep.ID, keep.Path, "eth0", k8sArgs); err != nil {
				t.Errorf("CHECK of a kept pod after GC: %v", err)
			}
		})
	}
}

// TestDelegatedIPAM wires pods with the reference host-local plugin.
func TestDelegatedIPAM(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			conf := conflist(t, n, testutil.UniqueName("net"), netConf{Datapath: dp, Subnet: "10.77.6.0/24", IPAMType: "host-local"})
			a := addPod(t, n, conf, "a")
			b := addPod(t, n, conf, "b")
			if err := testutil.Ping(a.NS, b.IP, 2); err != nil {
				t.Errorf("ping: %v", err)
			}
			if err := n.Check(t.Context(), conf, a.ID, a.Path, "eth0", k8sArgs); err != nil {
				t.Errorf("CHECK: %v", err)
			}
			for _, p := range []*pod{a, b} {
				if err := n.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
					t.Fatalf("DEL: %v", err)
				}
			}
			files, _ := filepath.Glob(filepath.Join(n.StateDir, "host-local", "*", "10.77.*"))
			if len(files) != 0 {
				t.Errorf("host-local kept reservations after DEL: %v", files)
			}
		})
	}
}

// TestDelAfterNetnsGone: the runtime may delete the netns first.
func TestDelAfterNetnsGone(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.7.0/24"})
			p := addPod(t, n, conf, "gone")
			if _, err := n.Exec(t, "ip", "netns", "del", p.Name); err != nil {
				t.Fatal(err)
			}
			if err := n.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
				t.Fatalf("DEL after netns removal: %v", err)
			}
			if v := hostVeths(t, n); len(v) != 0 {
				t.Errorf("veths left: %v", v)
			}
			if r := ipamRecords(t, n, network); len(r) != 0 {
				t.Errorf("IPs left: %v", r)
			}
			if dp == "ebpf" {
				if k := endpointKeys(t, n); len(k) != 0 {
					t.Errorf("map entries left: %v", k)
				}
			}
		})
	}
}
