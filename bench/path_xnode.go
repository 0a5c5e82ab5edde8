package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/routing"
)

// Cross-node paths: the client pod on one node, the server pod on another,
// the two node namespaces joined through a fabric namespace (one bridge for
// native routing and the limit; two subnets routed by the fabric for VXLAN,
// so that the nodes are not adjacent).
const (
	PathLimitXNode     = "limit-xnode"
	PathEBPFNative     = "ebpf-native"
	PathEBPFVXLAN      = "ebpf-vxlan"
	PathIptablesNative = "iptables-native"
	PathIptablesVXLAN  = "iptables-vxlan"
)

// CrossNodePaths are run only when named in --paths.
var CrossNodePaths = []string{PathLimitXNode, PathEBPFNative, PathEBPFVXLAN, PathIptablesNative, PathIptablesVXLAN}

// KnownPaths are every path --paths accepts.
var KnownPaths = append(append(append(append([]string{}, AllPaths...), CrossNodePaths...), ServicePaths...), NodePortPaths...)

// crossNodeBaselines: the paths a cross-node path's "× limit" and
// "× iptables" ratios compare with.
var crossNodeBaselines = map[string][2]string{
	PathEBPFNative:     {PathLimitXNode, PathIptablesNative},
	PathEBPFVXLAN:      {PathLimitXNode, PathIptablesVXLAN},
	PathIptablesNative: {PathLimitXNode, ""},
	PathIptablesVXLAN:  {PathLimitXNode, ""},
	PathLimitXNode:     {"", ""},
	// NodePort paths compare with each other (docs/services.md), not
	// with a limit or iptables.
	PathNodePortTC:  {"", ""},
	PathNodePortXDP: {"", ""},
}

const (
	xnodeUplink           = "up0"
	limitXNodeDescription = "two node netns joined by a bridge in a fabric netns; per pod a bare veth into its node as in limit; the nodes route each other's pod /24 via the other's address, ip_forward=1; no netfilter rule, no BPF program, no overlay"
)

var xnodeDescriptions = map[string]string{
	PathLimitXNode:     limitXNodeDescription,
	PathEBPFNative:     "Tern ebpf datapath on two nodes, routing native (package routing: a route per remote pod CIDR via the other node; BPF: bpf_fib_lookup + bpf_redirect_neigh out, bpf_redirect_peer in), same fabric as limit-xnode",
	PathEBPFVXLAN:      "Tern ebpf datapath on two nodes in two subnets routed by the fabric, routing vxlan (external VXLAN device, tunnel key set in BPF, bpf_redirect_peer from the VXLAN device's tc ingress); pod MTU 1450",
	PathIptablesNative: "Tern iptables datapath on two nodes, routing native: the kernel routes of package routing, bridge and TERN-FWD chains on each node",
	PathIptablesVXLAN:  "Tern iptables datapath on two nodes in two subnets, routing vxlan: encapsulating kernel routes through the external VXLAN device; pod MTU 1450",
}

// xnodeWorld is what a cross-node path adds to its topology.
type xnodeWorld struct {
	node2, fabric *Netns
	ips           [2]string // node InternalIPs
}

func isVXLANPath(path string) bool { return strings.HasSuffix(path, "-vxlan") }

