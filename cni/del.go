package cni

import (
	"errors"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
	"github.com/ternlabs/tern/policy/store"
)

// CmdDel undoes ADD. It is idempotent and best-effort: the netns, the veth,
// the record or the IP may already be gone, and the IP is released even
// when everything else failed.
func CmdDel(args *skel.CmdArgs) error {
	return cniError(cmdDel(args))
}

func cmdDel(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	var errs []error
	if err := conf.teardown(args.ContainerID, args.IfName); err != nil {
		errs = append(errs, err)
	}
	if err := conf.ipamDel(args.ContainerID, args.IfName, args.StdinData); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// teardown removes everything of one attachment but its IP: datapath
// state, the veth pair, the record, and node state when it was the last.
func (c *NetConf) teardown(containerID, ifname string) error {
	recs := newRecords(c.StateDir, c.Name)
	lock, err := loader.Lock(recs.lockPath())
	if err != nil {
		return err
	}
	defer lock.Unlock()

	rec, err := recs.load(containerID, ifname)
	if err != nil {
		return err
	}
	ep := &datapath.Endpoint{ContainerID: containerID, IfName: ifname, HostVeth: hostVethName(containerID, ifname)}
	if rec != nil {
		ep = rec.endpoint()
	}

	var errs []error
	// The veth goes first: deleting a device takes its programs off with
	// it (TCX links are severed, the clsact qdisc and its filters go), so
	// DelEndpoint need not detach them one by one first, each detach of a
	// TCX link waiting for an RCU grace period with the RTNL held
	// (docs/cni-add-profile.md); and from here on nothing the pod sends
	// reaches the node, so the map and NAT state DelEndpoint removes next
	// cannot be recreated by the pod's traffic. A chained attachment's veth
	// belongs to the plugin that made it: its programs are detached.
	if rec == nil || !rec.Chained {
		if err := deleteHostVeth(ep.HostVeth); err != nil {
			errs = append(errs, err)
		}
	}
	dp, err := c.newDatapath(subnetOf(ep), ep.Gateway)
	if err != nil {
		dp = nil // not a typed nil pointer: no datapath
		if rec != nil {
			errs = append(errs, err)
		}
		// Without a record there is no endpoint state to find: nothing to do.
	} else {
		defer closeDatapath(dp)
		if err := dp.DelEndpoint(ep); err != nil {
			errs = append(errs, fmt.Errorf("remove endpoint from datapath: %w", err))
		}
	}
	if len(errs) > 0 {
		// Keep the record so a retried DEL or GC can finish the job.
		return errors.Join(errs...)
	}
	if err := recs.remove(containerID, ifname); err != nil {
		return err
	}
	left, err := recs.list()
	if err != nil {
		return err
	}
	// Withdraw the pod from NetworkPolicy now that it is gone, before its
	// IP can go to another pod.
	eps := make([]*datapath.Endpoint, 0, len(left))
	for _, r := range left {
		eps = append(eps, r.endpoint())
	}
	if err := c.syncPolicyAfterDel(dp, eps); err != nil {
		return err
	}
	if dp != nil {
		if err := dp.ReleaseNode(len(left)); err != nil {
			return fmt.Errorf("release node datapath: %w", err)
		}
		if len(left) == 0 {
			// ReleaseNode took the network's policy state with it.
			if err := store.New(c.StateDir).Forget(c.Name); err != nil {
				return err
			}
		}
	}
	return nil
}

func subnetOf(ep *datapath.Endpoint) *net.IPNet {
	if ep.IP.IP == nil {
		return nil
	}
	return &net.IPNet{IP: ep.IP.IP.Mask(ep.IP.Mask), Mask: ep.IP.Mask}
}
