package cni

import (
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/network"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/store"
)

// PolicyView is the node's NetworkPolicy picture as the datapath got it,
// for ternctl monitor and explain: the endpoints of the network, the
// desired state, the topology policy is computed on (the same one ADD,
// DEL and apply compile from), and the rule set last applied.
type PolicyView struct {
	Endpoints []*datapath.Endpoint
	State     *manifest.State
	Topology  *policy.Topology
	Applied   *compile.RuleSet // nil when no rule set is applied
}

// PolicyView reads the network's endpoints and policy state. It takes no
// lock: it is a snapshot for display, and may be a moment old.
func (c *NetConf) PolicyView() (*PolicyView, error) {
	eps, err := c.Endpoints()
	if err != nil {
		return nil, err
	}
	s := store.New(c.StateDir)
	st, err := s.State()
	if err != nil {
		return nil, err
	}
	hosts, err := c.Network().Hosts(eps)
	if err != nil {
		return nil, err
	}
	applied, err := s.Applied(c.Name)
	if err != nil {
		return nil, err
	}
	return &PolicyView{
		Endpoints: eps,
		State:     st,
		Topology:  store.Topology(st, network.StoreEndpoints(eps), hosts),
		Applied:   applied,
	}, nil
}
