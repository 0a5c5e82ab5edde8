package cni

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/datapath"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/loader"
)

// CmdAdd wires a pod: address, veth pair, datapath, result.
func CmdAdd(args *skel.CmdArgs) error {
	return cniError(cmdAdd(args))
}

func cmdAdd(args *skel.CmdArgs) (err error) {
	tr := newTrace()
	if tr != nil {
		ebpfdp.TraceMark = tr.mark
	}
	defer func() { tr.write("ADD", args.ContainerID, err) }()
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if conf.chained() {
		return cmdAddChained(args, conf)
	}
	k8s, err := parseArgs(args.Args)
	if err != nil {
		return err
	}
	rc, err := parseRuntimeConfig(args.StdinData)
	if err != nil {
		return err
	}
	podNS, err := openPodNS(args.Netns)
	if err != nil {
		return err
	}
	defer podNS.Close()
	if err := checkIfnameFree(podNS, args.IfName); err != nil {
		return err
	}
	if conf.MTU, err = conf.podMTU(); err != nil {
		return err
	}
	tr.mark("setup")

	// Undo completed steps if a later one fails. Undo errors are reported
	// on stderr (stdout carries the CNI error), never silently dropped.
	var undo []func() error
	defer func() {
		if err == nil {
			return
		}
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				fmt.Fprintf(os.Stderr, "tern: undo after failed ADD: %v\n", uerr)
			}
		}
	}()

	ipamRes, err := conf.ipamAdd(args.ContainerID, args.IfName, args.StdinData)
	if err != nil {
		return err
	}
	undo = append(undo, func() error { return conf.ipamDel(args.ContainerID, args.IfName, args.StdinData) })
	tr.mark("ipam")

	ipc, err := podIPv4(ipamRes)
	if err != nil {
		return err
	}
	subnet := &net.IPNet{IP: ipc.Address.IP.Mask(ipc.Address.Mask), Mask: ipc.Address.Mask}
	gateway := ipc.Gateway.To4()
	if gateway == nil {
		// IPAM plugins may omit the gateway: use the subnet's first host,
		// as host-local and the bridge plugin do.
		gateway = firstHost(subnet)
	}

	dp, err := conf.newDatapath(subnet, gateway)
	if err != nil {
		return err
	}
	defer closeDatapath(dp)
	tr.mark("datapath")

	// The pod's own plumbing (veth pair, addresses, routes, the node's
	// route and neighbour entry for it) touches nothing another ADD or DEL
	// does: it is done before the records lock, so parallel ADDs overlap
	// it instead of queueing for it. The address is this pod's alone (a
	// DEL releases it only after its teardown, under the lock), and the
	// pod can send nothing through the datapath before AddEndpoint below.
	hostName := hostVethName(args.ContainerID, args.IfName)
	alias := fmt.Sprintf("tern:%s:%s:%s", conf.Name, args.ContainerID, args.IfName)
	pl, err := createVeth(podNS, hostName, args.IfName, conf.MTU, truncate(alias, 127))
	if err != nil {
		return err
	}
	undo = append(undo, func() error { return deleteHostVeth(hostName) })
	tr.mark("veth")
	if pl.podMAC, err = setPodMAC(podNS, args.IfName, rc.Mac, pl.podMAC); err != nil {
		return err
	}

	podIP := net.IPNet{IP: ipc.Address.IP.To4(), Mask: ipc.Address.Mask}
	ep := &datapath.Endpoint{
		ContainerID:  args.ContainerID,
		IfName:       args.IfName,
		HostVeth:     pl.hostName,
		HostIfindex:  pl.hostIfindex,
		HostMAC:      pl.hostMAC,
		PodMAC:       pl.podMAC,
		IP:           podIP,
		Gateway:      gateway,
		PodNamespace: string(k8s.K8S_POD_NAMESPACE),
		PodName:      string(k8s.K8S_POD_NAME),
		Shaped:       rc.shaped(),
	}
	addressing := conf.podAddressing(ep, ipamRes.Routes)
	if err := configurePod(podNS, args.IfName, addressing); err != nil {
		return err
	}
	if conf.Datapath == DatapathEBPF {
		if err := routeToPod(ep); err != nil {
			return err
		}
	}
	if pp, ok := dp.(podPreparer); ok {
		if err := pp.PreparePod(ep); err != nil {
			return err
		}
	}
	tr.mark("plumbing")

	recs := newRecords(conf.StateDir, conf.Name)
	lock, err := loader.Lock(recs.lockPath())
	if err != nil {
		return err
	}
	defer lock.Unlock()
	tr.mark("locked")

	if err := dp.EnsureNode(); err != nil {
		return fmt.Errorf("prepare node datapath: %w", err)
	}
	tr.mark("ensure")
	others, err := recs.endpointsWithout(args.ContainerID, args.IfName)
	if err != nil {
		return err
	}
	// The node may have lost the other pods' datapath state (pins).
	if err := conf.restoreEndpoints(dp, others); err != nil {
		return err
	}
	tr.mark("restore")

	// NetworkPolicy before forwarding: the rule set in force, with this
	// pod in it, is applied before AddEndpoint lets its first packet
	// through, so a pod that policy isolates is never open.
	if err := conf.syncPolicy(dp, append(others, ep)); err != nil {
		return err
	}
	undo = append(undo, func() error { return conf.syncPolicy(dp, others) })
	tr.mark("policy")

	// Undo registered first: AddEndpoint can fail half way (map entry
	// written, one hook attached), and DelEndpoint removes whatever part
	// of the endpoint exists.
	undo = append(undo, func() error { return dp.DelEndpoint(ep) })
	if err := dp.AddEndpoint(ep); err != nil {
		return fmt.Errorf("add endpoint to datapath: %w", err)
	}
	tr.mark("endpoint")

	rec := &record{
		ContainerID:  args.ContainerID,
		IfName:       args.IfName,
		Netns:        args.Netns,
		Datapath:     conf.Datapath,
		HostVeth:     pl.hostName,
		HostIfindex:  pl.hostIfindex,
		HostMAC:      pl.hostMAC.String(),
		PodMAC:       pl.podMAC.String(),
		IP:           podIP.String(),
		Gateway:      gateway.String(),
		PodNamespace: ep.PodNamespace,
		PodName:      ep.PodName,
		Routes:       ipamRes.Routes,
		Shaped:       ep.Shaped,
	}
	if err := recs.save(rec); err != nil {
		return err
	}
	tr.mark("saved")

	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: pl.hostName, Mac: pl.hostMAC.String()},
			{Name: args.IfName, Mac: pl.podMAC.String(), Sandbox: args.Netns},
		},
		IPs: []*current.IPConfig{{
			Interface: current.Int(1),
			Address:   *addressing.addr.IPNet,
			Gateway:   gateway,
		}},
		DNS: ipamRes.DNS,
	}
	for _, r := range addressing.routes {
		if r.Dst == nil || (r.Gw == nil && r.Scope == netlink.SCOPE_LINK && conf.Datapath == DatapathEBPF && r.Dst.IP.Equal(gateway)) {
			continue // the on-link route to the gateway is plumbing, not a result route
		}
		result.Routes = append(result.Routes, &types.Route{Dst: *r.Dst, GW: r.Gw})
	}
	return types.PrintResult(result, conf.CNIVersion)
}

