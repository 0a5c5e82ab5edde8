package ctl

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/cni"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/reference"
)

// policyVerdictWords name the policy events' verdicts; every other reason
// is a metric, described once with its name (ebpfdp.MetricDescription).
var policyVerdictWords = map[string]string{
	"policy_allowed_ingress": "allowed by NetworkPolicy: the destination's ingress rules",
	"policy_allowed_egress":  "allowed by NetworkPolicy: the source's egress rules",
}

// describeReason says what a metric or policy verdict means, for monitor
// and explain.
func describeReason(r string) string {
	if w, ok := ebpfdp.MetricDescription(r); ok {
		return w
	}
	if w, ok := policyVerdictWords[r]; ok {
		return w
	}
	return r
}

// monitorEvent is one line of `ternctl monitor -o json`.
type monitorEvent struct {
	Time        time.Time `json:"time"`
	Kind        string    `json:"kind"` // drop, policy, trace
	Reason      string    `json:"reason"`
	Description string    `json:"description"`
	Interface   string    `json:"interface,omitempty"`
	Ifindex     uint32    `json:"ifindex"`
	Len         uint32    `json:"len"`
	EtherType   string    `json:"ethertype,omitempty"` // when not IPv4
	Proto       string    `json:"proto,omitempty"`
	Src         string    `json:"src,omitempty"`
	SrcPort     uint16    `json:"srcPort,omitempty"`
	SrcPod      string    `json:"srcPod,omitempty"`
	Dst         string    `json:"dst,omitempty"`
	DstPort     uint16    `json:"dstPort,omitempty"`
	DstPod      string    `json:"dstPod,omitempty"`
	// Policy events.
	Direction   string   `json:"direction,omitempty"`
	Verdict     string   `json:"verdict,omitempty"` // allow, deny
	Pod         string   `json:"pod,omitempty"`     // whose policy decided
	Identity    uint32   `json:"identity,omitempty"`
	RemoteClass *uint32  `json:"remoteClass,omitempty"`
	Policy      string   `json:"policy,omitempty"`   // the allowing policy and rule ("prod/db ingress[0]")
	Policies    []string `json:"policies,omitempty"` // denied: the policies isolating the pod
	Why         string   `json:"why,omitempty"`      // the reference evaluator's reason
}

// monitorLost is the line monitor prints when events were suppressed by
// the rate or lost to a full ring buffer.
type monitorLost struct {
	Time       time.Time `json:"time"`
	Kind       string    `json:"kind"` // "lost"
	Suppressed uint64    `json:"suppressed"`
	Lost       uint64    `json:"lost"`
}

type monitorOpts struct {
	types    map[string]bool // drop, policy, trace
	pod      string          // NS/NAME
	count    int             // stop after this many events (0: no limit)
	duration time.Duration   // stop after this long (0: no limit)
}

