package iptables

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"

	"github.com/ternlabs/tern/datapath"
)

// Anti-spoofing and L2 isolation, in an nftables table of the bridge family
// per network (tern_<hash>): it sees every frame a pod sends, at bridge
// prerouting, before br_netfilter hands IPv4 to iptables and before the
// bridge forwards or delivers anything, so it needs no br_netfilter and
// covers what iptables never sees (ARP, IPv6, other ethertypes).
//
//	table bridge tern_<hash> {
//		map ports { type ifname : verdict }       host veth -> jump its chain
//		chain pre { hook prerouting priority -300; iifname vmap @ports }
//		chain port_<veth> {                         one per pod
//			ether saddr != <pod MAC> drop
//			ip daddr 127.0.0.0/8 drop                   (the node's localhost, CVE-2020-8558)
//			ip saddr <pod IP> accept                    (IPv4 from the pod's address)
//			arp … saddr ether <pod MAC> saddr ip <pod IP> accept
//			drop                                        (forged IPv4 or ARP, IPv6, anything else)
//		}
//	}
//
// So a pod can neither send from another pod's address nor the gateway's
// (which iptables would police as someone else, or not at all), nor poison
// ARP caches, nor talk IPv6 (link-local) to the other pods of the bridge,
// which no IPv4 rule would ever see. A port's chain and map element are in
// place before the veth joins the bridge, so no frame of the pod is bridged
// unchecked.

const nftBin = "nft"

// nftTable is the name of a network's bridge table.
func nftTable(network string) string { return "tern_" + networkHash(network) }

// portChain is the chain of one host veth.
func portChain(hostVeth string) string { return "port_" + hostVeth }

// antispoofTableScript declares the table, its map and its base chain.
// Every line is idempotent ("add" of what exists is a no-op; the base
// chain's one rule is flushed and added again in the same transaction, so
// it never doubles and is never missing), so ADD needs no check first.
func (d *Datapath) antispoofTableScript() string {
	t := d.nftTable
	return fmt.Sprintf("add table bridge %s\n", t) +
		fmt.Sprintf("add map bridge %s ports { type ifname : verdict; }\n", t) +
		fmt.Sprintf("add chain bridge %s pre { type filter hook prerouting priority -300; policy accept; }\n", t) +
		fmt.Sprintf("flush chain bridge %s pre\n", t) +
		fmt.Sprintf("add rule bridge %s pre iifname vmap @ports\n", t)
}

// addAntispoof installs the table when missing, and the endpoint's chain
// and map element, replacing what an earlier endpoint of the same veth name
// left, in one nft transaction (one process: ADD's cost is mostly process
// starts).
func (d *Datapath) addAntispoof(ep *datapath.Endpoint) error {
	ip := ep.IP.IP.To4()
	if ip == nil {
		return fmt.Errorf("anti-spoofing for %s: pod address %v is not IPv4", ep.HostVeth, ep.IP.IP)
	}
	if len(ep.PodMAC) != 6 {
		return fmt.Errorf("anti-spoofing for %s: pod MAC %q is not an Ethernet address", ep.HostVeth, ep.PodMAC)
	}
	unlock, err := lockIptables()
	if err != nil {
		return err
	}
	defer unlock()
	t, c, mac := d.nftTable, portChain(ep.HostVeth), ep.PodMAC.String()
	var b strings.Builder
	b.WriteString(d.antispoofTableScript())
	fmt.Fprintf(&b, "add chain bridge %s %s\n", t, c)
	fmt.Fprintf(&b, "flush chain bridge %s %s\n", t, c)
	fmt.Fprintf(&b, "add rule bridge %s %s ether saddr != %s counter drop\n", t, c, mac)
	// The node's loopback range, which no pod may reach: with
	// route_localnet=1 (kube-proxy sets it) the node would accept it
	// from the bridge and expose its localhost-only services
	// (CVE-2020-8558).
	fmt.Fprintf(&b, "add rule bridge %s %s ip daddr 127.0.0.0/8 counter drop\n", t, c)
	fmt.Fprintf(&b, "add rule bridge %s %s ip saddr %s accept\n", t, c, ip)
	fmt.Fprintf(&b, "add rule bridge %s %s arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether %s arp saddr ip %s accept\n", t, c, mac, ip)
	fmt.Fprintf(&b, "add rule bridge %s %s counter drop\n", t, c)
	// A veth name always maps to the same chain, so adding an element
	// that exists is a no-op, not a conflict.
	fmt.Fprintf(&b, "add element bridge %s ports { %q : jump %s }\n", t, ep.HostVeth, c)
	return runNft(b.String())
}

