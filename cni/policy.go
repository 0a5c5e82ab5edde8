package cni

import (
	"fmt"
	"net"

	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/datapath/iptables"
	"github.com/ternlabs/tern/loader"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/store"
)

// NetworkPolicy on the node: the desired state and the rule set applied to
// each network live in the policy store under the state directory. ADD
// syncs before the pod can send or receive a packet (the pod gets the
// policy in force from its first packet), DEL after the endpoint is gone
// (a reused IP never inherits the old pod's identity), and ternctl apply
// and delete change the state through UpdatePolicy. All three hold the
// network's attachment lock while they list the endpoints and sync, so no
// sync can miss a pod being added.

// policyNode describes the network for the policy store. enf is the
// datapath's policy enforcer, nil if it has none.
func (c *NetConf) policyNode(enf datapath.PolicyEnforcer, eps []*datapath.Endpoint) store.Node {
	n := store.Node{
		Network:   c.Name,
		Endpoints: storeEndpoints(eps),
		Hosts:     func() ([]net.IP, error) { return c.nodeHosts(eps) },
		Enforcer:  enf,
		Datapath:  c.Datapath,
	}
	// services "ebpf": the same store update compiles the Services for
	// the datapath's load balancer.
	if lb, ok := enf.(datapath.ServiceBalancer); ok && c.Services == ServicesEBPF {
		n.Balancer = lb
	}
	return n
}

// enforcer returns dp's policy enforcer, nil if it has none.
func enforcer(dp datapath.Datapath) datapath.PolicyEnforcer {
	if pe, ok := dp.(datapath.PolicyEnforcer); ok {
		return pe
	}
	return nil
}

// syncPolicy brings the network's policy state in line with the store for
// the given endpoints. A datapath without enforcement fails if policies
// exist: better no pod than a pod its policies do not isolate.
func (c *NetConf) syncPolicy(dp datapath.Datapath, eps []*datapath.Endpoint) error {
	if err := store.New(c.StateDir).Sync(c.policyNode(enforcer(dp), eps)); err != nil {
		return fmt.Errorf("NetworkPolicy: %w", err)
	}
	return nil
}

// syncPolicyAfterDel is syncPolicy for DEL. dp may be nil (DEL without a
// record, when the iptables datapath's subnet is unknown); the iptables
// enforcement needs only the network name. A datapath without enforcement
// has nothing to withdraw.
func (c *NetConf) syncPolicyAfterDel(dp datapath.Datapath, eps []*datapath.Endpoint) error {
	enf := enforcer(dp)
	if enf == nil && c.Datapath == DatapathIPTables {
		pol, err := iptables.NewPolicy(c.Name)
		if err != nil {
			return err
		}
		enf = pol
	}
	if enf == nil {
		return nil
	}
	if err := store.New(c.StateDir).Sync(c.policyNode(enf, eps)); err != nil {
		return fmt.Errorf("NetworkPolicy: %w", err)
	}
	return nil
}

func storeEndpoints(eps []*datapath.Endpoint) []store.Endpoint {
	out := make([]store.Endpoint, 0, len(eps))
	for _, ep := range eps {
		out = append(out, store.Endpoint{IP: ep.IP.IP, Namespace: ep.PodNamespace, Name: ep.PodName})
	}
	return out
}

// nodeHosts returns the node's own addresses, which policy always lets
// pods talk to: every IPv4 address in the namespace the plugin runs in (the
// node's) and the pods' gateways.
func (c *NetConf) nodeHosts(eps []*datapath.Endpoint) ([]net.IP, error) {
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
	if c.pool != nil && c.pool.Gateway != nil {
		hosts = append(hosts, c.pool.Gateway)
	}
	return hosts, nil
}

// withoutAttachment returns eps without the attachment (containerID,
// ifname).
func withoutAttachment(eps []*datapath.Endpoint, containerID, ifname string) []*datapath.Endpoint {
	out := make([]*datapath.Endpoint, 0, len(eps))
	for _, ep := range eps {
		if ep.ContainerID != containerID || ep.IfName != ifname {
			out = append(out, ep)
		}
	}
	return out
}

// UpdatePolicy changes the node's desired policy state with change and
// enforces the result on this network's pods before it returns (ternctl
// apply and delete). On error nothing changes. A datapath that cannot
// enforce NetworkPolicy yet refuses any state with policies. Other networks
// sharing the state directory pick the new state up at their next ADD, DEL
// or update.
func (c *NetConf) UpdatePolicy(change func(*manifest.State) (*manifest.State, error)) (before, after *manifest.State, err error) {
	recs := newRecords(c.StateDir, c.Name)
	lock, err := loader.Lock(recs.lockPath())
	if err != nil {
		return nil, nil, err
	}
	defer lock.Unlock()
	list, err := recs.list()
	if err != nil {
		return nil, nil, err
	}
	eps := make([]*datapath.Endpoint, 0, len(list))
	for _, r := range list {
		eps = append(eps, r.endpoint())
	}
	var enf datapath.PolicyEnforcer
	switch c.Datapath {
	case DatapathIPTables:
		// The iptables datapath's enforcement needs only the network
		// name, not the pod subnet a full Datapath wants.
		pol, err := iptables.NewPolicy(c.Name)
		if err != nil {
			return nil, nil, err
		}
		enf = pol
	default:
		dp, err := c.newDatapath(nil, nil)
		if err != nil {
			return nil, nil, err
		}
		defer closeDatapath(dp)
		enf = enforcer(dp)
	}
	before, after, err = store.New(c.StateDir).Update(c.policyNode(enf, eps), change)
	if err != nil {
		return nil, nil, fmt.Errorf("NetworkPolicy: %w", err)
	}
	return before, after, nil
}

// PolicyEndpoints lists the network's attachments as the policy store
// sees them.
func (c *NetConf) PolicyEndpoints() ([]store.Endpoint, error) {
	eps, err := c.Endpoints()
	if err != nil {
		return nil, err
	}
	return storeEndpoints(eps), nil
}