func parseMonitorFlags(args []string, output *string, stderr io.Writer) (*monitorOpts, error) {
	fs := flag.NewFlagSet("ternctl monitor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var types fileList
	fs.Var(&types, "type", "drop, policy or trace (repeatable, or comma-separated; default: drop and policy denials)")
	pod := fs.String("pod", "", "only events to or from this pod (NS/NAME)")
	count := fs.Int("count", 0, "exit after this many events")
	duration := fs.Duration("duration", 0, "exit after this long")
	fs.StringVar(output, "o", *output, "output format: table or json (one object per line)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("monitor: unexpected argument %q", fs.Arg(0))
	}
	o := &monitorOpts{types: map[string]bool{}, pod: *pod, count: *count, duration: *duration}
	for _, t := range types {
		for _, s := range strings.Split(t, ",") {
			switch s {
			case "drop", "policy", "trace":
				o.types[s] = true
			default:
				return nil, fmt.Errorf("monitor: unknown event type %q (drop, policy, trace)", s)
			}
		}
	}
	if o.pod != "" && !strings.Contains(o.pod, "/") {
		return nil, fmt.Errorf("monitor: --pod %q: want NS/NAME", o.pod)
	}
	return o, nil
}

// names resolves addresses and interfaces to pods, from the network's
// endpoint records and the policy state. It reloads them when it meets an
// address or interface it does not know, at most once a second.
type names struct {
	conf     *cni.NetConf
	view     *cni.PolicyView
	byIP     map[string]string // IP -> NS/NAME
	byIf     map[uint32]string // host veth ifindex -> NS/NAME
	loadedAt time.Time
}

func newNames(conf *cni.NetConf) (*names, error) {
	n := &names{conf: conf}
	return n, n.reload()
}

func (n *names) reload() error {
	v, err := n.conf.PolicyView()
	if err != nil {
		return err
	}
	n.view, n.loadedAt = v, time.Now()
	n.byIP, n.byIf = map[string]string{}, map[uint32]string{}
	for ip, ep := range v.Topology.Endpoints {
		n.byIP[ip] = ep.Namespace + "/" + ep.Name
	}
	for _, ep := range v.Endpoints {
		name := ep.PodNamespace + "/" + ep.PodName
		if ep.PodName == "" {
			name = ep.ContainerID
		}
		n.byIP[ep.IP.IP.String()] = name
		n.byIf[uint32(ep.HostIfindex)] = name
	}
	return nil
}

func (n *names) maybeReload() {
	if time.Since(n.loadedAt) > time.Second {
		_ = n.reload() // keep the old names on error
	}
}

func (n *names) pod(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	p, ok := n.byIP[a.String()]
	if !ok {
		n.maybeReload()
		p = n.byIP[a.String()]
	}
	return p
}

func (n *names) podIP(name string) (netip.Addr, bool) {
	for pass := 0; pass < 2; pass++ {
		for ip, p := range n.byIP {
			if p == name {
				return netip.MustParseAddr(ip), true
			}
		}
		n.maybeReload()
	}
	return netip.Addr{}, false
}

func protoName(p uint8) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "TCP"
	case unix.IPPROTO_UDP:
		return "UDP"
	case unix.IPPROTO_SCTP:
		return "SCTP"
	case unix.IPPROTO_ICMP:
		return "ICMP"
	case 0:
		return ""
	}
	return fmt.Sprintf("proto %d", p)
}

// monotonicToWall turns a CLOCK_MONOTONIC time into wall-clock time.
func monotonicToWall(ns uint64) time.Time {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return time.Now()
	}
	return time.Now().Add(-time.Duration(uint64(ts.Nano()) - ns))
}

// describe turns a datapath event into a monitor line's fields.
func (n *names) describe(ev ebpfdp.Event) monitorEvent {
	m := monitorEvent{
		Time: monotonicToWall(ev.MonotonicNS), Kind: ev.Kind, Reason: ev.Reason, Description: describeReason(ev.Reason),
		Ifindex: ev.Ifindex, Len: ev.Len, Proto: protoName(ev.Proto),
		SrcPort: ev.SrcPort, DstPort: ev.DstPort,
	}
	if l, err := netlink.LinkByIndex(int(ev.Ifindex)); err == nil {
		m.Interface = l.Attrs().Name
	}
	if ev.EtherType != 0x0800 {
		m.EtherType = fmt.Sprintf("%#04x", ev.EtherType)
		if p, ok := n.byIf[ev.Ifindex]; ok {
			m.SrcPod = p // what a pod veth drops comes from its pod
		}
		return m
	}
	m.Src, m.Dst = ev.Src.String(), ev.Dst.String()
	m.SrcPod, m.DstPod = n.pod(ev.Src), n.pod(ev.Dst)
	if ev.Kind != "policy" {
		return m
	}
	m.Direction = ev.Direction
	m.Verdict = "deny"
	if ev.Allowed {
		m.Verdict = "allow"
	}
	m.Identity = ev.LocalID
	rc := ev.RemoteClass
	m.RemoteClass = &rc
	self := ev.Dst
	if ev.Direction == "egress" {
		self = ev.Src
	}
	m.Pod = n.pod(self)
	// Which policy: the reference evaluator on the node's policy state,
	// for the packet that opened the flow.
	pkt := policy.Packet{SrcIP: ev.Src.AsSlice(), DstIP: ev.Dst.AsSlice(), Proto: ev.Proto, DstPort: ev.DstPort}
	for _, d := range reference.Directions(n.view.State, n.view.Topology, pkt) {
		if d.Direction != ev.Direction {
			continue
		}
		m.Why = d.Why
		if d.Policy != "" {
			m.Policy = fmt.Sprintf("%s %s[%d]", d.Policy, d.Direction, d.Rule)
		}
	}
	if !ev.Allowed {
		m.Policies = reference.Selecting(n.view.State, n.view.Topology, self.AsSlice(), ev.Direction)
	}
	return m
}

