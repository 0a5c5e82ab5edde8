package cni

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// checkIfnameFree fails when the pod already has an interface called
// ifname: checked before IPAM so a doomed ADD allocates nothing.
func checkIfnameFree(podNS ns.NetNS, ifname string) error {
	var exists bool
	if err := podNS.Do(func(ns.NetNS) error {
		_, err := netlinksafe.LinkByName(ifname)
		exists = err == nil
		return nil
	}); err != nil {
		return err
	}
	if exists {
		return fmt.Errorf("interface %s already exists in netns %s", ifname, podNS.Path())
	}
	return nil
}

// podLink is the pair created for one attachment.
type podLink struct {
	hostName    string
	hostIfindex int
	hostMAC     net.HardwareAddr
	podMAC      net.HardwareAddr
}

// createVeth makes the veth pair from the node's namespace, with the peer
// created directly inside the pod's namespace under its final name, so no
// half-configured interface is ever visible in the node namespace under
// the pod's name.
func createVeth(podNS ns.NetNS, hostName, ifname string, mtu int, alias string) (*podLink, error) {
	if _, err := netlinksafe.LinkByName(hostName); err == nil {
		return nil, fmt.Errorf("host interface %s already exists (ADD for an attachment that exists)", hostName)
	}

	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostName, MTU: mtu, Alias: alias},
		PeerName:      ifname,
		PeerNamespace: netlink.NsFd(int(podNS.Fd())),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("create veth %s/%s: %w", hostName, ifname, err)
	}
	host, err := netlinksafe.LinkByName(hostName)
	if err != nil {
		return nil, fmt.Errorf("look up new veth %s: %w", hostName, err)
	}
	// Before the link is up, so the node never gives it an IPv6 address
	// or listens to router advertisements on it.
	if err := disableIPv6(hostName); err != nil {
		return nil, err
	}
	// The alias is set separately: not every kernel honours it on create.
	if host.Attrs().Alias != alias {
		if err := netlink.LinkSetAlias(host, alias); err != nil {
			return nil, fmt.Errorf("set alias on %s: %w", hostName, err)
		}
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return nil, fmt.Errorf("set %s up: %w", hostName, err)
	}
	pl := &podLink{hostName: hostName, hostIfindex: host.Attrs().Index, hostMAC: host.Attrs().HardwareAddr}
	err = podNS.Do(func(ns.NetNS) error {
		pod, err := netlinksafe.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("look up %s in pod: %w", ifname, err)
		}
		pl.podMAC = pod.Attrs().HardwareAddr
		return nil
	})
	return pl, err
}

// ipv6ConfDir is where the current network namespace's per-interface IPv6
// sysctls live (/proc/sys/net belongs to the netns of the opening thread).
const ipv6ConfDir = "/proc/sys/net/ipv6/conf"

// disableIPv6 turns IPv6 off on ifname, in the calling thread's network
// namespace. Tern's pods are IPv4 only, and a veth with IPv6 on would
// accept router advertisements a pod sends (making the pod the node's IPv6
// default router) and, with IPv6 forwarding, route a pod's IPv6 past every
// rule. Where disable_ipv6 cannot be set, it falls back to refusing router
// advertisements and forwarding on the interface. A kernel without IPv6
// has nothing to disable.
func disableIPv6(ifname string) error {
	dir := filepath.Join(ipv6ConfDir, ifname)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if _, err := os.Stat(ipv6ConfDir); errors.Is(err, os.ErrNotExist) {
			return nil // no IPv6 in this kernel (or ipv6.disable=1)
		}
	}
	err := os.WriteFile(filepath.Join(dir, "disable_ipv6"), []byte("1"), 0o644)
	if err == nil {
		return nil
	}
	errs := []error{fmt.Errorf("disable IPv6 on %s: %w", ifname, err)}
	for _, name := range []string{"accept_ra", "forwarding", "autoconf"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("0"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("set %s=0 on %s: %w", name, ifname, err))
		}
	}
	if len(errs) == 1 {
		return nil // router advertisements and forwarding are off
	}
	return errors.Join(errs...)
}

// checkIPv6Off reports an error unless ifname is as disableIPv6 leaves
// it: IPv6 disabled, or at least router advertisements and forwarding off.
func checkIPv6Off(ifname string) error {
	dir := filepath.Join(ipv6ConfDir, ifname)
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			return "?"
		}
		return strings.TrimSpace(string(b))
	}
	if _, err := os.Stat(ipv6ConfDir); errors.Is(err, os.ErrNotExist) {
		return nil // no IPv6 in this kernel
	}
	disabled, ra, fwd := read("disable_ipv6"), read("accept_ra"), read("forwarding")
	if disabled == "1" || (ra == "0" && fwd == "0") {
		return nil
	}
	return fmt.Errorf("interface %s has IPv6 on (disable_ipv6=%s, accept_ra=%s, forwarding=%s): a pod could send it router advertisements",
		ifname, disabled, ra, fwd)
}

// deleteHostVeth deletes the pair by its host end; a missing link is fine.
func deleteHostVeth(name string) error {
	lk, err := netlinksafe.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if err := netlink.LinkDel(lk); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// podAddressing is how the pod side is configured.
type podAddressing struct {
	addr   *netlink.Addr // the pod address
	routes []*netlink.Route
	neigh  *netlink.Neigh // permanent gateway entry (eBPF mode)
}

// configurePod applies addressing to ifname inside the pod namespace.
func configurePod(podNS ns.NetNS, ifname string, pa podAddressing) error {
	return podNS.Do(func(ns.NetNS) error {
		lk, err := netlinksafe.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("look up %s in pod: %w", ifname, err)
		}
		if err := disableIPv6(ifname); err != nil {
			return fmt.Errorf("in pod: %w", err)
		}
		if err := netlink.LinkSetUp(lk); err != nil {
			return fmt.Errorf("set %s up: %w", ifname, err)
		}
		pa.addr.LinkIndex = lk.Attrs().Index
		if err := netlink.AddrAdd(lk, pa.addr); err != nil {
			return fmt.Errorf("add address %s to %s: %w", pa.addr.IPNet, ifname, err)
		}
		if pa.neigh != nil {
			pa.neigh.LinkIndex = lk.Attrs().Index
			if err := netlink.NeighSet(pa.neigh); err != nil {
				return fmt.Errorf("add gateway neighbour %s: %w", pa.neigh.IP, err)
			}
		}
		for _, r := range pa.routes {
			r.LinkIndex = lk.Attrs().Index
			if err := netlink.RouteAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("add route %s in pod: %w", r, err)
			}
		}
		return nil
	})
}
