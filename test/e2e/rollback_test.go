package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ternlabs/tern/internal/testutil"
)

// hostVethFor is the plugin's host veth name for an attachment ("tern" and
// 11 hex digits of the SHA-256 of "<container>/<ifname>", cni/record.go).
func hostVethFor(containerID, ifname string) string {
	sum := sha256.Sum256([]byte(containerID + "/" + ifname))
	return "tern" + hex.EncodeToString(sum[:])[:11]
}

// linkPins lists the TCX link pins of the node.
func linkPins(t *testing.T, n *testutil.Node) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(n.BPFFSDir, "links"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// block puts a non-empty directory at path, so that creating, replacing
// or removing a file there fails for real (root ignores permissions, not
// EISDIR or ENOTEMPTY). It is removed when the test ends.
func block(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(path, "blocker"), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(path) })
}

// TestAddRollback makes a late step of ADD fail for real and checks that
// the failed ADD leaves nothing behind: no veth, no IP, no attachment
// record, no endpoint map entry, no link pin, no anti-spoofing chain, no
// eth0 in the pod; then, with the obstacle gone, the same ADD succeeds.
func TestAddRollback(t *testing.T) {
	cases := []struct {
		name     string
		datapath string
		// obstruct breaks the step for the attachment (node, container ID,
		// host veth) and returns what undoes it.
		obstruct func(t *testing.T, n *testutil.Node, network, id, veth string) func()
		want     string // in the ADD error
	}{
		{"record write/ebpf", "ebpf", obstructRecord, "write record"},
		{"record write/iptables", "iptables", obstructRecord, "write record"},
		{"attach ingress after egress/ebpf", "ebpf", func(t *testing.T, n *testutil.Node, _, _, veth string) func() {
			// The egress program attaches first and succeeds; the ingress
			// pin is in the way.
			p := filepath.Join(n.BPFFSDir, "links", veth+"@ingress")
			block(t, p)
			return func() { os.RemoveAll(p) }
		}, "ingress"},
		{"endpoint map full/ebpf", "ebpf", func(t *testing.T, n *testutil.Node, _, _, _ string) func() {
			return fillEndpoints(t, n)
		}, "add endpoint"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: tc.datapath, Subnet: "10.77.212.0/24", Extra: map[string]any{"ipMasq": false}})
			// A first pod loads the programs and maps and keeps the
			// node state: the rollback must not touch it.
			warm := addPod(t, n, conf, "w")
			before := struct{ veths, ips, pins, keys []string }{hostVeths(t, n), ipamRecords(t, n, network), linkPins(t, n), endpointKeys(t, n)}

			p := n.Pod(t, "rb")
			id := "c-" + p.Name
			veth := hostVethFor(id, "eth0")
			unblock := tc.obstruct(t, n, network, id, veth)
			t.Cleanup(func() { _ = n.Del(context.Background(), conf, id, p.Path, "eth0", k8sArgs) })
			_, err := n.Add(t.Context(), conf, id, p.Path, "eth0", k8sArgs)
			if err == nil {
				t.Fatal("ADD succeeded against the obstacle")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ADD error %q does not mention %q", err, tc.want)
			}

			if got := hostVeths(t, n); !slices.Equal(got, before.veths) {
				t.Errorf("veths after the failed ADD: %v, before it: %v", got, before.veths)
			}
			if got := ipamRecords(t, n, network); !slices.Equal(got, before.ips) {
				t.Errorf("IPs allocated after the failed ADD: %v, before it: %v", got, before.ips)
			}
			var recs []string
			for _, r := range attachmentRecords(t, n, network) {
				if strings.HasSuffix(r, ".json") {
					recs = append(recs, r)
				}
			}
			if got := recs; len(got) != 1 {
				t.Errorf("attachment records after the failed ADD: %v, want only the first pod's", got)
			}
			for _, pin := range linkPins(t, n) {
				if strings.HasPrefix(pin, veth+"@") && !(tc.name == "attach ingress after egress/ebpf" && pin == veth+"@ingress") {
					t.Errorf("link pin %s left by the failed ADD", pin)
				}
			}
			if tc.datapath == "ebpf" {
				for _, k := range endpointKeys(t, n) {
					if strings.HasPrefix(k, "10.77.212.") && !slices.Contains(before.keys, k) {
						t.Errorf("endpoint map entry %s left by the failed ADD", k)
					}
				}
			} else if out, err := n.Exec(t, "nft", "list", "ruleset"); err != nil {
				t.Error(err)
			} else if strings.Contains(out, veth) {
				t.Errorf("anti-spoofing state of %s left by the failed ADD:\n%s", veth, out)
			}
			if out, err := testutil.ExecIn(p.NS, "ip", "-o", "link", "show"); err != nil {
				t.Error(err)
			} else if strings.Contains(out, "eth0") {
				t.Errorf("failed ADD left eth0 in the pod:\n%s", out)
			}

			// The node still serves the first pod, and the same ADD works
			// once the obstacle is gone.
			unblock()
			if _, err := n.Add(t.Context(), conf, id, p.Path, "eth0", k8sArgs); err != nil {
				t.Fatalf("ADD after removing the obstacle: %v", err)
			}
			if err := testutil.Ping(p.NS, warm.IP, 2); err != nil {
				t.Errorf("new pod -> first pod: %v", err)
			}
		})
	}
}

// obstructRecord makes the attachment record's temporary file a non-empty
// directory: the record write, ADD's last step, fails.
func obstructRecord(t *testing.T, n *testutil.Node, network, id, _ string) func() {
	p := filepath.Join(n.StateDir, "attachments", network, id+":eth0.json.tmp")
	block(t, p)
	return func() { os.RemoveAll(p) }
}

// fillEndpoints fills the node's endpoint map with entries for addresses
// outside every test subnet (192.0.0.0/8 host numbers), so the next
// endpoint write fails with E2BIG, and returns what removes them.
func fillEndpoints(t *testing.T, n *testutil.Node) func() {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", "tern_endpoints"), nil)
	if err != nil {
		t.Fatal(err)
	}
	val := make([]byte, m.ValueSize())
	var added [][4]byte
	for i := uint32(0); i < m.MaxEntries()+1; i++ {
		var key [4]byte
		binary.BigEndian.PutUint32(key[:], 0xc0000000|i)
		if err := m.Update(key, val, ebpf.UpdateNoExist); err != nil {
			if errors.Is(err, ebpf.ErrKeyExist) {
				continue
			}
			break // full
		}
		added = append(added, key)
	}
	remove := func() {
		for _, k := range added {
			_ = m.Delete(k)
		}
		m.Close()
	}
	t.Cleanup(remove)
	return remove
}
