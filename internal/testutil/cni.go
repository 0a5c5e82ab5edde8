package testutil

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/ns"
)

// defaultCNITimeout bounds a CNI call whose context has no deadline.
const defaultCNITimeout = 60 * time.Second

// Node simulates a Kubernetes node: a network namespace the CNI plugin
// processes run in, with the directories a node would give them.
type Node struct {
	NS   ns.NetNS
	Name string // netns name, as in `ip netns list`
	// StateDir is an empty per-test directory for plugin state (IPAM data
	// and the like).
	StateDir string
	// BPFFSDir is a per-test bpffs mount for pins.
	BPFFSDir string
	// CacheDir is libcni's result cache.
	CacheDir string
	// CNIPath is the directory holding the plugin binaries.
	CNIPath string
}

// Pod is a pod's network namespace.
type Pod struct {
	NS   ns.NetNS
	Name string // netns name
	Path string // netns path, the CNI_NETNS of the pod
}

// NewNode creates a node namespace (lo up, IPv4 forwarding on), its state,
// bpffs and cache directories, and a CNIPath with `tern`, `host-local` and
// the reference meta plugins (see BuildPlugins). Everything is removed when the test ends.
func NewNode(t testing.TB) *Node {
	t.Helper()
	RequirePrivileged(t)
	return newNode(t, BuildPlugins(t))
}

func newNode(t testing.TB, cniPath string) *Node {
	t.Helper()
	nodeNS := NewNetNS(t, "node")
	err := nodeNS.Do(func(ns.NetNS) error {
		// /proc/sys/net belongs to the netns of the thread that opens it.
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	})
	if err != nil {
		t.Fatalf("node %s: enable ip_forward: %v", NSName(nodeNS), err)
	}
	return &Node{
		NS:       nodeNS,
		Name:     NSName(nodeNS),
		StateDir: t.TempDir(),
		BPFFSDir: MountBPFFS(t),
		CacheDir: t.TempDir(),
		CNIPath:  cniPath,
	}
}

// Pod creates a pod network namespace (lo up), removed when the test ends.
func (n *Node) Pod(t testing.TB, prefix string) *Pod {
	t.Helper()
	podNS := NewNetNS(t, prefix)
	return &Pod{NS: podNS, Name: NSName(podNS), Path: podNS.Path()}
}

// Exec runs a command (ip, iptables-save, bpftool, ...) with its process in
// the node namespace and returns its standard output; the error carries the
// standard error text. The command is killed after 30 s. It is safe to call
// from a cleanup.
func (n *Node) Exec(t testing.TB, name string, args ...string) (string, error) {
	t.Helper()
	RequirePrivileged(t)
	return ExecIn(n.NS, name, args...)
}

// Add runs CNI ADD for the conflist, with every plugin process in the node
// namespace, and returns the result. A ctx without deadline gets 60 s.
func (n *Node) Add(ctx context.Context, conflist []byte, containerID, podNetnsPath, ifname string, args [][2]string) (types.Result, error) {
	var res types.Result
	err := n.run(ctx, "ADD", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		var err error
		res, err = c.AddNetworkList(ctx, list, runtimeConf(containerID, podNetnsPath, ifname, args))
		return err
	})
	return res, err
}

// Del runs CNI DEL like Add runs ADD. libcni passes the result cached by ADD
// as prevResult.
func (n *Node) Del(ctx context.Context, conflist []byte, containerID, podNetnsPath, ifname string, args [][2]string) error {
	return n.run(ctx, "DEL", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		return c.DelNetworkList(ctx, list, runtimeConf(containerID, podNetnsPath, ifname, args))
	})
}

// Check runs CNI CHECK like Add runs ADD; it needs the result cached by ADD.
func (n *Node) Check(ctx context.Context, conflist []byte, containerID, podNetnsPath, ifname string, args [][2]string) error {
	return n.run(ctx, "CHECK", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		return c.CheckNetworkList(ctx, list, runtimeConf(containerID, podNetnsPath, ifname, args))
	})
}

// GC runs CNI GC (cniVersion 1.1.0 and later): libcni first runs DEL for the
// cached attachments of this network missing from valid, then GC on every
// plugin.
func (n *Node) GC(ctx context.Context, conflist []byte, valid []types.GCAttachment) error {
	return n.run(ctx, "GC", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		return c.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: valid})
	})
}

// Status runs CNI STATUS (cniVersion 1.1.0 and later) on every plugin.
func (n *Node) Status(ctx context.Context, conflist []byte) error {
	return n.run(ctx, "STATUS", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		return c.GetStatusNetworkList(ctx, list)
	})
}

// AddRuntime, CheckRuntime and DelRuntime are Add, Check and Del with a
// full runtime configuration, for capability arguments (runtimeConfig:
// portMappings, bandwidth, mac, ...).
func (n *Node) AddRuntime(ctx context.Context, conflist []byte, rc *libcni.RuntimeConf) (types.Result, error) {
	var res types.Result
	err := n.run(ctx, "ADD", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		var err error
		res, err = c.AddNetworkList(ctx, list, rc)
		return err
	})
	return res, err
}

func (n *Node) CheckRuntime(ctx context.Context, conflist []byte, rc *libcni.RuntimeConf) error {
	return n.run(ctx, "CHECK", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		return c.CheckNetworkList(ctx, list, rc)
	})
}

func (n *Node) DelRuntime(ctx context.Context, conflist []byte, rc *libcni.RuntimeConf) error {
	return n.run(ctx, "DEL", conflist, func(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList) error {
		return c.DelNetworkList(ctx, list, rc)
	})
}

func runtimeConf(containerID, podNetnsPath, ifname string, args [][2]string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: containerID,
		NetNS:       podNetnsPath,
		IfName:      ifname,
		Args:        args,
	}
}

// run parses the conflist and calls fn from inside ns.Do: ns.Do locks the
// goroutine to a thread switched into the node netns and Go forks plugin
// processes from the calling thread, so they start in the node netns.
func (n *Node) run(ctx context.Context, cmd string, conflist []byte, fn func(context.Context, *libcni.CNIConfig, *libcni.NetworkConfigList) error) error {
	list, err := libcni.ConfListFromBytes(conflist)
	if err != nil {
		return fmt.Errorf("cni %s: parse conflist: %w", cmd, err)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultCNITimeout)
		defer cancel()
	}
	c := libcni.NewCNIConfigWithCacheDir([]string{n.CNIPath}, n.CacheDir, nil)
	err = n.NS.Do(func(ns.NetNS) error {
		return fn(ctx, c, list)
	})
	if err != nil {
		return fmt.Errorf("cni %s %s in node %s: %w", cmd, list.Name, n.Name, err)
	}
	return nil
}
