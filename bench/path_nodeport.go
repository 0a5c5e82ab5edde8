package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// NodePort paths: the client is not a pod but a host outside the node (its
// namespace wired to the node's uplink by a veth), the server a pod of
// Tern's eBPF datapath with Tern's own Service load balancer (services
// "ebpf"), reached through the node's uplink address and a NodePort
// (externalTrafficPolicy Local). The two differ only in
// nodePortAcceleration: "none" (tern_from_uplink translates at tc ingress)
// or "xdp" (xdp_uplink.c translates at the uplink's XDP, tc delivers).
const (
	PathNodePortTC  = "nodeport-tc"
	PathNodePortXDP = "nodeport-xdp"
)

// NodePortPaths are run only when named in --paths; they run only the
// NodePort workload.
var NodePortPaths = []string{PathNodePortTC, PathNodePortXDP}

const (
	nodePortUplink = "up0"
	nodePortNodeIP = "192.168.200.1"
	nodePortExtIP  = "192.168.200.2"
	// The Service: TCP (iperf3's control connection) and UDP NodePort
	// 30201 to the server pod's port 5201.
	nodePortPort   = 30201
	nodePortTarget = 5201
)

var nodePortDescriptions = map[string]string{
	PathNodePortTC:  "client outside the node (a netns on the node's uplink veth) → node address:NodePort → server pod; Tern ebpf datapath, services \"ebpf\", nodePortAcceleration \"none\": DNAT at the uplink's tc ingress (tern_from_uplink), bpf_redirect_peer into the pod",
	PathNodePortXDP: "as nodeport-tc with nodePortAcceleration \"xdp\": DNAT at the uplink's XDP (native, before the skb is allocated), tc ingress decides policy and bpf_redirect_peers it into the pod",
}

func isNodePortPath(path string) bool { return path == PathNodePortTC || path == PathNodePortXDP }