// setupXNodeFabric creates the second node and the fabric and wires both
// nodes' uplinks.
func (r *runner) setupXNodeFabric(t *Topology) (*xnodeWorld, error) {
	w := &xnodeWorld{ips: [2]string{"192.168.100.1", "192.168.100.2"}}
	var err error
	if w.node2, err = r.newNetns(t.Path, "node2", t); err != nil {
		return nil, err
	}
	if w.fabric, err = r.newNetns(t.Path, "fabric", t); err != nil {
		return nil, err
	}
	vxlan := isVXLANPath(t.Path)
	if vxlan {
		w.ips[1] = "192.168.101.2"
	}
	if err := w.fabric.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
		return nil, err
	}
	for i, node := range []*Netns{t.Node, w.node2} {
		br, gw := "br0", "192.168.100.254"
		if vxlan && i == 1 {
			br, gw = "br1", "192.168.101.254"
		}
		if _, err := w.fabric.nl.LinkByName(br); err != nil {
			if err := w.fabric.nl.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: br}}); err != nil {
				return nil, fmt.Errorf("fabric bridge: %w", err)
			}
			b, err := w.fabric.nl.LinkByName(br)
			if err != nil {
				return nil, err
			}
			addr, _ := netlink.ParseAddr(gw + "/24")
			if err := w.fabric.nl.AddrAdd(b, addr); err != nil {
				return nil, err
			}
			if err := w.fabric.nl.LinkSetUp(b); err != nil {
				return nil, err
			}
		}
		peer := fmt.Sprintf("n%d", i+1)
		if err := node.nl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: xnodeUplink, MTU: 1500},
			PeerName: peer, PeerNamespace: netlink.NsFd(int(w.fabric.ns.Fd()))}); err != nil {
			return nil, fmt.Errorf("uplink veth: %w", err)
		}
		up, err := node.nl.LinkByName(xnodeUplink)
		if err != nil {
			return nil, err
		}
		addr, _ := netlink.ParseAddr(w.ips[i] + "/24")
		if err := node.nl.AddrAdd(up, addr); err != nil {
			return nil, err
		}
		if err := node.nl.LinkSetUp(up); err != nil {
			return nil, err
		}
		if err := node.nl.RouteAdd(&netlink.Route{LinkIndex: up.Attrs().Index, Gw: net.ParseIP(gw)}); err != nil {
			return nil, fmt.Errorf("default route: %w", err)
		}
		p, err := w.fabric.nl.LinkByName(peer)
		if err != nil {
			return nil, err
		}
		b, err := w.fabric.nl.LinkByName(br)
		if err != nil {
			return nil, err
		}
		if err := w.fabric.nl.LinkSetMaster(p, b); err != nil {
			return nil, err
		}
		if err := w.fabric.nl.LinkSetUp(p); err != nil {
			return nil, err
		}
		if err := node.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
			return nil, err
		}
	}
	return w, nil
}

func (r *runner) setupXNode(ctx context.Context, path string) (*Topology, error) {
	t, err := r.newTopology(path)
	if err != nil {
		return t, err
	}
	w, err := r.setupXNodeFabric(t)
	if err != nil {
		return t, err
	}
	if path == PathLimitXNode {
		t.noPolicy = "no CNI plugin: nothing enforces NetworkPolicy on this path"
		return t, r.setupLimitXNode(ctx, t, w)
	}
	return t, r.setupTernXNode(ctx, t, w)
}

func (r *runner) setupLimitXNode(ctx context.Context, t *Topology, w *xnodeWorld) error {
	ips := [2]net.IP{net.IPv4(10, 99, 1, 2).To4(), net.IPv4(10, 99, 2, 2).To4()}
	nodes := [2]*Netns{t.Node, w.node2}
	for i, p := range []*Pod{t.Client, t.Server} {
		host := fmt.Sprintf("tx%s%c", r.tag, "cs"[i])
		if err := wireLimitPod(nodes[i], p, host, ips[i]); err != nil {
			return fmt.Errorf("wire %s pod: %w", p.Name, err)
		}
		other := &net.IPNet{IP: net.IPv4(10, 99, byte(2-i), 0).To4(), Mask: net.CIDRMask(24, 32)}
		up, err := nodes[i].nl.LinkByName(xnodeUplink)
		if err != nil {
			return err
		}
		if err := nodes[i].nl.RouteAdd(&netlink.Route{Dst: other, Gw: net.ParseIP(w.ips[1-i]), LinkIndex: up.Attrs().Index}); err != nil {
			return fmt.Errorf("route to the other node's pods: %w", err)
		}
	}
	t.verifier = &xnodeLimitVerifier{nodes: nodes}
	return r.finish(ctx, t)
}

