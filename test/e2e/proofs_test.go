package e2e

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestDelFreesIPWhenDatapathFails makes DEL's datapath step fail for real
// (the pod's ingress link pin replaced by a non-empty directory, which
// cannot be unpinned): DEL reports the error, but the pod's IP is released
// at once, and a retried DEL, once the obstacle is gone, finishes the job.
func TestDelFreesIPWhenDatapathFails(t *testing.T) {
	testutil.RequirePrivileged(t)
	t.Parallel()
	n := testutil.NewNode(t)
	network := testutil.UniqueName("net")
	conf := conflist(t, n, network, netConf{Datapath: "ebpf", Subnet: "10.77.213.0/24", Extra: map[string]any{"ipMasq": false}})
	p := addPod(t, n, conf, "d")
	pin := filepath.Join(n.BPFFSDir, "links", hostVethFor(p.ID, "eth0")+"@ingress")
	if err := os.Remove(pin); err != nil {
		t.Fatalf("ingress link pin: %v", err)
	}
	block(t, pin)

	err := n.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs)
	if err == nil {
		t.Fatal("DEL succeeded although the link pin could not be removed")
	}
	if !strings.Contains(err.Error(), "unpin") {
		t.Errorf("DEL error %q does not name the failed step", err)
	}
	if ips := ipamRecords(t, n, network); len(ips) != 0 {
		t.Errorf("DEL failed in the datapath and kept the IP: %v", ips)
	}

	os.RemoveAll(pin)
	if err := n.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
		t.Fatalf("retried DEL: %v", err)
	}
	wantNothingLeft(t, n, network, 0, 0)
	if keys := endpointKeys(t, n); len(keys) != 0 {
		t.Errorf("endpoint map after the retried DEL: %v", keys)
	}
}

// TestCheckDetects breaks one piece of a healthy pod's wiring at a time
// (one pod per piece) and checks that CHECK fails with an error naming it.
func TestCheckDetects(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.214.0/24", Extra: map[string]any{"ipMasq": false}})
			cases := []struct {
				name    string
				breakIt func(t *testing.T, p *pod)
				want    string
			}{
				{"address removed", func(t *testing.T, p *pod) {
					out, err := testutil.ExecIn(p.NS, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
					if err != nil {
						t.Fatal(err)
					}
					f := strings.Fields(out)
					if len(f) < 4 {
						t.Fatalf("no address on eth0: %q", out)
					}
					mustExec(t, p, "ip", "addr", "del", f[3], "dev", "eth0")
				}, "lacks address " + "10.77.214."},
				{"IPAM reservation removed", func(t *testing.T, p *pod) {
					if err := os.Remove(filepath.Join(n.StateDir, "ipam", network, p.IP)); err != nil {
						t.Fatal(err)
					}
				}, "IP " + "10.77.214."},
				{"pod interface missing", func(t *testing.T, p *pod) {
					// Renamed, not deleted: deleting eth0 deletes the host
					// veth with it, which CHECK reports first.
					mustExec(t, p, "ip", "link", "set", "eth0", "down")
					mustExec(t, p, "ip", "link", "set", "eth0", "name", "eth9")
					mustExec(t, p, "ip", "link", "set", "eth9", "up")
				}, "pod interface eth0 is missing"},
			}
			if dp == "ebpf" {
				cases = append(cases, struct {
					name    string
					breakIt func(t *testing.T, p *pod)
					want    string
				}{"gateway neighbour removed", func(t *testing.T, p *pod) {
					mustExec(t, p, "ip", "neigh", "del", gatewayOf(t, p), "dev", "eth0")
				}, "permanent neighbour entry for gateway"})
			}
			for _, tc := range cases {
				p := addPod(t, n, conf, "k")
				if err := n.Check(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
					t.Fatalf("%s: CHECK on the healthy pod: %v", tc.name, err)
				}
				tc.breakIt(t, p)
				err := n.Check(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("%s: CHECK = %v, want an error containing %q", tc.name, err, tc.want)
				}
			}
		})
	}
}

func mustExec(t *testing.T, p *pod, name string, args ...string) {
	t.Helper()
	if _, err := testutil.ExecIn(p.NS, name, args...); err != nil {
		t.Fatal(err)
	}
}