func endpointString(ip string, port uint16, pod string) string {
	s := ip
	if port != 0 {
		s = net.JoinHostPort(ip, fmt.Sprint(port))
	}
	if pod != "" {
		s += " (" + pod + ")"
	}
	return s
}

// line is the table form of a monitor event.
func (m monitorEvent) line() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %-6s %-22s", m.Time.Format("15:04:05.000000"), m.Kind, m.Reason)
	if m.EtherType != "" {
		fmt.Fprintf(&b, " ethertype %s", m.EtherType)
		if m.SrcPod != "" {
			fmt.Fprintf(&b, " from %s", m.SrcPod)
		}
	} else {
		fmt.Fprintf(&b, " %s %s -> %s", m.Proto, endpointString(m.Src, m.SrcPort, m.SrcPod), endpointString(m.Dst, m.DstPort, m.DstPod))
	}
	switch {
	case m.Kind == "policy" && m.Verdict == "allow":
		fmt.Fprintf(&b, ": %s of %s allowed", m.Direction, orIdentity(m.Pod, m.Identity))
		if m.Policy != "" {
			fmt.Fprintf(&b, " by %s", m.Policy)
		}
	case m.Kind == "policy":
		fmt.Fprintf(&b, ": %s of %s denied", m.Direction, orIdentity(m.Pod, m.Identity))
		if len(m.Policies) > 0 {
			fmt.Fprintf(&b, " (isolated by %s; no rule matches)", strings.Join(m.Policies, ", "))
		}
	default:
		fmt.Fprintf(&b, ": %s", m.Description)
	}
	if m.Interface != "" {
		fmt.Fprintf(&b, " [%s]", m.Interface)
	}
	return b.String()
}

func orIdentity(pod string, id uint32) string {
	if pod != "" {
		return pod
	}
	return fmt.Sprintf("identity %d", id)
}

// wants reports whether the event is of a type the user asked for.
func (o *monitorOpts) wants(ev ebpfdp.Event) bool {
	if len(o.types) == 0 {
		return ev.Kind == "drop" || (ev.Kind == "policy" && !ev.Allowed)
	}
	switch ev.Kind {
	case "drop":
		return o.types["drop"]
	case "policy":
		return o.types["policy"] || (o.types["drop"] && !ev.Allowed)
	}
	return o.types[ev.Kind]
}

// flagsFor returns the event config flags the types need on, and off.
func (o *monitorOpts) flagsFor() (on, off uint32) {
	if o.types["trace"] {
		on |= ebpfdp.EventTrace
	}
	if o.types["policy"] {
		on |= ebpfdp.EventPolicyAllow
		off |= ebpfdp.EventNoPolicyDeny
	}
	if o.types["drop"] {
		off |= ebpfdp.EventNoDrop | ebpfdp.EventNoPolicyDeny
	}
	return on, off
}

func openPinned(conf *cni.NetConf, name string) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(conf.BPFFSDir, "maps", name), nil)
	if err != nil {
		return nil, fmt.Errorf("open %s (is the node's eBPF datapath loaded?): %w", name, err)
	}
	return m, nil
}