func (r *runner) setupTernXNode(ctx context.Context, t *Topology, w *xnodeWorld) error {
	datapath, mode, _ := strings.Cut(t.Path, "-")
	nodes := [2]*Netns{t.Node, w.node2}
	var cluster []routing.Node
	type nodeSetup struct {
		stateDir, bpffsDir string
		cni                *cniNetwork
	}
	var ns [2]nodeSetup
	for i := range nodes {
		tag := fmt.Sprintf("%s-%d", t.Path, i+1)
		ns[i].stateDir = filepath.Join(r.tmp, "state-"+tag)
		ns[i].bpffsDir = filepath.Join(r.tmp, "bpffs-"+tag)
		for _, d := range []string{ns[i].stateDir, ns[i].bpffsDir} {
			if err := os.MkdirAll(d, 0o700); err != nil {
				return err
			}
		}
		if err := unix.Mount("bpf", ns[i].bpffsDir, "bpf", 0, ""); err != nil {
			return fmt.Errorf("mount bpffs on %s: %w", ns[i].bpffsDir, err)
		}
		dir := ns[i].bpffsDir
		t.onClose("bpffs "+dir, func(context.Context) error {
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("unmount %s: %w", dir, err)
			}
			return nil
		})
		subnet := fmt.Sprintf("10.244.%d.0/24", i+1)
		plugin := map[string]any{
			"type":        "tern",
			"datapath":    datapath,
			"clusterCIDR": ternClusterCIDR,
			"stateDir":    ns[i].stateDir,
			"bpffsDir":    ns[i].bpffsDir,
			"bridge":      fmt.Sprintf("tx%c%d%s", datapath[0], i, r.tag),
			"ipMasq":      true,
			"uplink":      xnodeUplink,
			"routing":     mode,
			"ipam":        map[string]any{"type": "tern-ipam", "subnet": subnet},
		}
		if mode == routing.ModeNative {
			plugin["mtu"] = 1500 // vxlan: the plugin sizes it (uplink - 50)
		}
		conf := map[string]any{"cniVersion": cniVersion, "name": r.netName(t.Path), "plugins": []any{plugin}}
		var err error
		if ns[i].cni, err = r.newCNINetwork(nodes[i], conf); err != nil {
			return err
		}
		if i == 1 {
			// The sweep's rules select the server pod: its node enforces
			// them (ingress is enforced on the destination node).
			if r.ternctl == "" {
				t.noPolicy = r.noTernctl
			} else if t.policy, err = r.newTernPolicyOn(t, nodes[i], datapath, t.Path, ns[i].stateDir, conf); err != nil {
				return err
			} else {
				t.policy.remoteClient = true
			}
		}
		_, cidr, _ := net.ParseCIDR(subnet)
		cluster = append(cluster, routing.Node{Name: fmt.Sprintf("node%d", i+1), IP: net.ParseIP(w.ips[i]), PodCIDRs: []net.IPNet{*cidr}})
	}
	for i, p := range []*Pod{t.Client, t.Server} {
		c := ns[i].cni
		t.onClose("CNI DEL "+p.Name, func(ctx context.Context) error { return c.DelPod(ctx, p) })
		if err := c.AddPod(ctx, p); err != nil {
			return err
		}
		if err := findHostSide(nodes[i], p); err != nil {
			return err
		}
	}
	for i, node := range nodes {
		cfg := routing.Config{Mode: mode, LocalIP: net.ParseIP(w.ips[i]), Uplink: xnodeUplink}
		var dp *ebpfdp.Datapath
		if datapath == PathEBPF {
			dp = ebpfdp.New(ebpfdp.Config{BPFFSDir: ns[i].bpffsDir, StateDir: ns[i].stateDir, Network: r.netName(t.Path)})
			cfg.Table = dp
		}
		rec, err := routing.New(cfg)
		if err != nil {
			return err
		}
		t.onClose("routing teardown", func(context.Context) error {
			defer func() {
				if dp != nil {
					dp.Close()
				}
			}()
			return node.Do(rec.Teardown)
		})
		if err := node.Do(func() error { return rec.Sync(cluster) }); err != nil {
			return fmt.Errorf("routing sync: %w", err)
		}
	}
	if datapath == PathEBPF {
		t.verifier = &xnodeEBPFVerifier{t: t, nodes: nodes, comment: "ternbench-" + r.id + "-verify"}
	} else {
		t.verifier = &xnodeIptablesVerifier{per: [2]*iptablesVerifier{{t: &Topology{Node: nodes[0]}}, {t: &Topology{Node: nodes[1]}}}}
	}
	return r.finish(ctx, t)
}