func (r *runner) setupNodePort(ctx context.Context, path string) (*Topology, error) {
	t, err := r.newTopology(path)
	if err != nil {
		return t, err
	}
	t.only = []string{nodePortWorkloadName}
	t.noPolicy = "the policy sweep is not run on NodePort paths"
	// The client namespace is the outside host: the other end of the
	// node's uplink.
	if err := t.Node.nl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: nodePortUplink, MTU: 1500},
		PeerName: "ext0", PeerNamespace: netlink.NsFd(int(t.Client.NS.ns.Fd()))}); err != nil {
		return t, fmt.Errorf("uplink veth: %w", err)
	}
	for _, side := range []struct {
		n          *Netns
		link, addr string
	}{{t.Node, nodePortUplink, nodePortNodeIP}, {t.Client.NS, "ext0", nodePortExtIP}} {
		l, err := side.n.nl.LinkByName(side.link)
		if err != nil {
			return t, err
		}
		a, _ := netlink.ParseAddr(side.addr + "/24")
		if err := side.n.nl.AddrAdd(l, a); err != nil {
			return t, err
		}
		if err := side.n.nl.LinkSetUp(l); err != nil {
			return t, err
		}
	}
	t.Client.IP = net.ParseIP(nodePortExtIP).To4()
	if err := t.Node.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		return t, err
	}

	stateDir := filepath.Join(r.tmp, "state-"+path)
	bpffsDir := filepath.Join(r.tmp, "bpffs-"+path)
	for _, d := range []string{stateDir, bpffsDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return t, err
		}
	}
	if err := unix.Mount("bpf", bpffsDir, "bpf", 0, ""); err != nil {
		return t, fmt.Errorf("mount bpffs on %s: %w", bpffsDir, err)
	}
	t.onClose("bpffs "+bpffsDir, func(context.Context) error {
		if err := unix.Unmount(bpffsDir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount %s: %w", bpffsDir, err)
		}
		return nil
	})
	accel := "none"
	if path == PathNodePortXDP {
		accel = "xdp"
	}
	conf := map[string]any{
		"cniVersion": cniVersion,
		"name":       r.netName(path),
		"plugins": []any{map[string]any{
			"type":                 "tern",
			"datapath":             PathEBPF,
			"mtu":                  1500,
			"clusterCIDR":          ternClusterCIDR,
			"stateDir":             stateDir,
			"bpffsDir":             bpffsDir,
			"bridge":               fmt.Sprintf("tn%c%s", path[9], r.tag),
			"ipMasq":               true,
			"uplink":               nodePortUplink,
			"services":             "ebpf",
			"nodePortAcceleration": accel,
			"ipam":                 map[string]any{"type": "tern-ipam", "subnet": ternSubnet},
		}},
	}
	if t.cni, err = r.newCNINetwork(t.Node, conf); err != nil {
		return t, err
	}
	p := t.Server
	t.onClose("CNI DEL "+p.Name, func(ctx context.Context) error { return t.cni.DelPod(ctx, p) })
	if err := t.cni.AddPod(ctx, p); err != nil {
		return t, err
	}
	if err := findHostSide(t.Node, p); err != nil {
		return t, err
	}
	if r.ternctl == "" {
		return t, fmt.Errorf("ternctl is needed to apply the NodePort Service: %s", r.noTernctl)
	}
	confFile := filepath.Join(stateDir, "10-bench.conflist")
	b, err := json.Marshal(conf)
	if err != nil {
		return t, err
	}
	if err := os.WriteFile(confFile, b, 0o600); err != nil {
		return t, err
	}
	manifest := filepath.Join(stateDir, "nodeport.yaml")
	if err := os.WriteFile(manifest, []byte(fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {namespace: bench, name: server}
spec:
  type: NodePort
  clusterIP: 10.96.0.201
  externalTrafficPolicy: Local
  ports:
  - {name: tcp, port: %[2]d, nodePort: %[3]d}
  - {name: udp, port: %[2]d, protocol: UDP, nodePort: %[3]d}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: bench, name: server-1, labels: {kubernetes.io/service-name: server}}
addressType: IPv4
ports: [{name: tcp, port: %[2]d}, {name: udp, port: %[2]d, protocol: UDP}]
endpoints: [{addresses: [%[1]s], conditions: {ready: true}}]
`, p.IP, nodePortTarget, nodePortPort)), 0o600); err != nil {
		return t, err
	}
	ctl := func(ctx context.Context, args ...string) ([]byte, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ternctlTimeout)
		defer cancel()
		return t.Node.Run(ctx, append([]string{r.ternctl, "--cni-conf", confFile}, args...)...)
	}
	if out, err := ctl(ctx, "apply", "-f", manifest); err != nil {
		return t, fmt.Errorf("ternctl apply the NodePort Service: %w: %s", err, out)
	}
	t.onClose("ternctl delete the NodePort Service", func(ctx context.Context) error {
		if out, err := ctl(ctx, "delete", "-f", manifest); err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	})
	t.verifier = &nodePortVerifier{t: t, xdp: accel == "xdp", metrics: func(ctx context.Context) (map[string]uint64, error) {
		out, err := ctl(ctx, "-o", "json", "get", "metrics")
		if err != nil {
			return nil, fmt.Errorf("ternctl get metrics: %w: %s", err, out)
		}
		var m map[string]map[string]uint64
		if err := json.Unmarshal(out, &m); err != nil {
			return nil, fmt.Errorf("ternctl get metrics: %w", err)
		}
		got := map[string]uint64{}
		for k, v := range m {
			got[k] = v["packets"]
		}
		return got, nil
	}}
	return t, r.finishNodePort(ctx, t)
}

// finishNodePort is finish for a NodePort path: the server pod's
// settings, the checks, and a TCP exchange from the outside host through
// the NodePort.
func (r *runner) finishNodePort(ctx context.Context, t *Topology) error {
	if err := t.Server.NS.Sysctl("net.ipv4.ip_local_port_range", "1024 65535"); err != nil {
		return err
	}
	checks, err := t.verifier.setup(ctx)
	if err != nil {
		return fmt.Errorf("%s is not the path it claims: %w", t.Path, err)
	}
	t.checks = append(t.checks, checks...)
	ln, err := t.Server.NS.Listen("tcp4", net.JoinHostPort(t.Server.IP.String(), strconv.Itoa(nodePortTarget)))
	if err != nil {
		return fmt.Errorf("probe listener in server pod: %w", err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			b := make([]byte, 1)
			if _, err := c.Read(b); err == nil {
				_, _ = c.Write(b)
			}
			c.Close()
		}
	}()
	addr := net.JoinHostPort(nodePortNodeIP, strconv.Itoa(nodePortPort))
	var last error
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if err := ctx.Err(); err != nil {
			return err
		}
		c, err := t.Client.NS.Dial("tcp4", addr, time.Second)
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			b := []byte{'x'}
			if _, err = c.Write(b); err == nil {
				_, err = c.Read(b)
			}
			c.Close()
			if err == nil {
				t.checks = append(t.checks, fmt.Sprintf("TCP outside host %s → NodePort %s → server pod %s:%d works", nodePortExtIP, addr, t.Server.IP, nodePortTarget))
				return nil
			}
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("TCP through the NodePort %s does not work: %v", addr, last)
}

// nodePortVerifier: XDP on the uplink exactly on nodeport-xdp, Tern's tc
// program on its ingress on both; during every sample the translations are
// counted by the program the path claims (lb_xdp_dnat or lb_dnat) and none
// by the other.
type nodePortVerifier struct {
	t       *Topology
	xdp     bool
	metrics func(context.Context) (map[string]uint64, error)
	last    map[string]uint64
}

func (v *nodePortVerifier) setup(ctx context.Context) ([]string, error) {
	up, err := v.t.Node.nl.LinkByName(nodePortUplink)
	if err != nil {
		return nil, err
	}
	x := up.Attrs().Xdp
	attached := x != nil && x.Attached
	if attached != v.xdp {
		return nil, fmt.Errorf("XDP program on the uplink %s: %v, want %v", nodePortUplink, attached, v.xdp)
	}
	progs, err := hostVethPrograms(v.t.Node, up.Attrs().Index)
	if err != nil {
		return nil, err
	}
	if len(progs) == 0 {
		return nil, fmt.Errorf("no tc ingress BPF program on the uplink %s", nodePortUplink)
	}
	checks := []string{fmt.Sprintf("%s tc ingress: %s", nodePortUplink, strings.Join(progs, ", "))}
	if v.xdp {
		checks = append(checks, fmt.Sprintf("%s XDP: program id %d (driver mode)", nodePortUplink, x.ProgId))
	} else {
		checks = append(checks, fmt.Sprintf("%s: no XDP program", nodePortUplink))
	}
	counter := "lb_dnat"
	if v.xdp {
		counter = "lb_xdp_dnat"
	}
	return append(checks, "translations counted by "+counter+" only, during every traffic sample"), nil
}

func (v *nodePortVerifier) before(ctx context.Context) error {
	var err error
	v.last, err = v.metrics(ctx)
	return err
}

func (v *nodePortVerifier) after(ctx context.Context) error {
	now, err := v.metrics(ctx)
	if err != nil {
		return err
	}
	xdp, tc := now["lb_xdp_dnat"]-v.last["lb_xdp_dnat"], now["lb_dnat"]-v.last["lb_dnat"]
	if v.xdp && (xdp == 0 || tc != 0) {
		return fmt.Errorf("nodeport-xdp: %d packets translated by XDP, %d by tc during the sample", xdp, tc)
	}
	if !v.xdp && (tc == 0 || xdp != 0) {
		return fmt.Errorf("nodeport-tc: %d packets translated by tc, %d by XDP during the sample", tc, xdp)
	}
	return nil
}
