package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
)

// verifier proves that a path is the path it claims to be. A path that
// fails it is reported as failed, loudly, and measured no further: a
// number for "ebpf" that went through netfilter would be a lie.
type verifier interface {
	// setup checks the structure once the pods are wired and returns a
	// description of each check that passed.
	setup(ctx context.Context) ([]string, error)
	// before is called before every traffic sample, after after it.
	before(ctx context.Context) error
	after(ctx context.Context) error
}

// limitVerifier: no bridge, no netfilter rule, no BPF program.
type limitVerifier struct{ t *Topology }

func (v *limitVerifier) setup(ctx context.Context) ([]string, error) {
	links, err := v.t.Node.nl.LinkList()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		if l.Type() == "bridge" {
			return nil, fmt.Errorf("bridge %s in the node netns", l.Attrs().Name)
		}
	}
	for _, p := range []*Pod{v.t.Client, v.t.Server} {
		progs, err := hostVethPrograms(v.t.Node, p.HostIfindex)
		if err != nil {
			return nil, err
		}
		if len(progs) > 0 {
			return nil, fmt.Errorf("BPF programs on %s: %s", p.HostVeth, strings.Join(progs, ", "))
		}
	}
	if err := v.after(ctx); err != nil {
		return nil, err
	}
	return []string{
		"no bridge in the node netns",
		"no BPF program on the host veths",
		"no netfilter rule in the node netns (iptables-save, nft list ruleset)",
		fmt.Sprintf("host routes %s/32 dev %s, %s/32 dev %s", v.t.Client.IP, v.t.Client.HostVeth, v.t.Server.IP, v.t.Server.HostVeth),
	}, nil
}

func (v *limitVerifier) before(context.Context) error { return nil }

func (v *limitVerifier) after(ctx context.Context) error {
	rules, err := netfilterRules(ctx, v.t.Node)
	if err != nil {
		return err
	}
	if len(rules) > 0 {
		return fmt.Errorf("netfilter rules appeared in the node netns: %s", strings.Join(rules, "; "))
	}
	return nil
}

// referenceVerifier: the bridge exists and both host veths are its ports.
type referenceVerifier struct {
	t      *Topology
	bridge string
}

func (v *referenceVerifier) setup(context.Context) ([]string, error) {
	if err := v.check(); err != nil {
		return nil, err
	}
	return []string{fmt.Sprintf("bridge %s with ports %s and %s", v.bridge, v.t.Client.HostVeth, v.t.Server.HostVeth)}, nil
}

func (v *referenceVerifier) check() error {
	br, err := v.t.Node.nl.LinkByName(v.bridge)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", v.bridge, err)
	}
	if br.Type() != "bridge" {
		return fmt.Errorf("%s is a %s, not a bridge", v.bridge, br.Type())
	}
	for _, p := range []*Pod{v.t.Client, v.t.Server} {
		l, err := v.t.Node.nl.LinkByIndex(p.HostIfindex)
		if err != nil {
			return err
		}
		if l.Attrs().MasterIndex != br.Attrs().Index {
			return fmt.Errorf("host veth %s of pod %s is not a port of bridge %s", p.HostVeth, p.Name, v.bridge)
		}
	}
	return nil
}

func (v *referenceVerifier) before(context.Context) error { return nil }
func (v *referenceVerifier) after(context.Context) error  { return v.check() }

// ebpfVerifier: a tc ingress program on each host veth, and two counting
// rules (client→server, server→client) at the top of the node's FORWARD
// chain that must stay at zero packets: traffic redirected pod to pod by
// BPF never reaches netfilter.
type ebpfVerifier struct {
	t       *Topology
	comment string
}

func (v *ebpfVerifier) setup(ctx context.Context) ([]string, error) {
	var checks []string
	for _, p := range []*Pod{v.t.Client, v.t.Server} {
		progs, err := hostVethPrograms(v.t.Node, p.HostIfindex)
		if err != nil {
			return nil, err
		}
		if len(progs) == 0 {
			return nil, fmt.Errorf("no tc ingress BPF program on host veth %s (ifindex %d) of pod %s", p.HostVeth, p.HostIfindex, p.Name)
		}
		checks = append(checks, fmt.Sprintf("%s: %s", p.HostVeth, strings.Join(progs, ", ")))
	}
	c, s := v.t.Client.IP.String(), v.t.Server.IP.String()
	for _, pair := range [][2]string{{c, s}, {s, c}} {
		if _, err := v.t.Node.Run(ctx, "iptables", "-w", "5", "-I", "FORWARD", "1", "-s", pair[0]+"/32", "-d", pair[1]+"/32",
			"-m", "comment", "--comment", v.comment); err != nil {
			return nil, fmt.Errorf("insert FORWARD counting rule: %w", err)
		}
	}
	checks = append(checks, "FORWARD counting rules client↔server stay at 0 packets after every traffic sample")
	return checks, nil
}

func (v *ebpfVerifier) before(context.Context) error { return nil }

func (v *ebpfVerifier) after(ctx context.Context) error {
	out, err := v.t.Node.Run(ctx, "iptables-save", "-c", "-t", "filter")
	if err != nil {
		return err
	}
	_, rules := parseIptablesSave(string(out))
	found := 0
	var pkts uint64
	for _, r := range rules {
		if r.Chain == "FORWARD" && strings.Contains(r.Spec, v.comment) {
			found++
			pkts += r.Packets
		}
	}
	if found != 2 {
		return fmt.Errorf("ebpf path check: %d of the 2 FORWARD counting rules left (something rewrote FORWARD)", found)
	}
	if pkts != 0 {
		return fmt.Errorf("ebpf path check: %d packets between the pods went through the node's netfilter FORWARD chain; the eBPF datapath did not redirect them", pkts)
	}
	return nil
}

