package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"
)

// Path names, in the order the paths are interleaved by default.
const (
	PathLimit     = "limit"
	PathReference = "reference"
	PathEBPF      = "ebpf"
	PathIptables  = "iptables"
)

// Topology is one path's test bed on this machine: a node network
// namespace and two pods (network namespaces wired to the node by the
// path), client and server.
type Topology struct {
	Path   string
	Node   *Netns
	Client *Pod
	Server *Pod

	cni    *cniNetwork // nil when the path has no CNI plugin
	policy *ternPolicy // nil when the path has no NetworkPolicy support
	// noPolicy says why policy is nil.
	noPolicy string
	// services holds the Service paths' Services (and the ebpf path's when
	// the Service workload runs); nil elsewhere.
	services serviceSet
	verifier verifier
	checks   []string
	closers  []closer // undone in reverse order by Close
	// only, when set, names the only workloads the path runs (the
	// NodePort paths' client is no pod: the pod-to-pod workloads do not
	// apply).
	only []string
}

// supports is w.Supports(t), after the path's own restriction.
func (t *Topology) supports(w Workload) error {
	if t.only != nil && !slices.Contains(t.only, w.Name()) {
		return fmt.Errorf("path %s runs only %s", t.Path, strings.Join(t.only, ", "))
	}
	return w.Supports(t)
}

// Pod is one pod network namespace of a topology.
type Pod struct {
	Name        string // K8S_POD_NAME
	NS          *Netns
	IP          net.IP
	HostVeth    string // host-side veth, in the node namespace
	HostIfindex int
	containerID string
}

type closer struct {
	what string
	fn   func(context.Context) error
}

// PodProvisioner is what the control-plane workload needs from a path: CNI
// ADD and DEL of a pod whose namespace exists. Paths without a CNI plugin
// (the limit) do not provide it.
type PodProvisioner interface {
	AddPod(ctx context.Context, p *Pod) error
	DelPod(ctx context.Context, p *Pod) error
}

// PolicyApplier is what the policy sweep needs from a path: put a rule set
// of n NetworkPolicy rules selecting the server pod in force (SweepPolicies:
// n that do not match the benchmark traffic and one that allows it),
// through the path's own policy machinery, and remove it again. Tern's
// paths implement it with `ternctl apply` and `ternctl delete`; the limit
// and the reference plugins have no NetworkPolicy.
//
// A datapath that cannot enforce policy yet makes ApplyPolicyRules return
// an *unavailableError: the sweep is then reported unavailable on that
// path, not failed.
type PolicyApplier interface {
	ApplyPolicyRules(ctx context.Context, n int) (PolicyApplied, error)
	RemovePolicyRules(ctx context.Context) (time.Duration, error)
}

// PodProvisioner returns the path's CNI plugin, or nil when it has none.
func (t *Topology) PodProvisioner() PodProvisioner {
	if t.cni == nil {
		return nil
	}
	return t.cni
}

func (t *Topology) onClose(what string, fn func(context.Context) error) {
	t.closers = append(t.closers, closer{what, fn})
}

// Close undoes the topology in reverse order: CNI DEL of the pods, the
// pods' and the node's namespaces, mounts. It carries on past errors and
// returns them all.
func (t *Topology) Close(ctx context.Context) error {
	var errs []error
	for i := len(t.closers) - 1; i >= 0; i-- {
		c := t.closers[i]
		if err := c.fn(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s teardown: %s: %w", t.Path, c.what, err))
		}
	}
	t.closers = nil
	return errors.Join(errs...)
}

// newTopology creates the three namespaces of a path. The caller wires
// them and must Close the topology, on failure too.
func (r *runner) newTopology(path string) (*Topology, error) {
	t := &Topology{Path: path}
	var err error
	if t.Node, err = r.newNetns(path, "node", t); err != nil {
		return t, err
	}
	client, err := r.newNetns(path, "client", t)
	if err != nil {
		return t, err
	}
	server, err := r.newNetns(path, "server", t)
	if err != nil {
		return t, err
	}
	t.Client = &Pod{Name: "client", NS: client, containerID: r.nsName(path, "client")}
	t.Server = &Pod{Name: "server", NS: server, containerID: r.nsName(path, "server")}
	return t, nil
}

// newNetns creates a namespace named after the run, the path and role,
// deleted when t closes (t may be nil: the caller then closes it).
func (r *runner) newNetns(path, role string, t *Topology) (*Netns, error) {
	n, err := createNetns(r.nsName(path, role), r.procs)
	if err != nil {
		return nil, err
	}
	if t != nil {
		t.onClose("netns "+n.Name, func(context.Context) error { return n.Close() })
	}
	return n, nil
}

// finish applies the settings every path's pods share, runs the path's
// structural checks and proves that TCP gets from client to server.
func (r *runner) finish(ctx context.Context, t *Topology) error {
	for _, p := range []*Pod{t.Client, t.Server} {
		if p.IP == nil {
			return fmt.Errorf("pod %s has no IPv4 address", p.Name)
		}
		// The connection-rate test opens tens of thousands of connections
		// per second from the client; without these it runs out of
		// ephemeral ports (TIME_WAIT) whatever the datapath.
		if err := p.NS.Sysctl("net.ipv4.ip_local_port_range", "1024 65535"); err != nil {
			return err
		}
		if err := p.NS.Sysctl("net.ipv4.tcp_tw_reuse", "1"); err != nil {
			return err
		}
	}
	checks, err := t.verifier.setup(ctx)
	if err != nil {
		return fmt.Errorf("%s is not the path it claims: %w", t.Path, err)
	}
	t.checks = append(t.checks, checks...)
	if err := probeTCP(ctx, t, r.nextPort()); err != nil {
		return err
	}
	t.checks = append(t.checks, fmt.Sprintf("TCP client %s → server %s works", t.Client.IP, t.Server.IP))
	return nil
}

// probeTCP connects from the client pod to a listener in the server pod
// and exchanges one byte, retrying for a few seconds.
func probeTCP(ctx context.Context, t *Topology, port int) error {
	addr := net.JoinHostPort(t.Server.IP.String(), fmt.Sprint(port))
	ln, err := t.Server.NS.Listen("tcp4", addr)
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
	deadline := time.Now().Add(5 * time.Second)
	var last error
	for time.Now().Before(deadline) {
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
				return nil
			}
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("no TCP connectivity from client pod to %s: %w", addr, last)
}