// podPreparer is a datapath that does part of AddEndpoint's work on the
// pod's own devices before the records lock (datapath/ebpf's PreparePod).
type podPreparer interface {
	PreparePod(ep *datapath.Endpoint) error
}

// openPodNS opens CNI_NETNS and makes sure it is a network namespace that
// can be entered: ns.GetNS accepts any file on procfs or nsfs, such as
// /proc/<pid>/ns/mnt, which would otherwise fail only after IPAM and the
// datapath did their work, and with the wrong error code.
func openPodNS(path string) (ns.NetNS, error) {
	podNS, err := ns.GetNS(path)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("open netns %q", path), err.Error())
	}
	if err := podNS.Do(func(ns.NetNS) error { return nil }); err != nil {
		podNS.Close()
		return nil, types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("enter netns %q", path), err.Error())
	}
	return podNS, nil
}

// podIPv4 picks the IPv4 address of an IPAM result.
func podIPv4(r *current.Result) (*current.IPConfig, error) {
	for _, ipc := range r.IPs {
		if ipc.Address.IP.To4() != nil {
			return ipc, nil
		}
	}
	return nil, fmt.Errorf("IPAM returned no IPv4 address")
}

func firstHost(n *net.IPNet) net.IP {
	ip := make(net.IP, 4)
	copy(ip, n.IP.To4())
	ip[3]++
	return ip
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

var defaultRoute = &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}

