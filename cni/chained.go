package cni

import (
	"fmt"
	"net"
	"os"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
)

// Chained mode ("mode": "chained"): another plugin earlier in the conflist
// (ptp, bridge, ...) created the pod's veth and gave it its address; Tern
// reads prevResult, finds the host side of that veth and the pod's IPv4
// address, and adds its datapath there (NetworkPolicy, anti-spoofing,
// counters, and SNAT only when ipMasq is set) without touching the
// interfaces, addresses or routes it was given. It allocates nothing, so
// it takes no ipam section, and DEL, CHECK and GC leave the other plugin's
// state alone. eBPF datapath only: the iptables datapath is built around
// its own bridge.

// Modes of a network configuration.
const (
	ModeStandalone = "standalone"
	ModeChained    = "chained"
)

func (c *NetConf) chained() bool { return c.Mode == ModeChained }

// parseMode validates mode and what it implies.
func (c *NetConf) parseMode() error {
	switch c.Mode {
	case "", ModeStandalone:
		c.Mode = ModeStandalone
		return nil
	case ModeChained:
	default:
		return fieldErr("mode", "%q is not one of %q, %q", c.Mode, ModeStandalone, ModeChained)
	}
	if c.Datapath != DatapathEBPF {
		return fieldErr("mode", "chained mode needs the eBPF datapath (the iptables datapath wires pods to its own bridge)")
	}
	if c.IPAM.Type != "" {
		return fieldErr("ipam", "chained mode takes no ipam section: the plugin before tern allocates the address")
	}
	return nil
}

// chainedPod is what Tern finds of a pod wired by the plugin before it.
type chainedPod struct {
	ip      net.IPNet
	gateway net.IP
	podMAC  net.HardwareAddr
	host    *net.Interface // host side of the pod's veth, in the node namespace
}

