package iptables

import (
	"net/netip"
	"testing"
)

// TestRuleMatches evaluates the rule forms renderPolicy writes (without
// set matches, which need the kernel's ipset) against packets.
func TestRuleMatches(t *testing.T) {
	src, dst := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	cases := []struct {
		rule   string
		proto  uint8
		dport  uint16
		match  bool
		target string
	}{
		{"-p tcp -m tcp --dport 5432 -j RETURN", 6, 5432, true, "RETURN"},
		{"-p tcp -m tcp --dport 5432 -j RETURN", 6, 5433, false, "RETURN"},
		{"-p tcp -m tcp --dport 5432 -j RETURN", 17, 5432, false, "RETURN"},
		{"-p udp -m udp --dport 1024:2047 -j RETURN", 17, 2047, true, "RETURN"},
		{"-p udp -m udp --dport 1024:2047 -j RETURN", 17, 2048, false, "RETURN"},
		{"-p sctp -m sctp --dport 80 -j RETURN", 132, 80, true, "RETURN"},
		{"-p 47 -j RETURN", 47, 0, true, "RETURN"},
		{"-j RETURN", 1, 0, true, "RETURN"},
		{"-j DROP", 6, 80, true, "DROP"},
	}
	for _, c := range cases {
		w, err := splitWords(c.rule)
		if err != nil {
			t.Fatal(err)
		}
		ok, target, err := ruleMatches(w, src, dst, c.proto, c.dport)
		if err != nil || ok != c.match || target != c.target {
			t.Errorf("%q on proto %d port %d: match %v target %q err %v; want %v %q", c.rule, c.proto, c.dport, ok, target, err, c.match, c.target)
		}
	}
	if _, _, err := ruleMatches([]string{"-m", "state", "--state", "NEW", "-j", "ACCEPT"}, src, dst, 6, 80); err == nil {
		t.Error("a match explain does not know passed as evaluated")
	}
}