// xnodeLimitVerifier: no netfilter rule in either node, before and after.
type xnodeLimitVerifier struct{ nodes [2]*Netns }

func (v *xnodeLimitVerifier) check(ctx context.Context) error {
	for _, n := range v.nodes {
		rules, err := netfilterRules(ctx, n)
		if err != nil {
			return err
		}
		if len(rules) > 0 {
			return fmt.Errorf("netfilter rules in node netns %s: %s", n.Name, strings.Join(rules, "; "))
		}
	}
	return nil
}

func (v *xnodeLimitVerifier) setup(ctx context.Context) ([]string, error) {
	if err := v.check(ctx); err != nil {
		return nil, err
	}
	return []string{"no netfilter rule in either node netns (checked after every traffic sample)"}, nil
}
func (v *xnodeLimitVerifier) before(context.Context) error    { return nil }
func (v *xnodeLimitVerifier) after(ctx context.Context) error { return v.check(ctx) }

// xnodeEBPFVerifier: Tern's program on both host veths, and counting rules
// (client↔server) at the top of FORWARD in both nodes that stay at zero:
// neither node's netfilter sees the pods' traffic (bpf_redirect_neigh or
// the tunnel out, bpf_redirect_peer in).
type xnodeEBPFVerifier struct {
	t       *Topology
	nodes   [2]*Netns
	comment string
}

func (v *xnodeEBPFVerifier) setup(ctx context.Context) ([]string, error) {
	var checks []string
	for i, p := range []*Pod{v.t.Client, v.t.Server} {
		progs, err := hostVethPrograms(v.nodes[i], p.HostIfindex)
		if err != nil {
			return nil, err
		}
		if len(progs) == 0 {
			return nil, fmt.Errorf("no tc ingress BPF program on host veth %s of pod %s", p.HostVeth, p.Name)
		}
		checks = append(checks, fmt.Sprintf("%s: %s", p.HostVeth, strings.Join(progs, ", ")))
	}
	c, s := v.t.Client.IP.String(), v.t.Server.IP.String()
	for _, n := range v.nodes {
		for _, pair := range [][2]string{{c, s}, {s, c}} {
			if _, err := n.Run(ctx, "iptables", "-w", "5", "-I", "FORWARD", "1", "-s", pair[0]+"/32", "-d", pair[1]+"/32",
				"-m", "comment", "--comment", v.comment); err != nil {
				return nil, fmt.Errorf("insert FORWARD counting rule: %w", err)
			}
		}
	}
	return append(checks, "FORWARD counting rules client↔server in both nodes stay at 0 packets after every traffic sample"), nil
}

func (v *xnodeEBPFVerifier) before(context.Context) error { return nil }

func (v *xnodeEBPFVerifier) after(ctx context.Context) error {
	for _, n := range v.nodes {
		if err := (&ebpfVerifier{t: &Topology{Node: n}, comment: v.comment}).after(ctx); err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	return nil
}

// xnodeIptablesVerifier: Tern's chains on both nodes, counters growing on
// both during every sample.
type xnodeIptablesVerifier struct{ per [2]*iptablesVerifier }

func (v *xnodeIptablesVerifier) setup(ctx context.Context) ([]string, error) {
	var checks []string
	for _, p := range v.per {
		c, err := p.setup(ctx)
		if err != nil {
			return nil, err
		}
		checks = append(checks, c...)
	}
	return checks, nil
}

func (v *xnodeIptablesVerifier) before(ctx context.Context) error {
	return errors.Join(v.per[0].before(ctx), v.per[1].before(ctx))
}

func (v *xnodeIptablesVerifier) after(ctx context.Context) error {
	return errors.Join(v.per[0].after(ctx), v.per[1].after(ctx))
}