// TestGCWithoutRecordsOrCache: an attachment the node has forgotten
// everything about but its veth and IP (no attachment record, no libcni
// cache, so libcni's GC runs no DEL for it) is still collected by the
// plugin's GC: the veth found by its alias; a stale record of another
// attachment removed with its veth; the delegated IPAM plugin called with
// GC and the valid attachments. The IPAM plugin is host-local behind a
// shell wrapper that logs each command and its stdin (host-local v1.9 takes
// GC calls but does nothing with them, "FIXME GC" in its source, so its
// files cannot show the call).
func TestGCWithoutRecordsOrCache(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			log := recordingIPAM(t, n)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.215.0/24", IPAMType: "host-local", Extra: map[string]any{"ipMasq": false}})
			conf = []byte(strings.Replace(string(conf), `"type":"host-local"`, `"type":"recipam"`, 1))
			keep := addPod(t, n, conf, "keep")
			lost := addPod(t, n, conf, "lost") // record and cache removed: veth and IP only
			stale := addPod(t, n, conf, "stl") // cache removed: record, veth and IP
			for _, p := range []*pod{lost, stale} {
				forgetCache(t, n, p)
			}
			recs := filepath.Join(n.StateDir, "attachments", network)
			if err := os.Remove(filepath.Join(recs, lost.ID+":eth0.json")); err != nil {
				t.Fatal(err)
			}
			lostVeth, staleVeth := hostVethFor(lost.ID, "eth0"), hostVethFor(stale.ID, "eth0")

			if err := n.GC(t.Context(), conf, []types.GCAttachment{{ContainerID: keep.ID, IfName: "eth0"}}); err != nil {
				t.Fatalf("GC: %v", err)
			}
			veths := hostVeths(t, n)
			for _, v := range []string{lostVeth, staleVeth} {
				if slices.Contains(veths, v) {
					t.Errorf("GC left veth %s (veths %v)", v, veths)
				}
			}
			if got := attachmentRecords(t, n, network); len(got) != 1 || !strings.HasPrefix(got[0], keep.ID+":") {
				t.Errorf("attachment records after GC: %v, want only %s's", got, keep.ID)
			}
			if dp == "ebpf" {
				if keys := endpointKeys(t, n); len(keys) != 1 || keys[0] != keep.IP {
					t.Errorf("endpoint map after GC: %v, want [%s]", keys, keep.IP)
				}
			} else {
				out, err := n.Exec(t, "nft", "list", "ruleset")
				if err != nil {
					t.Fatal(err)
				}
				for _, v := range []string{lostVeth, staleVeth} {
					if strings.Contains(out, v) {
						t.Errorf("GC left the anti-spoofing chain of %s:\n%s", v, out)
					}
				}
				if !strings.Contains(out, hostVethFor(keep.ID, "eth0")) {
					t.Errorf("GC removed the kept pod's anti-spoofing chain:\n%s", out)
				}
			}
			b, err := os.ReadFile(log)
			if err != nil {
				t.Fatal(err)
			}
			var gc []string
			for _, line := range strings.Split(string(b), "\n") {
				if strings.HasPrefix(line, "GC ") {
					gc = append(gc, line)
				}
			}
			if len(gc) != 1 {
				t.Fatalf("delegated IPAM got %d GC calls, want 1; its log:\n%s", len(gc), b)
			}
			if !strings.Contains(gc[0], "cni.dev/valid-attachments") || !strings.Contains(gc[0], keep.ID) ||
				strings.Contains(gc[0], lost.ID) || strings.Contains(gc[0], stale.ID) {
				t.Errorf("delegated IPAM GC stdin does not list exactly the valid attachment %s:\n%s", keep.ID, gc[0])
			}
			if err := n.Check(t.Context(), conf, keep.ID, keep.Path, "eth0", k8sArgs); err != nil {
				t.Errorf("CHECK of the kept pod after GC: %v", err)
			}
		})
	}
}

// recordingIPAM gives node n a CNI path holding its plugins and "recipam",
// a wrapper of host-local that appends "<CNI_COMMAND> <stdin>" to a log,
// and returns the log's path.
func recordingIPAM(t *testing.T, n *testutil.Node) string {
	t.Helper()
	dir := t.TempDir()
	for _, bin := range []string{"tern", "host-local"} {
		if err := os.Symlink(filepath.Join(n.CNIPath, bin), filepath.Join(dir, bin)); err != nil {
			t.Fatal(err)
		}
	}
	log := filepath.Join(t.TempDir(), "ipam.log")
	script := "#!/bin/sh\nin=$(cat)\nprintf '%s %s\\n' \"$CNI_COMMAND\" \"$(printf '%s' \"$in\" | tr -d '\\n')\" >> " + log +
		"\nprintf '%s' \"$in\" | exec " + filepath.Join(n.CNIPath, "host-local") + "\n"
	if err := os.WriteFile(filepath.Join(dir, "recipam"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	n.CNIPath = dir
	return log
}

// forgetCache removes libcni's cached result of a pod, so libcni's GC does
// not DEL it and only the plugin's GC can collect it.
func forgetCache(t *testing.T, n *testutil.Node, p *pod) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(n.CacheDir, "results", "*"+p.ID+"*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no libcni cache for %s in %s (%v)", p.ID, n.CacheDir, err)
	}
	for _, f := range files {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
}
