package ebpf

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// Datapath events (bpf/lib/events.h): the programs write them to the
// pinned ring buffer tern_events; tern_event_config says which kinds and
// how many per second and CPU; tern_event_limiter counts what was sent,
// suppressed by the rate and lost to a full ring buffer.

// Map names of the events.
const (
	EventsMap        = "tern_events"
	EventConfigMap   = "tern_event_config"
	EventLimiterMap  = "tern_event_limiter"
	eventDropMaskVar = "tern_btf_event_drop_mask"
)

// Event is a decoded datapath event.
type Event struct {
	MonotonicNS uint64 // CLOCK_MONOTONIC of the event
	Kind        string // "drop", "policy" or "trace"
	Reason      string // drop and trace: the metric name (drop_spoofed, redirect_peer, ...)
	Ifindex     uint32
	Len         uint32
	EtherType   uint16
	Proto       uint8 // IP protocol, 0 when not IPv4
	Src, Dst    netip.Addr
	SrcPort     uint16 // ICMP echo: the identifier, in both
	DstPort     uint16
	// Policy events.
	Direction   string // "ingress" or "egress"
	Allowed     bool
	LocalID     uint32 // identity of the pod whose policy decided
	RemoteClass uint32 // class (identity) of the other end
}

// Involves reports whether the event is about a packet to or from ip, or,
// for what is not IPv4 (ARP, IPv6), one seen on interface ifindex (a pod's
// host veth; 0: none).
func (ev Event) Involves(ip netip.Addr, ifindex uint32) bool {
	if ev.Src == ip || ev.Dst == ip {
		return true
	}
	return !ev.Src.IsValid() && ifindex != 0 && ev.Ifindex == ifindex
}

// DecodeEvent decodes one record of tern_events.
func DecodeEvent(raw []byte) (Event, error) {
	var r ternbpf.TernEvent
	if len(raw) < binary.Size(r) {
		return Event{}, fmt.Errorf("event of %d bytes, want %d", len(raw), binary.Size(r))
	}
	if _, err := binary.Decode(raw, binary.NativeEndian, &r); err != nil {
		return Event{}, err
	}
	ev := Event{
		MonotonicNS: r.TsNs,
		Ifindex:     r.Ifindex,
		Len:         r.Len,
		EtherType:   ntohs(r.EthProto),
		Proto:       r.Proto,
		SrcPort:     ntohs(r.Sport),
		DstPort:     ntohs(r.Dport),
		LocalID:     r.LocalId,
		RemoteClass: r.RemoteClass,
	}
	if ev.EtherType == 0x0800 {
		ev.Src, ev.Dst = addrOf(r.Saddr), addrOf(r.Daddr)
	}
	switch ternbpf.TernEventKind(r.Type) {
	case ternbpf.TernEventKindEVENT_DROP:
		ev.Kind, ev.Reason = "drop", MetricName(ternbpf.TernMetric(r.Reason))
	case ternbpf.TernEventKindEVENT_TRACE:
		ev.Kind, ev.Reason = "trace", MetricName(ternbpf.TernMetric(r.Reason))
	case ternbpf.TernEventKindEVENT_POLICY:
		ev.Kind = "policy"
		ev.Direction = "ingress"
		if ternbpf.TernPolicyDir(r.Dir) == ternbpf.TernPolicyDirPOLICY_DIR_EGRESS {
			ev.Direction = "egress"
		}
		ev.Allowed = ternbpf.TernEventVerdict(r.Verdict) == ternbpf.TernEventVerdictEVENT_VERDICT_ALLOW
		ev.Reason = "policy_allowed_" + ev.Direction
		if !ev.Allowed {
			ev.Reason = "drop_policy_" + ev.Direction
		}
	default:
		return Event{}, fmt.Errorf("event of unknown type %d", r.Type)
	}
	return ev, nil
}

// ntohs turns a network-order field, read as a native integer, into its
// value.
func ntohs(v uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.BigEndian.Uint16(b[:])
}

func addrOf(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// EventConfig is tern_event_config's entry. The zero value is the default:
// drops and policy denials on, policy allows and traces off, at the
// default rate.
type EventConfig = ternbpf.TernEventConfig

// Event config flags.
const (
	EventNoDrop       = uint32(ternbpf.TernEventFlagsEVENT_F_NO_DROP)
	EventNoPolicyDeny = uint32(ternbpf.TernEventFlagsEVENT_F_NO_POLICY_DENY)
	EventPolicyAllow  = uint32(ternbpf.TernEventFlagsEVENT_F_POLICY_ALLOW)
	EventTrace        = uint32(ternbpf.TernEventFlagsEVENT_F_TRACE)
)

// ReadEventConfig reads tern_event_config.
func ReadEventConfig(m *cilium.Map) (EventConfig, error) {
	var c EventConfig
	if err := m.Lookup(uint32(0), &c); err != nil {
		return c, fmt.Errorf("read event config: %w", err)
	}
	return c, nil
}

// WriteEventConfig writes tern_event_config.
func WriteEventConfig(m *cilium.Map, c EventConfig) error {
	if err := m.Put(uint32(0), c); err != nil {
		return fmt.Errorf("write event config: %w", err)
	}
	return nil
}

// EventCounts is tern_event_limiter summed over CPUs.
type EventCounts struct {
	Sent       uint64 `json:"sent"`
	Suppressed uint64 `json:"suppressed"` // over the rate
	Lost       uint64 `json:"lost"`       // ring buffer full
}

// ReadEventCounts sums tern_event_limiter over CPUs.
func ReadEventCounts(m *cilium.Map) (EventCounts, error) {
	var perCPU []ternbpf.TernEventLimiter
	if err := m.Lookup(uint32(0), &perCPU); err != nil {
		return EventCounts{}, fmt.Errorf("read event counts: %w", err)
	}
	var c EventCounts
	for _, l := range perCPU {
		c.Sent += l.Sent
		c.Suppressed += l.Suppressed
		c.Lost += l.Lost
	}
	return c, nil
}

// EventDropMask returns the metrics the programs report as drops (bit m
// for metric m), from the object's BTF.
func EventDropMask() (uint64, error) {
	spec, err := ternbpf.LoadTern()
	if err != nil {
		return 0, err
	}
	v, ok := spec.Variables[eventDropMaskVar]
	if !ok {
		return 0, fmt.Errorf("object has no %s", eventDropMaskVar)
	}
	var mask uint64
	if err := v.Get(&mask); err != nil {
		return 0, err
	}
	return mask, nil
}
