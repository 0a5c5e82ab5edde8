// Package compile turns cluster state (package manifest) and a node's
// topology into a RuleSet: a datapath-neutral description of three tables
// that make every policy decision a fixed number of O(1) lookups, with no
// loop over rules in the datapath.
//
// # Tables
//
// Endpoints (exact match, pod IP -> EndpointPolicy): one entry per local
// pod, with its local identity and whether it is isolated in each direction.
// A local identity is an equivalence class of pods with the same namespace,
// labels and named ports: pods that look the same share policy entries.
//
// IPCache (longest-prefix match, IPv4 prefix -> remote class): the class of
// the longest matching prefix determines every peer an address matches.
// Every pod (local or not) is a /32 whose class encodes (pod identity, set of
// ipBlocks containing the IP); every host address is a /32; every ipBlock
// cidr and except prefix is an entry whose class encodes the set of ipBlocks
// (cidr minus excepts) containing the prefix. This works because with
// longest-prefix match the set of blocks containing an address equals the
// set containing its most specific entry. Class 0 is the world (no entry, or
// an entry that clears a less specific one), class 1 the host (a host address
// inside no ipBlock); a host address inside an ipBlock gets a class of its
// own (Class.Host set), and the compiler emits explicit allow entries for it.
//
// Policy (longest-prefix match, PolicyKey -> verdict): key data is direction
// (8 bits), protocol (8), local identity (32), remote class (32), then the
// destination port (16); the prefix length is 80 + the number of port bits,
// so a port range is a few prefix-aligned blocks. RemoteClass ClassAny is any
// remote, Proto ProtoAny (with 0 port bits) any protocol and port.
//
// # Lookup
//
// The eBPF program implements exactly what Simulator does. For a packet:
// if the source is a local endpoint isolated for egress, decide egress with
// L = its identity and the destination as remote; if the destination is a
// local endpoint isolated for ingress, decide ingress with L = its identity
// and the source as remote. Deciding direction d: R = IPCache(remote IP) (0
// if no entry); ingress from R == ClassHost is allowed; otherwise allowed if
// any of these four lookups (full 96-bit data, prefix length 96) hits:
// (d, proto, L, R, port), (d, proto, L, ClassAny, port), (d, 0, L, R, any),
// (d, 0, L, ClassAny, any). The packet passes if both directions allow it.
// A packet whose source and destination are the same address passes before
// any lookup: a pod reaching itself (through its own Service, which the
// node hairpins back) cannot be blocked by its policy.
//
// # Host traffic
//
// Traffic between a local pod and its node is always allowed (package
// policy). Ingress from ClassHost is the lookup's special case above;
// ingress from a host class with blocks is allowed by explicit entries
// (Ingress, ProtoAny, L, host class). Egress to the host needs no special
// case in the lookup: every egress-isolated local identity gets explicit
// entries (Egress, ProtoAny, L, ClassHost) and (Egress, ProtoAny, L, host
// class) for each host class with blocks, so a datapath that implements the
// lookup above allows it without knowing about it.
package compile

import (
	"cmp"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strconv"

	corev1 "k8s.io/api/core/v1"
)

// Direction of a policy entry, as stored in the key.
type Direction uint8

const (
	Ingress Direction = 0
	Egress  Direction = 1
)

func (d Direction) String() string {
	switch d {
	case Ingress:
		return "ingress"
	case Egress:
		return "egress"
	}
	return "dir(" + strconv.Itoa(int(d)) + ")"
}

// Reserved values.
const (
	ClassWorld uint32 = 0          // address with no ipcache entry: not a pod, in no ipBlock
	ClassHost  uint32 = 1          // a host address inside no ipBlock
	ClassAny   uint32 = 0xFFFFFFFF // policy key wildcard: any remote class
	ProtoAny   uint8  = 0          // policy key wildcard: any protocol (port bits must be 0)

	// NoIdentity is never a local identity.
	NoIdentity uint32 = 0

	firstClass    uint32 = 2
	firstIdentity uint32 = 1
)

// Verdict of a policy entry.
type Verdict uint8

// VerdictAllow is the only verdict: policy is allow-only, a miss denies.
const VerdictAllow Verdict = 1

// RuleSet is the compiled policy of one node. All lists are sorted, so two
// compilations of the same input are equal.
type RuleSet struct {
	// Endpoints maps each local pod IPv4 address ("10.244.1.5") to its
	// policy.
	Endpoints map[string]EndpointPolicy `json:"endpoints"`
	// IPCache is sorted by address, then prefix length.
	IPCache []IPCacheEntry `json:"ipcache"`
	// Policy is sorted by key.
	Policy []PolicyEntry `json:"policy"`
	// Identities describes every pod identity in use (local or not), sorted
	// by ID. Not needed by the datapath; kept for debugging, for datapaths
	// that work per identity (iptables ipsets), and so the next compilation
	// can keep the numbers stable.
	Identities []Identity `json:"identities"`
	// Classes describes every allocated remote class (>= 2), sorted by ID.
	Classes []Class `json:"classes"`
}