// findChainedPod reads prevResult for the interface args.IfName inside the
// sandbox and its IPv4 address, and follows the veth to its host side.
func findChainedPod(conf *NetConf, podNS ns.NetNS, ifname string) (*chainedPod, *current.Result, error) {
	if conf.PrevResult == nil {
		return nil, nil, fieldErr("prevResult", "missing: in chained mode tern follows a plugin that creates the interface (ptp, bridge, ...)")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return nil, nil, fieldErr("prevResult", "%v", err)
	}
	idx := -1
	for i, iface := range prev.Interfaces {
		if iface.Name == ifname && iface.Sandbox != "" {
			idx = i
		}
	}
	if idx < 0 {
		return nil, nil, fieldErr("prevResult", "no interface %s inside the sandbox", ifname)
	}
	var p chainedPod
	for _, ipc := range prev.IPs {
		if ipc.Interface != nil && *ipc.Interface == idx && ipc.Address.IP.To4() != nil {
			p.ip = net.IPNet{IP: ipc.Address.IP.To4(), Mask: ipc.Address.Mask}
			p.gateway = ipc.Gateway.To4()
			break
		}
	}
	if p.ip.IP == nil {
		return nil, nil, fieldErr("prevResult", "no IPv4 address for interface %s", ifname)
	}
	if p.gateway == nil {
		p.gateway = firstHost(&net.IPNet{IP: p.ip.IP.Mask(p.ip.Mask), Mask: p.ip.Mask})
	}
	var peer int
	err = podNS.Do(func(ns.NetNS) error {
		lk, err := netlinksafe.LinkByName(ifname)
		if err != nil {
			return err
		}
		if lk.Type() != "veth" {
			return fmt.Errorf("is a %s, not a veth", lk.Type())
		}
		p.podMAC = lk.Attrs().HardwareAddr
		// The peer's ifindex is IFLA_LINK (ParentIndex), as
		// plugins/pkg/ip.GetVethPeerIfindex reads it on every kernel
		// Tern runs on; not importing that package keeps its
		// dependencies' init (knftables, go-iptables) out of every
		// exec of the plugin.
		if peer = lk.Attrs().ParentIndex; peer <= 0 {
			return fmt.Errorf("veth without a peer ifindex (IFLA_LINK)")
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("chained mode: pod interface %s: %w", ifname, err)
	}
	if p.host, err = net.InterfaceByIndex(peer); err != nil {
		return nil, nil, fmt.Errorf("chained mode: host side (ifindex %d) of pod interface %s is not in this namespace: %w", peer, ifname, err)
	}
	return &p, prev, nil
}

// cmdAddChained attaches the datapath to the pod the previous plugin
// wired and passes its result on unchanged.
func cmdAddChained(args *skel.CmdArgs, conf *NetConf) (err error) {
	k8s, err := parseArgs(args.Args)
	if err != nil {
		return err
	}
	// Bandwidth limits for a bandwidth plugin after Tern (README,
	// Chaining): the pod's traffic must go through its veth's qdiscs.
	rc, err := parseRuntimeConfig(args.StdinData)
	if err != nil {
		return err
	}
	podNS, err := openPodNS(args.Netns)
	if err != nil {
		return err
	}
	defer podNS.Close()
	p, prev, err := findChainedPod(conf, podNS, args.IfName)
	if err != nil {
		return err
	}

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

	dp, err := conf.newDatapath(&net.IPNet{IP: p.ip.IP.Mask(p.ip.Mask), Mask: p.ip.Mask}, p.gateway)
	if err != nil {
		return err
	}
	defer closeDatapath(dp)
	recs := newRecords(conf.StateDir, conf.Name)
	lock, err := loader.Lock(recs.lockPath())
	if err != nil {
		return err
	}
	defer lock.Unlock()
	if err := dp.EnsureNode(); err != nil {
		return fmt.Errorf("prepare node datapath: %w", err)
	}

	ep := &datapath.Endpoint{
		ContainerID:  args.ContainerID,
		IfName:       args.IfName,
		HostVeth:     p.host.Name,
		HostIfindex:  p.host.Index,
		HostMAC:      p.host.HardwareAddr,
		PodMAC:       p.podMAC,
		IP:           p.ip,
		Gateway:      p.gateway,
		PodNamespace: string(k8s.K8S_POD_NAMESPACE),
		PodName:      string(k8s.K8S_POD_NAME),
		Shaped:       rc.shaped(),
	}
	others, err := recs.endpointsWithout(args.ContainerID, args.IfName)
	if err != nil {
		return err
	}
	if err := conf.syncPolicy(dp, append(others, ep)); err != nil {
		return err
	}
	undo = append(undo, func() error { return conf.syncPolicy(dp, others) })
	if err := dp.AddEndpoint(ep); err != nil {
		return fmt.Errorf("add endpoint to datapath: %w", err)
	}
	undo = append(undo, func() error { return dp.DelEndpoint(ep) })

	rec := &record{
		ContainerID:  args.ContainerID,
		IfName:       args.IfName,
		Netns:        args.Netns,
		Datapath:     conf.Datapath,
		Chained:      true,
		HostVeth:     ep.HostVeth,
		HostIfindex:  ep.HostIfindex,
		HostMAC:      ep.HostMAC.String(),
		PodMAC:       ep.PodMAC.String(),
		IP:           ep.IP.String(),
		Gateway:      ep.Gateway.String(),
		PodNamespace: ep.PodNamespace,
		PodName:      ep.PodName,
		Shaped:       ep.Shaped,
	}
	if err := recs.save(rec); err != nil {
		return err
	}
	return types.PrintResult(prev, conf.CNIVersion)
}

// checkChainedPod runs in the pod's netns: the interface is still the one
// Tern attached to (its MAC is in the endpoint map).
func checkChainedPod(ifname string, ep *datapath.Endpoint) error {
	lk, err := netlinksafe.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("pod interface %s is missing: %w", ifname, err)
	}
	if lk.Attrs().HardwareAddr.String() != ep.PodMAC.String() {
		return fmt.Errorf("pod interface %s has MAC %s, recorded %s", ifname, lk.Attrs().HardwareAddr, ep.PodMAC)
	}
	return nil
}
