package iptables

import (
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
)

// ChainVerdict is what the network's policy chains do with the first
// packet of a connection in one direction (`ternctl explain` on the
// iptables datapath): which dispatch rule sends it to which chain, and
// which rule of that chain matches.
type ChainVerdict struct {
	Isolated bool   // the dispatch chain sends the packet to a policy chain
	Dispatch string // the dispatch rule, as iptables -S prints it
	Chain    string // the policy chain
	RuleNum  int    // 1-based number of the matching rule in Chain
	Rule     string // the matching rule, as iptables -S prints it
	Allowed  bool   // the rule RETURNs (allowed) rather than DROPs
}

// ExplainDirection walks the network's policy chains, as installed in the
// kernel, for a packet from src to dst (proto, dport) in direction dir
// ("egress": the chain of the source; "ingress": that of the destination).
// Set matches are tested with `ipset test`; nothing is changed.
func ExplainDirection(network, dir string, src, dst netip.Addr, proto uint8, dport uint16) (ChainVerdict, error) {
	var v ChainVerdict
	dispatch := DispatchChain(network)
	lines, _, err := listChain("filter", dispatch)
	if err != nil {
		return v, err
	}
	match := []string{"-s", src.String() + "/32"}
	if dir == "ingress" {
		match = []string{"-d", dst.String() + "/32"}
	}
	for _, l := range lines {
		w, err := splitWords(l)
		if err != nil || len(w) < 6 || w[0] != "-A" || w[2] != match[0] || w[3] != match[1] || w[4] != "-j" {
			continue
		}
		v.Isolated, v.Dispatch, v.Chain = true, l, w[5]
		break
	}
	if !v.Isolated {
		return v, nil // no chain: not isolated in this direction
	}
	rules, _, err := listChain("filter", v.Chain)
	if err != nil {
		return v, err
	}
	n := 0
	for _, l := range rules {
		w, err := splitWords(l)
		if err != nil || len(w) < 2 || w[0] != "-A" {
			continue
		}
		n++
		ok, target, err := ruleMatches(w[2:], src, dst, proto, dport)
		if err != nil {
			return v, fmt.Errorf("%s rule %d (%s): %w", v.Chain, n, l, err)
		}
		if ok {
			v.RuleNum, v.Rule, v.Allowed = n, l, target == "RETURN"
			return v, nil
		}
	}
	return v, fmt.Errorf("no rule of %s matches (it should end with a DROP)", v.Chain)
}

// ruleMatches evaluates the matches Tern's policy chains use: -p, -m set
// --match-set NAME src|dst, -m tcp|udp|sctp --dport P[:Q], -j TARGET.
func ruleMatches(w []string, src, dst netip.Addr, proto uint8, dport uint16) (bool, string, error) {
	target := ""
	ok := true
	for i := 0; i < len(w); i++ {
		switch w[i] {
		case "-p":
			if i+1 >= len(w) {
				return false, "", fmt.Errorf("-p without a protocol")
			}
			i++
			if !protoIs(w[i], proto) {
				ok = false
			}
		case "-m":
			i++ // the match name; its options follow
		case "--match-set":
			if i+2 >= len(w) {
				return false, "", fmt.Errorf("--match-set without set and direction")
			}
			a := src
			if w[i+2] == "dst" {
				a = dst
			}
			in, err := inSet(w[i+1], a)
			if err != nil {
				return false, "", err
			}
			if !in {
				ok = false
			}
			i += 2
		case "--dport":
			if i+1 >= len(w) {
				return false, "", fmt.Errorf("--dport without ports")
			}
			i++
			lo, hi, err := portRange(w[i])
			if err != nil {
				return false, "", err
			}
			if dport < lo || dport > hi {
				ok = false
			}
		case "-j":
			if i+1 >= len(w) {
				return false, "", fmt.Errorf("-j without a target")
			}
			i++
			target = w[i]
		default:
			return false, "", fmt.Errorf("unexpected %q", w[i])
		}
	}
	return ok, target, nil
}

func protoIs(name string, proto uint8) bool {
	switch name {
	case "tcp":
		return proto == 6
	case "udp":
		return proto == 17
	case "sctp":
		return proto == 132
	case "icmp":
		return proto == 1
	}
	n, err := strconv.Atoi(name)
	return err == nil && n == int(proto)
}

func portRange(s string) (uint16, uint16, error) {
	lo, hi, found := strings.Cut(s, ":")
	l, err := strconv.ParseUint(lo, 10, 16)
	if err != nil {
		return 0, 0, fmt.Errorf("port %q: %w", s, err)
	}
	h := l
	if found {
		if h, err = strconv.ParseUint(hi, 10, 16); err != nil {
			return 0, 0, fmt.Errorf("port %q: %w", s, err)
		}
	}
	return uint16(l), uint16(h), nil
}

// inSet tests an address against an ipset (exit status 0: in it, 1: not).
func inSet(set string, a netip.Addr) (bool, error) {
	out, err := exec.Command(ipsetBin, "test", set, a.String()).CombinedOutput()
	if err == nil {
		return true, nil
	}
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 1 {
		return false, nil
	}
	return false, fmt.Errorf("ipset test %s %s: %v: %s", set, a, err, strings.TrimSpace(string(out)))
}