// EndpointPolicy is the endpoint table value.
type EndpointPolicy struct {
	LocalID         uint32 `json:"localID"`
	IngressIsolated bool   `json:"ingressIsolated"`
	EgressIsolated  bool   `json:"egressIsolated"`
}

// IPCacheEntry is one entry of the ipcache LPM. Prefix is IPv4 (4-byte IP
// and mask), with the host bits clear.
type IPCacheEntry struct {
	Prefix net.IPNet
	Class  uint32
}

type ipcacheEntryJSON struct {
	Prefix string `json:"prefix"`
	Class  uint32 `json:"class"`
}

// MarshalJSON writes {"prefix": "10.0.0.0/8", "class": 3}.
func (e IPCacheEntry) MarshalJSON() ([]byte, error) {
	return json.Marshal(ipcacheEntryJSON{Prefix: e.Prefix.String(), Class: e.Class})
}

// UnmarshalJSON reads what MarshalJSON writes.
func (e *IPCacheEntry) UnmarshalJSON(b []byte) error {
	var j ipcacheEntryJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	p, err := netip.ParsePrefix(j.Prefix)
	if err != nil || !p.Addr().Is4() || p.Masked() != p {
		return fmt.Errorf("ipcache entry: invalid IPv4 prefix %q", j.Prefix)
	}
	*e = IPCacheEntry{Prefix: ipNet(p), Class: j.Class}
	return nil
}

// prefix converts the entry's prefix; ok is false if it is not a canonical
// IPv4 prefix.
func (e IPCacheEntry) prefix() (netip.Prefix, bool) {
	ip := e.Prefix.IP.To4()
	ones, bits := e.Prefix.Mask.Size()
	if ip == nil || bits != 32 {
		return netip.Prefix{}, false
	}
	p := netip.PrefixFrom(netip.AddrFrom4([4]byte(ip)), ones)
	return p, p.Masked() == p
}

func ipNet(p netip.Prefix) net.IPNet {
	a := p.Addr().As4()
	return net.IPNet{IP: net.IP(a[:]), Mask: net.CIDRMask(p.Bits(), 32)}
}

// PolicyKey is the key of the policy LPM. Port is in host byte order here;
// only its first PortBits bits count (the rest must be zero).
type PolicyKey struct {
	Dir         Direction `json:"dir"`
	Proto       uint8     `json:"proto"`
	LocalID     uint32    `json:"localID"`
	RemoteClass uint32    `json:"remoteClass"`
	Port        uint16    `json:"port"`
	PortBits    uint8     `json:"portBits"` // 0..16
}

// PrefixLen is the LPM prefix length of the key: 80 + PortBits.
func (k PolicyKey) PrefixLen() uint32 { return PolicyFixedBits + uint32(k.PortBits) }

func (k PolicyKey) String() string {
	r := strconv.FormatUint(uint64(k.RemoteClass), 10)
	if k.RemoteClass == ClassAny {
		r = "any"
	}
	return fmt.Sprintf("%s proto=%d local=%d remote=%s port=%d/%d", k.Dir, k.Proto, k.LocalID, r, k.Port, k.PortBits)
}

// comparePolicyKey orders keys by direction, protocol, local identity,
// remote class, port, port bits.
func comparePolicyKey(a, b PolicyKey) int {
	return cmp.Or(
		cmp.Compare(a.Dir, b.Dir),
		cmp.Compare(a.Proto, b.Proto),
		cmp.Compare(a.LocalID, b.LocalID),
		cmp.Compare(a.RemoteClass, b.RemoteClass),
		cmp.Compare(a.Port, b.Port),
		cmp.Compare(a.PortBits, b.PortBits),
	)
}

// PolicyEntry is one entry of the policy LPM.
type PolicyEntry struct {
	Key     PolicyKey `json:"key"`
	Verdict Verdict   `json:"verdict"`
}

// NamedPort is a named container port of a pod.
type NamedPort struct {
	Name     string          `json:"name"`
	Protocol corev1.Protocol `json:"protocol"`
	Port     uint16          `json:"port"`
}

// Identity describes a pod identity: pods with the same namespace, labels
// and named ports.
type Identity struct {
	ID         uint32            `json:"id"`
	Namespace  string            `json:"namespace"`
	Labels     map[string]string `json:"labels,omitempty"`
	NamedPorts []NamedPort       `json:"namedPorts,omitempty"`
}

// Class describes a remote class: whether it is a host address, the pod
// identity if it is a pod (0 if not), and the ipBlocks containing it, each
// written "cidr" or "cidr except a,b".
type Class struct {
	ID       uint32   `json:"id"`
	Host     bool     `json:"host,omitempty"`
	Identity uint32   `json:"identity,omitempty"`
	Blocks   []string `json:"blocks,omitempty"`
}
