package cni

import (
	"net"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
)

// CmdStatus reports whether ADD can be served: the datapath is loaded or
// loadable and IPAM has addresses left.
func CmdStatus(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return cniError(err)
	}
	if err := conf.datapathStatus(); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "datapath not available", err.Error())
	}
	if err := conf.ipamStatus(args.StdinData); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "no addresses available", err.Error())
	}
	return nil
}

func (c *NetConf) datapathStatus() error {
	subnet, gateway := (*net.IPNet)(nil), net.IP(nil)
	if c.Datapath == DatapathIPTables && c.pool == nil {
		// The bridge's address comes from the first pod's IPAM result; a
		// placeholder lets Status check the tools without it.
		subnet, gateway = defaultRoute, firstHost(defaultRoute)
	}
	dp, err := c.newDatapath(subnet, gateway)
	if err != nil {
		return err
	}
	defer closeDatapath(dp)
	return dp.Status()
}
