package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"golang.org/x/sys/unix"
)

// Pod subnets. Every path has its own node namespace, so they could
// overlap; distinct subnets keep `ip netns exec … ip addr` readable.
const (
	referenceSubnet = "10.98.1.0/24"
	ternSubnet      = "10.244.1.0/24"
	ternClusterCIDR = "10.244.0.0/16"
	cniVersion      = "1.1.0"
)

const (
	referenceDescription = "reference CNI plugins bridge + host-local v1.9.1 (isGateway, ipMasq) through libcni: Linux bridge in the node netns, pods on one /24"
	ebpfDescription      = "Tern plugin, datapath \"ebpf\": tc programs on the host-side veths (cls_bpf in clsact, or tcx), pod-to-pod by bpf_redirect_peer, no bridge"
	iptablesDescription  = "Tern plugin, datapath \"iptables\": Linux bridge and Tern's iptables chains (TERN-FWD-*) in the node netns"
)

// cniNetwork runs one network configuration list through libcni, the
// plugin processes started inside the node namespace as a container
// runtime on that node would.
type cniNetwork struct {
	node *Netns
	conf *libcni.CNIConfig
	list *libcni.NetworkConfigList
}

func (r *runner) newCNINetwork(node *Netns, conflist map[string]any) (*cniNetwork, error) {
	b, err := json.Marshal(conflist)
	if err != nil {
		return nil, err
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		return nil, fmt.Errorf("parse conflist: %w", err)
	}
	return &cniNetwork{
		node: node,
		conf: libcni.NewCNIConfigWithCacheDir([]string{r.binDir}, filepath.Join(r.tmp, "cni-cache"), cniExec{}),
		list: list,
	}, nil
}

func (c *cniNetwork) runtimeConf(p *Pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.containerID,
		NetNS:       p.NS.Path,
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", "bench"},
			{"K8S_POD_NAME", p.Name},
		},
	}
}

// AddPod runs CNI ADD for p (whose namespace exists) and records its IPv4
// address.
func (c *cniNetwork) AddPod(ctx context.Context, p *Pod) error {
	var res types.Result
	err := c.node.Do(func() error {
		var err error
		res, err = c.conf.AddNetworkList(ctx, c.list, c.runtimeConf(p))
		return err
	})
	if err != nil {
		return fmt.Errorf("CNI ADD %s: %w", p.Name, err)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		return fmt.Errorf("CNI ADD %s: result: %w", p.Name, err)
	}
	for _, ipc := range cur.IPs {
		if v4 := ipc.Address.IP.To4(); v4 != nil {
			p.IP = v4
			return nil
		}
	}
	return fmt.Errorf("CNI ADD %s: result has no IPv4 address: %s", p.Name, res)
}

// DelPod runs CNI DEL for p.
func (c *cniNetwork) DelPod(ctx context.Context, p *Pod) error {
	err := c.node.Do(func() error {
		return c.conf.DelNetworkList(ctx, c.list, c.runtimeConf(p))
	})
	if err != nil {
		return fmt.Errorf("CNI DEL %s: %w", p.Name, err)
	}
	return nil
}

// addPods adds the client and server pods; CNI DEL of each is registered
// before its ADD, since a failed ADD may leave something behind.
func (r *runner) addPods(ctx context.Context, t *Topology) error {
	for _, p := range []*Pod{t.Client, t.Server} {
		t.onClose("CNI DEL "+p.Name, func(ctx context.Context) error { return t.cni.DelPod(ctx, p) })
		if err := t.cni.AddPod(ctx, p); err != nil {
			return err
		}
		if err := findHostSide(t.Node, p); err != nil {
			return err
		}
	}
	return nil
}

// findHostSide finds the node-side peer of the pod's eth0: a veth's
// IFLA_LINK is its peer's ifindex, here in the node namespace.
func findHostSide(node *Netns, p *Pod) error {
	eth0, err := p.NS.nl.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("pod %s: %w", p.Name, err)
	}
	if eth0.Type() != "veth" || eth0.Attrs().ParentIndex == 0 {
		return fmt.Errorf("pod %s: eth0 is a %s, not a veth with a peer", p.Name, eth0.Type())
	}
	host, err := node.nl.LinkByIndex(eth0.Attrs().ParentIndex)
	if err != nil {
		return fmt.Errorf("pod %s: host-side veth (ifindex %d) not in the node netns: %w", p.Name, eth0.Attrs().ParentIndex, err)
	}
	if host.Type() != "veth" {
		return fmt.Errorf("pod %s: ifindex %d in the node netns is a %s, not the pod's veth peer", p.Name, host.Attrs().Index, host.Type())
	}
	p.HostVeth = host.Attrs().Name
	p.HostIfindex = host.Attrs().Index
	return nil
}

