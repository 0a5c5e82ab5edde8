package ctl

import (
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
)

// TestMonitorTypes: which events each --type shows, and which event
// config flags it turns on and off while the monitor runs.
func TestMonitorTypes(t *testing.T) {
	drop := ebpfdp.Event{Kind: "drop"}
	deny := ebpfdp.Event{Kind: "policy"}
	allow := ebpfdp.Event{Kind: "policy", Allowed: true}
	trace := ebpfdp.Event{Kind: "trace"}
	cases := []struct {
		args    []string
		shows   []ebpfdp.Event
		hides   []ebpfdp.Event
		on, off uint32
	}{
		{nil, []ebpfdp.Event{drop, deny}, []ebpfdp.Event{allow, trace}, 0, 0},
		{[]string{"--type", "drop"}, []ebpfdp.Event{drop, deny}, []ebpfdp.Event{allow, trace}, 0, ebpfdp.EventNoDrop | ebpfdp.EventNoPolicyDeny},
		{[]string{"--type", "policy"}, []ebpfdp.Event{deny, allow}, []ebpfdp.Event{drop, trace}, ebpfdp.EventPolicyAllow, ebpfdp.EventNoPolicyDeny},
		{[]string{"--type", "trace"}, []ebpfdp.Event{trace}, []ebpfdp.Event{drop, deny, allow}, ebpfdp.EventTrace, 0},
		{[]string{"--type", "drop,trace"}, []ebpfdp.Event{drop, deny, trace}, []ebpfdp.Event{allow}, ebpfdp.EventTrace, ebpfdp.EventNoDrop | ebpfdp.EventNoPolicyDeny},
	}
	for _, c := range cases {
		out := "table"
		o, err := parseMonitorFlags(c.args, &out, io.Discard)
		if err != nil {
			t.Fatalf("%v: %v", c.args, err)
		}
		for _, ev := range c.shows {
			if !o.wants(ev) {
				t.Errorf("%v hides %+v", c.args, ev)
			}
		}
		for _, ev := range c.hides {
			if o.wants(ev) {
				t.Errorf("%v shows %+v", c.args, ev)
			}
		}
		if on, off := o.flagsFor(); on != c.on || off != c.off {
			t.Errorf("%v: flags on %#x off %#x, want %#x %#x", c.args, on, off, c.on, c.off)
		}
	}
	out := "table"
	for _, bad := range [][]string{{"--type", "drops"}, {"--pod", "web"}, {"extra"}} {
		if _, err := parseMonitorFlags(bad, &out, io.Discard); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

// TestMonitorLine: the table form of a drop, a denial and a non-IPv4 drop.
func TestMonitorLine(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 6000, time.UTC)
	rc := uint32(7)
	cases := []struct {
		ev   monitorEvent
		want string
	}{
		{monitorEvent{Time: at, Kind: "drop", Reason: "drop_loopback", Description: describeReason("drop_loopback"), Proto: "TCP",
			Src: "10.0.0.2", SrcPort: 4000, SrcPod: "a/b", Dst: "127.0.0.1", DstPort: 80, Interface: "tern1"},
			"03:04:05.000006 drop   drop_loopback          TCP 10.0.0.2:4000 (a/b) -> 127.0.0.1:80: dropped: from a pod to 127.0.0.0/8 (reachable only through route_localnet) [tern1]"},
		{monitorEvent{Time: at, Kind: "policy", Reason: "drop_policy_egress", Proto: "UDP", Src: "10.0.0.2", SrcPort: 1, SrcPod: "a/b",
			Dst: "10.0.0.3", DstPort: 53, Direction: "egress", Verdict: "deny", Pod: "a/b", RemoteClass: &rc, Policies: []string{"a/x", "a/y"}},
			"03:04:05.000006 policy drop_policy_egress     UDP 10.0.0.2:1 (a/b) -> 10.0.0.3:53: egress of a/b denied (isolated by a/x, a/y; no rule matches)"},
		{monitorEvent{Time: at, Kind: "drop", Reason: "drop_non_ipv4", Description: describeReason("drop_non_ipv4"), EtherType: "0x86dd", SrcPod: "a/b"},
			"03:04:05.000006 drop   drop_non_ipv4          ethertype 0x86dd from a/b: dropped: neither IPv4 nor ARP (IPv6, VLAN-tagged, other ethertypes)"},
	}
	for _, c := range cases {
		if got := c.ev.line(); got != c.want {
			t.Errorf("line:\n got %q\nwant %q", got, c.want)
		}
	}
	ev := ebpfdp.Event{Ifindex: 9}
	if !ev.Involves(netip.MustParseAddr("10.0.0.2"), 9) || ev.Involves(netip.MustParseAddr("10.0.0.2"), 8) {
		t.Error("a non-IPv4 event is matched to a pod by its veth")
	}
	if !strings.HasPrefix(describeReason("no_such_reason"), "no_such_reason") {
		t.Error("unknown reasons are shown by name")
	}
}