// monitor prints the datapath's events as they come (first those already
// waiting in the ring buffer), one line or JSON object each.
func monitor(conf *cni.NetConf, args []string, output string, stdout, stderr io.Writer) error {
	o, err := parseMonitorFlags(args, &output, stderr)
	if err != nil {
		return err
	}
	if output != "table" && output != "json" {
		return fmt.Errorf("unknown output format %q", output)
	}
	if !conf.IsEBPF() {
		return errors.New("monitor: events come from the eBPF datapath; on the iptables datapath use `ternctl explain` and iptables -L -v")
	}
	events, err := openPinned(conf, ebpfdp.EventsMap)
	if err != nil {
		return err
	}
	defer events.Close()
	cfgMap, err := openPinned(conf, ebpfdp.EventConfigMap)
	if err != nil {
		return err
	}
	defer cfgMap.Close()
	limiter, err := openPinned(conf, ebpfdp.EventLimiterMap)
	if err != nil {
		return err
	}
	defer limiter.Close()
	nm, err := newNames(conf)
	if err != nil {
		return err
	}
	var podIP netip.Addr
	var podIf uint32 // the pod's host veth, when it is on this node
	if o.pod != "" {
		ip, ok := nm.podIP(o.pod)
		if !ok {
			return fmt.Errorf("monitor: no pod %s on this network", o.pod)
		}
		podIP = ip
		for ifindex, name := range nm.byIf {
			if name == o.pod {
				podIf = ifindex
			}
		}
	}

	// Turn on what was asked for, for as long as the monitor runs. Bits
	// this monitor did not change are left as they are on exit.
	on, off := o.flagsFor()
	cfg, err := ebpfdp.ReadEventConfig(cfgMap)
	if err != nil {
		return err
	}
	changedOn, changedOff := on&^cfg.Flags, off&cfg.Flags
	if changedOn|changedOff != 0 {
		cfg.Flags = cfg.Flags | on&^off
		if err := ebpfdp.WriteEventConfig(cfgMap, cfg); err != nil {
			return err
		}
		defer func() {
			if c, err := ebpfdp.ReadEventConfig(cfgMap); err == nil {
				c.Flags = c.Flags&^changedOn | changedOff
				if err := ebpfdp.WriteEventConfig(cfgMap, c); err != nil {
					fmt.Fprintf(stderr, "ternctl monitor: restore event config: %v\n", err)
				}
			}
		}()
	}

	rd, err := ringbuf.NewReader(events)
	if err != nil {
		return fmt.Errorf("monitor: %w", err)
	}
	defer rd.Close()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sig)
	base, err := ebpfdp.ReadEventCounts(limiter)
	if err != nil {
		return err
	}
	var deadline time.Time
	if o.duration > 0 {
		deadline = time.Now().Add(o.duration)
	}
	enc := json.NewEncoder(stdout)
	shown := 0
	for {
		select {
		case <-sig:
			return nil
		default:
		}
		wait := time.Now().Add(time.Second) // wake up for lost counts and signals
		if !deadline.IsZero() && deadline.Before(wait) {
			wait = deadline
		}
		rd.SetDeadline(wait)
		rec, err := rd.Read()
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			c, cerr := ebpfdp.ReadEventCounts(limiter)
			if cerr == nil && (c.Suppressed != base.Suppressed || c.Lost != base.Lost) {
				l := monitorLost{Time: time.Now(), Kind: "lost", Suppressed: c.Suppressed - base.Suppressed, Lost: c.Lost - base.Lost}
				if output == "json" {
					_ = enc.Encode(l)
				} else {
					fmt.Fprintf(stdout, "%s lost   %d events over the rate limit, %d to a full ring buffer\n", l.Time.Format("15:04:05.000000"), l.Suppressed, l.Lost)
				}
				base = c
			}
			if !deadline.IsZero() && !time.Now().Before(deadline) {
				return nil
			}
			continue
		case err != nil:
			return fmt.Errorf("monitor: read events: %w", err)
		}
		ev, err := ebpfdp.DecodeEvent(rec.RawSample)
		if err != nil {
			fmt.Fprintf(stderr, "ternctl monitor: %v\n", err)
			continue
		}
		if !o.wants(ev) || (podIP.IsValid() && !ev.Involves(podIP, podIf)) {
			continue
		}
		m := nm.describe(ev)
		if output == "json" {
			if err := enc.Encode(m); err != nil {
				return err
			}
		} else {
			fmt.Fprintln(stdout, m.line())
		}
		shown++
		if o.count > 0 && shown >= o.count {
			return nil
		}
	}
}
