package cni

import (
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/skel"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/datapath"
)

// CmdCheck verifies that the attachment is wired as ADD left it.
func CmdCheck(args *skel.CmdArgs) error {
	return cniError(cmdCheck(args))
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	rec, err := newRecords(conf.StateDir, conf.Name).load(args.ContainerID, args.IfName)
	if err != nil {
		return err
	}
	if rec == nil {
		return fmt.Errorf("no attachment %s/%s in network %s", args.ContainerID, args.IfName, conf.Name)
	}
	ep := rec.endpoint()
	if ep.IP.IP == nil {
		return fmt.Errorf("attachment record of %s/%s has no IP", args.ContainerID, args.IfName)
	}
	if conf.PrevResult != nil {
		prev, err := current.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return fmt.Errorf("parse prevResult: %w", err)
		}
		if err := matchPrevResult(prev, ep.IP.IP); err != nil {
			return err
		}
	}
	if err := conf.ipamCheck(args.ContainerID, args.IfName, args.StdinData, ep.IP.IP); err != nil {
		return err
	}

	host, err := netlinksafe.LinkByName(ep.HostVeth)
	if err != nil {
		return fmt.Errorf("host veth %s is missing: %w", ep.HostVeth, err)
	}
	if host.Attrs().Index != ep.HostIfindex {
		return fmt.Errorf("host veth %s was recreated (ifindex %d, recorded %d)", ep.HostVeth, host.Attrs().Index, ep.HostIfindex)
	}
	if host.Attrs().OperState == netlink.OperDown {
		return fmt.Errorf("host veth %s is down", ep.HostVeth)
	}
	if err := checkIPv6Off(ep.HostVeth); err != nil {
		return err
	}
	if conf.IsEBPF() && !ep.Shaped {
		if err := checkShaping(host); err != nil {
			return err
		}
	}

	podNS, err := openPodNS(args.Netns)
	if err != nil {
		return err
	}
	defer podNS.Close()
	check := func(ns.NetNS) error { return checkPod(args.IfName, ep, conf.podAddressing(ep, rec.Routes)) }
	if rec.Chained {
		// Addresses and routes are the previous plugin's to check.
		check = func(ns.NetNS) error { return checkChainedPod(args.IfName, ep) }
	}
	if err := podNS.Do(check); err != nil {
		return err
	}

	dp, err := conf.newDatapath(subnetOf(ep), ep.Gateway)
	if err != nil {
		return err
	}
	defer closeDatapath(dp)
	return dp.CheckEndpoint(ep)
}

func matchPrevResult(prev *current.Result, ip net.IP) error {
	for _, ipc := range prev.IPs {
		if ipc.Address.IP.Equal(ip) {
			return nil
		}
	}
	return fmt.Errorf("prevResult does not hold the pod's address %s", ip)
}

// checkPod runs inside the pod's netns: interface, address, routes and
// (eBPF mode) the gateway's neighbour entry must be as ADD made them.
func checkPod(ifname string, ep *datapath.Endpoint, want podAddressing) error {
	lk, err := netlinksafe.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("pod interface %s is missing: %w", ifname, err)
	}
	if ep.PodMAC != nil && lk.Attrs().HardwareAddr.String() != ep.PodMAC.String() {
		return fmt.Errorf("pod interface %s has MAC %s, recorded %s", ifname, lk.Attrs().HardwareAddr, ep.PodMAC)
	}
	addrs, err := netlinksafe.AddrList(lk, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", ifname, err)
	}
	found := false
	for _, a := range addrs {
		if a.IPNet.String() == want.addr.IPNet.String() {
			found = true
		}
	}
	if !found {
		return fmt.Errorf("pod interface %s lacks address %s", ifname, want.addr.IPNet)
	}
	// Every table: a plugin chained after Tern may move the routes into a
	// table of their own (sbr: one per interface, chosen by source
	// address); they are still the routes ADD made.
	routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{LinkIndex: lk.Attrs().Index, Table: unix.RT_TABLE_UNSPEC},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list routes of %s: %w", ifname, err)
	}
	for _, w := range want.routes {
		if !hasRoute(routes, w) {
			return fmt.Errorf("pod route %s via %v on %s is missing", w.Dst, w.Gw, ifname)
		}
	}
	if want.neigh != nil {
		neighs, err := netlink.NeighList(lk.Attrs().Index, netlink.FAMILY_V4)
		if err != nil {
			return fmt.Errorf("list neighbours of %s: %w", ifname, err)
		}
		ok := false
		for _, n := range neighs {
			if n.IP.Equal(want.neigh.IP) && n.HardwareAddr.String() == want.neigh.HardwareAddr.String() && n.State&netlink.NUD_PERMANENT != 0 {
				ok = true
			}
		}
		if !ok {
			return fmt.Errorf("permanent neighbour entry for gateway %s on %s is missing", want.neigh.IP, ifname)
		}
	}
	return nil
}

func hasRoute(routes []netlink.Route, w *netlink.Route) bool {
	for _, r := range routes {
		dst := r.Dst
		if dst == nil {
			dst = defaultRoute
		}
		if dst.String() == w.Dst.String() && r.Gw.Equal(w.Gw) {
			return true
		}
	}
	return false
}
