// Package network binds one CNI network of the node to its datapath and to
// the node's policy store: what the CNI plugin (ADD, DEL), ternctl (apply,
// delete, get) and the node agent ternd all use to turn the desired
// cluster state into the network's datapath state. There is one store and
// one compile path (policy/store → policy/compile → Diff → ApplyPolicy);
// the desired state has two sources, manifests given to ternctl and the
// Kubernetes API watched by ternd.
//
// The package knows nothing of the network configuration's format: the
// CNI package fills a Network from a parsed configuration
// (cni.NetConf.Network), which keeps the datapath constructors where the
// configuration lives.
package network

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/store"
)

// Network is one network of the node as the policy side sees it.
type Network struct {
	// Name is the CNI network name.
	Name string
	// Datapath names the datapath ("ebpf", "iptables") in errors.
	Datapath string
	// StateDir is the node's state directory (policy store, records).
	StateDir string
	// AttachLock is the lock file that serialises changes to the
	// network's endpoints (CNI ADD, DEL, GC). Update holds it across
	// listing the endpoints and applying, so no pod being added is
	// missing from a rule set being applied.
	AttachLock string
	// Endpoints lists the network's attachments on this node. Called with
	// AttachLock held.
	Endpoints func() ([]*datapath.Endpoint, error)
	// OpenEnforcer opens the network's policy enforcement; release frees
	// its handles. enf is nil when the datapath cannot enforce policy.
	OpenEnforcer func() (enf datapath.PolicyEnforcer, release func(), err error)
	// Gateway is the pods' gateway when the configuration knows it (the
	// built-in IPAM's); nil otherwise.
	Gateway net.IP
	// BalanceServices says the network balances Services itself
	// (services: "ebpf"): the store compiles Services and EndpointSlices
	// for the datapath's load balancer in the same update as the policy.
	BalanceServices bool
	// NodeName is the node's name as EndpointSlices spell it, for
	// traffic policy Local (the agent knows it; empty elsewhere, where
	// only the node's own pods count as local).
	NodeName string
}

// Store is the node's policy store.
func (n *Network) Store() *store.Store { return store.New(n.StateDir) }

// node describes the network for the policy store.
func (n *Network) node(enf datapath.PolicyEnforcer, eps []*datapath.Endpoint) store.Node {
	node := store.Node{
		Network:   n.Name,
		Endpoints: StoreEndpoints(eps),
		Hosts:     func() ([]net.IP, error) { return n.Hosts(eps) },
		Enforcer:  enf,
		Datapath:  n.Datapath,
		NodeName:  n.NodeName,
	}
	if lb, ok := enf.(datapath.ServiceBalancer); ok && n.BalanceServices {
		node.Balancer = lb
	}
	return node
}

// Sync brings the network's policy state in line with the store for the
// given endpoints, through enf (nil: a datapath without enforcement, which
// fails if policies exist: better no pod than a pod its policies do not
// isolate). The caller holds AttachLock (CNI ADD and DEL do).
func (n *Network) Sync(enf datapath.PolicyEnforcer, eps []*datapath.Endpoint) error {
	if err := n.Store().Sync(n.node(enf, eps)); err != nil {
		return fmt.Errorf("NetworkPolicy: %w", err)
	}
	return nil
}

// Reapply is Sync for a datapath that lost its policy maps (the eBPF
// datapath's pins): the whole rule set is written again, not a diff
// against what the store believes is applied.
func (n *Network) Reapply(enf datapath.PolicyEnforcer, eps []*datapath.Endpoint) error {
	node := n.node(enf, eps)
	node.Reapply = true
	if err := n.Store().Sync(node); err != nil {
		return fmt.Errorf("NetworkPolicy: %w", err)
	}
	return nil
}

// Update changes the node's desired policy state with change and enforces
// the result on this network's pods before it returns (ternctl apply and
// delete). On error nothing changes. A datapath that cannot enforce
// NetworkPolicy refuses any state with policies. Other networks sharing the
// state directory pick the new state up at their next ADD, DEL or update.
func (n *Network) Update(change func(*manifest.State) (*manifest.State, error)) (before, after *manifest.State, err error) {
	lock, err := loader.Lock(n.AttachLock)
	if err != nil {
		return nil, nil, err
	}
	defer lock.Unlock()
	eps, err := n.Endpoints()
	if err != nil {
		return nil, nil, err
	}
	enf, release, err := n.OpenEnforcer()
	if err != nil {
		return nil, nil, err
	}
	defer release()
	before, after, err = n.Store().Update(n.node(enf, eps), change)
	if err != nil {
		return nil, nil, fmt.Errorf("NetworkPolicy: %w", err)
	}
	return before, after, nil
}

// Replace makes st the node's desired state (ternd, from the API server's
// view) and enforces it on the network's pods. While the network has no
// pod on the node and no rule set applied, only the desired state is
// recorded: the first ADD compiles it, and the datapath is not brought up
// for a network without pods. It returns the number of local endpoints
// the rule set was applied to (0 when only the state was recorded).
func (n *Network) Replace(st *manifest.State) (int, error) {
	lock, err := loader.Lock(n.AttachLock)
	if err != nil {
		return 0, err
	}
	defer lock.Unlock()
	eps, err := n.Endpoints()
	if err != nil {
		return 0, err
	}
	change := func(*manifest.State) (*manifest.State, error) { return st, nil }
	s := n.Store()
	if len(eps) == 0 {
		applied, err := s.Applied(n.Name)
		if err != nil {
			return 0, err
		}
		if applied == nil {
			if _, _, err := s.UpdateState(change); err != nil {
				return 0, fmt.Errorf("NetworkPolicy: %w", err)
			}
			return 0, nil
		}
	}
	enf, release, err := n.OpenEnforcer()
	if err != nil {
		return 0, err
	}
	defer release()
	if _, _, err := s.Update(n.node(enf, eps), change); err != nil {
		return 0, fmt.Errorf("NetworkPolicy: %w", err)
	}
	return len(eps), nil
}

// PolicyEndpoints lists the network's attachments as the policy store sees
// them.
func (n *Network) PolicyEndpoints() ([]store.Endpoint, error) {
	eps, err := n.Endpoints()
	if err != nil {
		return nil, err
	}
	return StoreEndpoints(eps), nil
}

// StoreEndpoints converts datapath endpoints to the store's view.
func StoreEndpoints(eps []*datapath.Endpoint) []store.Endpoint {
	out := make([]store.Endpoint, 0, len(eps))
	for _, ep := range eps {
		out = append(out, store.Endpoint{IP: ep.IP.IP, Namespace: ep.PodNamespace, Name: ep.PodName})
	}
	return out
}

// Hosts returns the node's own addresses, which policy always lets pods
// talk to: every IPv4 address in the network namespace of the calling
// thread (the node's) and the pods' gateways.
func (n *Network) Hosts(eps []*datapath.Endpoint) ([]net.IP, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list node addresses: %w", err)
	}
	var hosts []net.IP
	for _, a := range addrs {
		if a.IPNet != nil {
			hosts = append(hosts, a.IP)
		}
	}
	for _, ep := range eps {
		if ep.Gateway != nil {
			hosts = append(hosts, ep.Gateway)
		}
	}
	if n.Gateway != nil {
		hosts = append(hosts, n.Gateway)
	}
	return hosts, nil
}