// delAntispoof removes the endpoint's map element and chain in one
// transaction. The element is added first so that its delete cannot fail
// when only the chain is left; when the table or the chain is gone the
// transaction fails with ENOENT as a whole, which means nothing of the
// endpoint is left.
func (d *Datapath) delAntispoof(hostVeth string) error {
	unlock, err := lockIptables()
	if err != nil {
		return err
	}
	defer unlock()
	t, c := d.nftTable, portChain(hostVeth)
	script := fmt.Sprintf("add element bridge %s ports { %q : jump %s }\n", t, hostVeth, c) +
		fmt.Sprintf("delete element bridge %s ports { %q }\n", t, hostVeth) +
		fmt.Sprintf("delete chain bridge %s %s\n", t, c)
	if err := runNft(script); err != nil && !strings.Contains(err.Error(), "No such file or directory") {
		return err
	}
	return nil
}

// checkAntispoof reports a missing table, chain or map element.
func (d *Datapath) checkAntispoof(hostVeth string) error {
	ok, err := nftExists("chain", "bridge", d.nftTable, portChain(hostVeth))
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("anti-spoofing chain %s of host veth %s is missing from nftables table bridge %s", portChain(hostVeth), hostVeth, d.nftTable)
	}
	out, err := nftOutput("list", "map", "bridge", d.nftTable, "ports")
	if err != nil {
		return err
	}
	if !strings.Contains(out, fmt.Sprintf("%q : jump %s", hostVeth, portChain(hostVeth))) {
		return fmt.Errorf("anti-spoofing: host veth %s has no element in map ports of nftables table bridge %s", hostVeth, d.nftTable)
	}
	return nil
}

// removeAntispoofTable deletes the network's bridge table (callers hold
// the iptables lock).
func (d *Datapath) removeAntispoofTable() error {
	ok, err := nftExists("table", "bridge", d.nftTable)
	if err != nil || !ok {
		return err
	}
	return runNft(fmt.Sprintf("delete table bridge %s\n", d.nftTable))
}

// nftExists lists an object; nft exits 1 when it does not exist.
func nftExists(kind string, args ...string) (bool, error) {
	_, err := nftOutput(append([]string{"list", kind}, args...)...)
	if err == nil {
		return true, nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 1 {
		return false, nil
	}
	return false, err
}

func nftOutput(args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(nftBin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("nft %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// runNft applies a script in one transaction (nft -f is atomic).
func runNft(script string) error {
	cmd := exec.Command(nftBin, "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft -f: %w: %s (input:\n%s)", err, strings.TrimSpace(string(out)), script)
	}
	return nil
}

// SweepAntispoof removes the anti-spoofing chains and map elements of a
// network's host veths that are not in keep (GC: veths deleted without a
// DEL, found only by their alias). A network without a table has nothing
// to sweep.
func SweepAntispoof(network string, keep []string) error {
	d := &Datapath{nftTable: nftTable(network)}
	out, err := nftOutput("list", "map", "bridge", d.nftTable, "ports")
	if err != nil {
		if ok, xerr := nftExists("table", "bridge", d.nftTable); xerr == nil && !ok {
			return nil
		}
		return err
	}
	var errs []error
	for _, veth := range mapVeths(out) {
		if slices.Contains(keep, veth) {
			continue
		}
		if err := d.delAntispoof(veth); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// mapVeths extracts the interface names of `nft list map … ports` output
// (elements `"<veth>" : jump port_<veth>`).
func mapVeths(out string) []string {
	var veths []string
	parts := strings.Split(out, `"`)
	for i := 1; i+1 < len(parts); i += 2 {
		name := parts[i]
		if strings.HasPrefix(strings.TrimSpace(parts[i+1]), ": jump "+portChain(name)) {
			veths = append(veths, name)
		}
	}
	return veths
}
