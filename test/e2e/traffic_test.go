package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/ternlabs/tern/internal/testutil"
)

var datapaths = []string{"ebpf", "iptables"}

// TestPodToPod wires 3 pods on one node and checks ping, a TCP transfer and
// UDP between every ordered pair, then DELs them all and checks that no
// veth, IP record, map entry or iptables rule of ours remains.
func TestPodToPod(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			n := testutil.NewNode(t)
			network := testutil.UniqueName("net")
			conf := conflist(t, n, network, netConf{Datapath: dp, Subnet: "10.77.1.0/24"})

			pods := make([]*pod, 3)
			for i := range pods {
				pods[i] = addPod(t, n, conf, fmt.Sprintf("p%d", i))
			}
			for _, a := range pods {
				for _, b := range pods {
					if a == b {
						continue
					}
					if err := testutil.Ping(a.NS, b.IP, 2); err != nil {
						t.Errorf("ping %s -> %s: %v", a.IP, b.IP, err)
					}
					if err := testutil.TCPTransfer(a.NS, b.NS, b.IP, 1<<20); err != nil {
						t.Errorf("tcp %s -> %s: %v", a.IP, b.IP, err)
					}
					if err := testutil.UDPEcho(a.NS, b.NS, b.IP); err != nil {
						t.Errorf("udp %s -> %s: %v", a.IP, b.IP, err)
					}
				}
			}

			for _, p := range pods {
				if err := n.Del(t.Context(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
					t.Fatalf("DEL %s: %v", p.Name, err)
				}
			}
			if v := hostVeths(t, n); len(v) != 0 {
				t.Errorf("veths left after DEL: %v", v)
			}
			if r := ipamRecords(t, n, network); len(r) != 0 {
				t.Errorf("IPAM records left after DEL: %v", r)
			}
			if out, _ := n.Exec(t, "iptables-save"); strings.Contains(out, "TERN") {
				t.Errorf("iptables rules left after DEL:\n%s", out)
			}
			if dp == "ebpf" {
				if keys := endpointKeys(t, n); len(keys) != 0 {
					t.Errorf("endpoint map not empty after DEL: %v", keys)
				}
			}
			// DEL is idempotent, also once the netns is gone.
			for _, p := range pods {
				if err := n.Del(context.Background(), conf, p.ID, p.Path, "eth0", k8sArgs); err != nil {
					t.Errorf("second DEL %s: %v", p.Name, err)
				}
			}
		})
	}
}