// podAddressing decides the pod side. eBPF mode: the address as /32, an
// on-link route to the gateway and a permanent neighbour entry for it that
// points at the host veth, so the pod never ARPs and every packet it sends
// reaches tc ingress of the host veth. iptables mode: the address with its
// subnet prefix on the bridge's L2 segment, default via the bridge.
func (c *NetConf) podAddressing(ep *datapath.Endpoint, ipamRoutes []*types.Route) podAddressing {
	pa := podAddressing{}
	routes := ipamRoutes
	if len(routes) == 0 {
		routes = []*types.Route{{Dst: *defaultRoute}}
	}
	if c.Datapath == DatapathEBPF {
		pa.addr = &netlink.Addr{IPNet: &net.IPNet{IP: ep.IP.IP, Mask: net.CIDRMask(32, 32)}}
		pa.neigh = &netlink.Neigh{
			Family:       unix.AF_INET,
			State:        netlink.NUD_PERMANENT,
			IP:           ep.Gateway,
			HardwareAddr: ep.HostMAC,
		}
		pa.routes = append(pa.routes, &netlink.Route{
			Dst:   &net.IPNet{IP: ep.Gateway, Mask: net.CIDRMask(32, 32)},
			Scope: netlink.SCOPE_LINK,
		})
	} else {
		pa.addr = &netlink.Addr{IPNet: &net.IPNet{IP: ep.IP.IP, Mask: ep.IP.Mask}}
	}
	for _, r := range routes {
		gw := r.GW
		if gw == nil || c.Datapath == DatapathEBPF {
			gw = ep.Gateway // eBPF mode: everything leaves through the gateway
		}
		dst := r.Dst
		pa.routes = append(pa.routes, &netlink.Route{Dst: &dst, Gw: gw})
	}
	return pa
}

// routeToPod makes the node route the pod's /32 to its host veth and know
// its MAC, so the host (and anything it forwards) reaches the pod without
// ARP and without a bridge.
func routeToPod(ep *datapath.Endpoint) error {
	lk, err := netlink.LinkByIndex(ep.HostIfindex)
	if err != nil {
		return fmt.Errorf("look up %s: %w", ep.HostVeth, err)
	}
	if err := netlink.NeighSet(&netlink.Neigh{
		LinkIndex:    lk.Attrs().Index,
		Family:       unix.AF_INET,
		State:        netlink.NUD_PERMANENT,
		IP:           ep.IP.IP,
		HardwareAddr: ep.PodMAC,
	}); err != nil {
		return fmt.Errorf("add neighbour %s on %s: %w", ep.IP.IP, ep.HostVeth, err)
	}
	err = netlink.RouteReplace(&netlink.Route{
		LinkIndex: lk.Attrs().Index,
		Dst:       &net.IPNet{IP: ep.IP.IP, Mask: net.CIDRMask(32, 32)},
		Scope:     netlink.SCOPE_LINK,
	})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add route to %s via %s: %w", ep.IP.IP, ep.HostVeth, err)
	}
	return nil
}