// setupReference wires the pods with the reference bridge and host-local
// plugins.
func (r *runner) setupReference(ctx context.Context) (*Topology, error) {
	t, err := r.newTopology(PathReference)
	if err != nil {
		return t, err
	}
	bridge := "tbr" + r.tag
	conf := map[string]any{
		"cniVersion": cniVersion,
		"name":       r.netName(PathReference),
		"plugins": []any{map[string]any{
			"type":      "bridge",
			"bridge":    bridge,
			"isGateway": true,
			"ipMasq":    true,
			"ipam": map[string]any{
				"type":    "host-local",
				"subnet":  referenceSubnet,
				"dataDir": filepath.Join(r.tmp, "host-local"),
			},
		}},
	}
	if t.cni, err = r.newCNINetwork(t.Node, conf); err != nil {
		return t, err
	}
	if err := r.addPods(ctx, t); err != nil {
		return t, err
	}
	t.verifier = &referenceVerifier{t: t, bridge: bridge}
	t.noPolicy = "the reference bridge plugin does not implement NetworkPolicy"
	return t, r.finish(ctx, t)
}

// setupTern wires the pods of path with Tern's own plugin in the given
// datapath mode ("ebpf" or "iptables"), with a state directory and a bpffs
// of the run's own; extra adds fields to the network configuration (the
// Service paths' "services" and "serviceCIDR").
func (r *runner) setupTern(ctx context.Context, path, datapath string, extra map[string]any) (*Topology, error) {
	t, err := r.newTopology(path)
	if err != nil {
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
	bridge := fmt.Sprintf("tb%c%s", datapath[0], r.tag)
	plugin := map[string]any{
		"type":        "tern",
		"datapath":    datapath,
		"mtu":         1500,
		"clusterCIDR": ternClusterCIDR,
		"stateDir":    stateDir,
		"bpffsDir":    bpffsDir,
		"bridge":      bridge,
		"ipMasq":      true,
		"ipam":        map[string]any{"type": "tern-ipam", "subnet": ternSubnet},
	}
	for k, v := range extra {
		plugin[k] = v
	}
	conf := map[string]any{
		"cniVersion": cniVersion,
		"name":       r.netName(path),
		"plugins":    []any{plugin},
	}
	if t.cni, err = r.newCNINetwork(t.Node, conf); err != nil {
		return t, err
	}
	if r.ternctl == "" {
		t.noPolicy = r.noTernctl
	} else if t.policy, err = r.newTernPolicy(t, path, datapath, stateDir, conf); err != nil {
		return t, err
	}
	if err := r.addPods(ctx, t); err != nil {
		return t, err
	}
	switch datapath {
	case PathEBPF:
		t.verifier = &ebpfVerifier{t: t, comment: "ternbench-" + r.id + "-verify"}
	default:
		t.verifier = &iptablesVerifier{t: t}
	}
	return t, nil
}

// cniExec is libcni's plugin executor with two changes: the plugin runs
// in a process group of its own, so a Ctrl-C on the terminal does not kill
// it half-way through an ADD (the harness stops, then undoes with DEL),
// and it is not cancelled with the run, only bounded in time.
type cniExec struct{}

const cniTimeout = 2 * time.Minute

func (cniExec) ExecPlugin(ctx context.Context, pluginPath string, stdinData []byte, environ []string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cniTimeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, pluginPath)
	cmd.Env = environ
	cmd.Stdin = bytes.NewReader(stdinData)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		e := types.Error{}
		switch {
		case stdout.Len() > 0 && json.Unmarshal(stdout.Bytes(), &e) == nil && e.Msg != "":
			if stderr.Len() > 0 {
				e.Details = strings.TrimSpace(e.Details + " " + lastLines(stderr.String(), 4))
			}
		case stderr.Len() > 0:
			e.Msg = fmt.Sprintf("%s failed: %v: %s", filepath.Base(pluginPath), err, lastLines(stderr.String(), 6))
		default:
			e.Msg = fmt.Sprintf("%s failed with no error message: %v", filepath.Base(pluginPath), err)
		}
		return nil, &e
	}
	return stdout.Bytes(), nil
}

func (cniExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func (cniExec) Decode(b []byte) (version.PluginInfo, error) {
	var d version.PluginDecoder
	return d.Decode(b)
}
