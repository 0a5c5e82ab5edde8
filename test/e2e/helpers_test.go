// Package e2e drives the built tern binary through libcni the way a
// container runtime does, against simulated nodes and pods in network
// namespaces, and checks real traffic and what is left behind.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ternlabs/tern/internal/testutil"
)

// netConf is the part of Tern's config the tests vary.
type netConf struct {
	Datapath string
	Subnet   string // tern-ipam subnet, e.g. 10.77.1.0/24
	RangeEnd string // optional
	IPAMType string // "" = tern-ipam
	Extra    map[string]any
}

// conflist builds a conflist for node n.
func conflist(t testing.TB, n *testutil.Node, name string, c netConf) []byte {
	t.Helper()
	ipamConf := map[string]any{"type": "tern-ipam", "subnet": c.Subnet}
	if c.RangeEnd != "" {
		ipamConf["rangeEnd"] = c.RangeEnd
	}
	if c.IPAMType == "host-local" {
		ipamConf = map[string]any{
			"type":    "host-local",
			"dataDir": filepath.Join(n.StateDir, "host-local"),
			"ranges":  [][]map[string]string{{{"subnet": c.Subnet}}},
		}
	}
	plugin := map[string]any{
		"type":        "tern",
		"datapath":    c.Datapath,
		"mtu":         1500,
		"clusterCIDR": "10.77.0.0/16",
		"stateDir":    n.StateDir,
		"bpffsDir":    n.BPFFSDir,
		"bridge":      testutil.UniqueName("tb"),
		"ipam":        ipamConf,
	}
	for k, v := range c.Extra {
		plugin[k] = v
	}
	b, err := json.Marshal(map[string]any{
		"cniVersion": "1.1.0",
		"name":       name,
		"plugins":    []any{plugin},
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pod is one wired pod.
type pod struct {
	*testutil.Pod
	ID string
	IP string
}

var k8sArgs = [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}}

// addPod creates a pod netns and runs ADD for it; DEL and netns removal
// are registered as cleanup so a failing test leaves nothing behind.
func addPod(t *testing.T, n *testutil.Node, conf []byte, prefix string) *pod {
	t.Helper()
	p := n.Pod(t, prefix)
	id := "c-" + p.Name
	t.Cleanup(func() { _ = n.Del(context.Background(), conf, id, p.Path, "eth0", k8sArgs) })
	res, err := n.Add(t.Context(), conf, id, p.Path, "eth0", append(k8sArgs, [2]string{"K8S_POD_NAME", p.Name}))
	if err != nil {
		t.Fatalf("ADD %s: %v", p.Name, err)
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.IPs) != 1 {
		t.Fatalf("ADD %s: want 1 IP, got %v", p.Name, r.IPs)
	}
	return &pod{Pod: p, ID: id, IP: r.IPs[0].Address.IP.String()}
}

// hostVeths lists the node's veths whose alias marks them as Tern's.
func hostVeths(t *testing.T, n *testutil.Node) []string {
	t.Helper()
	out, err := n.Exec(t, "ip", "-o", "link", "show", "type", "veth")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0])
		}
	}
	return names
}

// ipamRecords lists the built-in IPAM's records of a network.
func ipamRecords(t *testing.T, n *testutil.Node, network string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(n.StateDir, "ipam", network))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, e := range entries {
		if net.ParseIP(e.Name()) != nil {
			ips = append(ips, e.Name())
		}
	}
	return ips
}

func subnetFor(t *testing.T) string {
	// Distinct subnets per test keep parallel tests' traffic apart even
	// though each node is its own namespace.
	return fmt.Sprintf("10.77.%d.0/24", 1+len(t.Name())%200)
}

// endpointKeys lists the pod IPs in the node's pinned endpoints map.
func endpointKeys(t *testing.T, n *testutil.Node) []string {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(n.BPFFSDir, "maps", "tern_endpoints"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil // never loaded: no entries
	}
	if err != nil {
		t.Fatalf("open endpoints map: %v", err)
	}
	defer m.Close()
	var (
		key  [4]byte
		val  []byte
		keys []string
	)
	it := m.Iterate()
	for it.Next(&key, &val) {
		keys = append(keys, net.IP(key[:]).String())
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return keys
}

func resultJSON(res types.Result) ([]byte, error) {
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return nil, err
	}
	return json.Marshal(r)
}
