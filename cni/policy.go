package cni

import (
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/datapath/iptables"
	"github.com/ternlabs/tern/network"
)

// NetworkPolicy on the node: the desired state and the rule set applied to
// each network live in the policy store under the state directory (package
// network binds this configuration to its datapath and the store). ADD
// syncs before the pod can send or receive a packet (the pod gets the
// policy in force from its first packet), DEL after the endpoint is gone
// (a reused IP never inherits the old pod's identity); ternctl and ternd
// change the state through Network().Update and Replace. All of them hold
// the network's attachment lock while they list the endpoints and sync, so
// no sync can miss a pod being added.

// Network binds the configuration to its datapath and the node's policy
// store.
func (c *NetConf) Network() *network.Network {
	n := &network.Network{
		Name:       c.Name,
		Datapath:   c.Datapath,
		StateDir:   c.StateDir,
		AttachLock: newRecords(c.StateDir, c.Name).lockPath(),
		Endpoints:  c.Endpoints,
		OpenEnforcer: func() (datapath.PolicyEnforcer, func(), error) {
			return c.openEnforcer(nil)
		},
		BalanceServices: c.Services == ServicesEBPF,
	}
	if c.pool != nil {
		n.Gateway = c.pool.Gateway
	}
	return n
}

// openEnforcer returns the network's policy enforcement: dp's when it has
// one, else a new handle on the datapath. The iptables datapath's
// enforcement needs only the network name, not the pod subnet a full
// Datapath wants, so it works for DEL without a record too.
func (c *NetConf) openEnforcer(dp datapath.Datapath) (datapath.PolicyEnforcer, func(), error) {
	if dp != nil {
		return enforcer(dp), func() {}, nil
	}
	if c.Datapath == DatapathIPTables {
		pol, err := iptables.NewPolicy(c.Name)
		if err != nil {
			return nil, nil, err
		}
		return pol, func() {}, nil
	}
	dp, err := c.newDatapath(nil, nil)
	if err != nil {
		return nil, nil, err
	}
	return enforcer(dp), func() { closeDatapath(dp) }, nil
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
	return c.Network().Sync(enforcer(dp), eps)
}

// syncPolicyAfterDel is syncPolicy for DEL. dp may be nil (DEL without a
// record, when the iptables datapath's subnet is unknown); the iptables
// enforcement needs only the network name. A datapath without enforcement
// has nothing to withdraw.
func (c *NetConf) syncPolicyAfterDel(dp datapath.Datapath, eps []*datapath.Endpoint) error {
	enf := enforcer(dp)
	if enf == nil && c.Datapath == DatapathIPTables {
		e, _, err := c.openEnforcer(nil)
		if err != nil {
			return err
		}
		enf = e
	}
	if enf == nil {
		return nil
	}
	return c.Network().Sync(enf, eps)
}

// endpointsWithout returns the datapath endpoints of the network's records
// but the attachment (containerID, ifname): the pods an ADD of that
// attachment finds already there (a record of its own is a retried ADD's).
func (rs records) endpointsWithout(containerID, ifname string) ([]*datapath.Endpoint, error) {
	existing, err := rs.list()
	if err != nil {
		return nil, err
	}
	out := make([]*datapath.Endpoint, 0, len(existing)+1)
	for _, r := range existing {
		if r.ContainerID != containerID || r.IfName != ifname {
			out = append(out, r.endpoint())
		}
	}
	return out, nil
}
