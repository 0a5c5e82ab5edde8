package cni

import (
	"net"

	"github.com/ternlabs/tern/datapath"
)

// RemoteTable returns the network's table of other nodes' pod CIDRs (the
// eBPF datapath's, built as CNI commands build it, so the node agent's
// routing writes into the very maps the pods' programs read), and a
// function that releases its handles. It is nil for the iptables
// datapath, whose cross-node traffic follows kernel routes alone.
func (c *NetConf) RemoteTable() (datapath.RemoteTable, func(), error) {
	if c.Datapath != DatapathEBPF {
		return nil, func() {}, nil
	}
	var subnet *net.IPNet
	if c.pool != nil {
		subnet = &c.pool.Subnet
	}
	dp, err := c.newDatapath(subnet, nil)
	if err != nil {
		return nil, nil, err
	}
	t, ok := dp.(datapath.RemoteTable)
	if !ok {
		closeDatapath(dp)
		return nil, func() {}, nil
	}
	return t, func() { closeDatapath(dp) }, nil
}