// iptablesVerifier: Tern's TERN-FWD-* chains exist, FORWARD jumps to
// them, and their counters grow during every traffic sample.
type iptablesVerifier struct {
	t    *Topology
	last uint64
}

func (v *iptablesVerifier) setup(ctx context.Context) ([]string, error) {
	chains, jumps, _, err := v.counters(ctx)
	if err != nil {
		return nil, err
	}
	if len(chains) == 0 {
		return nil, errors.New("no TERN-FWD-* chain in the node netns filter table")
	}
	if len(jumps) == 0 {
		return nil, fmt.Errorf("FORWARD does not jump to %s", strings.Join(chains, ", "))
	}
	return []string{
		"FORWARD → " + strings.Join(chains, ", "),
		"TERN-FWD-* packet counters grow during every traffic sample",
	}, nil
}

// counters returns Tern's forward chains, the FORWARD rules that jump to
// them, and the packets counted by those jumps and the chains' rules.
func (v *iptablesVerifier) counters(ctx context.Context) (chains, jumps []string, pkts uint64, err error) {
	out, err := v.t.Node.Run(ctx, "iptables-save", "-c", "-t", "filter")
	if err != nil {
		return nil, nil, 0, err
	}
	all, rules := parseIptablesSave(string(out))
	for _, c := range all {
		if strings.HasPrefix(c, "TERN-FWD") {
			chains = append(chains, c)
		}
	}
	for _, r := range rules {
		switch {
		case strings.HasPrefix(r.Chain, "TERN-FWD"):
			pkts += r.Packets
		case r.Chain == "FORWARD" && strings.Contains(r.Spec, "-j TERN-FWD"):
			jumps = append(jumps, r.Spec)
			pkts += r.Packets
		}
	}
	return chains, jumps, pkts, nil
}

func (v *iptablesVerifier) before(ctx context.Context) error {
	_, _, pkts, err := v.counters(ctx)
	v.last = pkts
	return err
}

func (v *iptablesVerifier) after(ctx context.Context) error {
	chains, _, pkts, err := v.counters(ctx)
	if err != nil {
		return err
	}
	if len(chains) == 0 {
		return errors.New("iptables path check: the TERN-FWD-* chains are gone")
	}
	if pkts <= v.last {
		return fmt.Errorf("iptables path check: TERN-FWD-* counters did not grow (%d packets before and after the sample): the traffic did not go through the iptables datapath", pkts)
	}
	return nil
}

// hostVethPrograms lists the BPF programs on the ingress of a host veth:
// tcx first, then classic tc (clsact) filters.
func hostVethPrograms(node *Netns, ifindex int) ([]string, error) {
	var names []string
	err := node.Do(func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
		if errors.Is(err, ebpf.ErrNotSupported) {
			return nil // kernel before 6.6: no tcx, classic tc below
		}
		if err != nil {
			return fmt.Errorf("query tcx ingress programs of ifindex %d: %w", ifindex, err)
		}
		for _, ap := range res.Programs {
			names = append(names, "tcx ingress "+programName(ap.ID))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	l, err := node.nl.LinkByIndex(ifindex)
	if err != nil {
		return nil, err
	}
	filters, err := node.nl.FilterList(l, netlink.HANDLE_MIN_INGRESS)
	if err == nil {
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok {
				names = append(names, fmt.Sprintf("tc ingress %s (id %d)", bf.Name, bf.Id))
			}
		}
	}
	return names, nil
}

func programName(id ebpf.ProgramID) string {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return fmt.Sprintf("program id %d", id)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil || info.Name == "" {
		return fmt.Sprintf("program id %d", id)
	}
	return fmt.Sprintf("%s (id %d)", info.Name, id)
}

// netfilterRules returns the iptables rules and nftables tables of the
// namespace.
func netfilterRules(ctx context.Context, n *Netns) ([]string, error) {
	out, err := n.Run(ctx, "iptables-save")
	if err != nil {
		return nil, err
	}
	var found []string
	_, rules := parseIptablesSave(string(out))
	for _, r := range rules {
		found = append(found, "-A "+r.Chain+" "+r.Spec)
	}
	if _, err := exec.LookPath("nft"); err == nil {
		out, err := n.Run(ctx, "nft", "list", "tables")
		if err != nil {
			return nil, err
		}
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if l != "" {
				found = append(found, "nft "+l)
			}
		}
	}
	return found, nil
}

// iptRule is one rule of iptables-save output.
type iptRule struct {
	Chain   string
	Packets uint64
	Bytes   uint64
	Spec    string // everything after "-A CHAIN "
}

// parseIptablesSave reads iptables-save output, with or without -c
// counters ("[pkts:bytes] -A CHAIN spec"), and returns the chain names
// (built-in and user) and the rules.
func parseIptablesSave(out string) (chains []string, rules []iptRule) {
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, ":") {
			if f := strings.Fields(line[1:]); len(f) > 0 {
				chains = append(chains, f[0])
			}
			continue
		}
		var r iptRule
		if strings.HasPrefix(line, "[") {
			end := strings.IndexByte(line, ']')
			if end < 0 {
				continue
			}
			if p, b, ok := strings.Cut(line[1:end], ":"); ok {
				r.Packets, _ = strconv.ParseUint(p, 10, 64)
				r.Bytes, _ = strconv.ParseUint(b, 10, 64)
			}
			line = strings.TrimSpace(line[end+1:])
		}
		rest, ok := strings.CutPrefix(line, "-A ")
		if !ok {
			continue
		}
		r.Chain, r.Spec, _ = strings.Cut(rest, " ")
		rules = append(rules, r)
	}
	return chains, rules
}
