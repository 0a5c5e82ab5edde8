package compile

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/ternlabs/tern/policy"
)

// Simulator holds the tables of a rule set in the binary layouts the eBPF
// maps use, and decides packets with exactly the lookups the eBPF program
// does. It is the executable specification of the datapath.
type Simulator struct {
	endpoints map[[EndpointKeySize]byte][]byte
	ipcache   *lpm
	policy    *lpm
}

// Stats counts the work of one decision.
type Stats struct {
	// Lookups is the number of map lookups (bpf_map_lookup_elem calls).
	// It is at most 12: two endpoint lookups, then per direction one
	// ipcache lookup and up to four policy lookups.
	Lookups int
	// Probes is the number of hash probes the LPM emulation made. A real
	// LPM trie walks at most data-bits nodes; this emulation probes once
	// per distinct prefix length present. Neither depends on the number
	// of entries.
	Probes int
}

// NewSimulator loads a rule set. It fails if an entry does not fit the
// map layouts.
func NewSimulator(rs *RuleSet) (*Simulator, error) {
	s := &Simulator{
		endpoints: map[[EndpointKeySize]byte][]byte{},
		ipcache:   newLPM(IPCacheDataBits / 8),
		policy:    newLPM(PolicyDataBits / 8),
	}
	for ip, ep := range rs.Endpoints {
		k, err := EndpointKeyOf(ip)
		if err != nil {
			return nil, err
		}
		if ep.LocalID == NoIdentity {
			return nil, fmt.Errorf("endpoint %s: local identity 0", ip)
		}
		v, _ := ep.MarshalBinary()
		s.endpoints[k.Addr] = v
	}
	for _, e := range rs.IPCache {
		if _, ok := e.prefix(); !ok {
			return nil, fmt.Errorf("ipcache entry %v: not a canonical IPv4 prefix", e.Prefix)
		}
		if e.Class == ClassAny {
			return nil, fmt.Errorf("ipcache entry %v: class %#x is reserved", e.Prefix.String(), ClassAny)
		}
		k, _ := e.Key().MarshalBinary()
		v, _ := IPCacheValue{Class: e.Class}.MarshalBinary()
		if err := s.ipcache.insert(k, v); err != nil {
			return nil, fmt.Errorf("ipcache entry %v: %w", e.Prefix.String(), err)
		}
	}
	for _, e := range rs.Policy {
		k := e.Key
		switch {
		case k.Dir > Egress:
			return nil, fmt.Errorf("policy entry %v: bad direction", k)
		case k.PortBits > 16:
			return nil, fmt.Errorf("policy entry %v: port bits > 16", k)
		case k.Port&^portMask(k.PortBits) != 0:
			return nil, fmt.Errorf("policy entry %v: port has bits beyond the prefix", k)
		case k.Proto == ProtoAny && k.PortBits != 0:
			return nil, fmt.Errorf("policy entry %v: any-protocol entry with port bits", k)
		}
		kb, _ := k.MarshalBinary()
		vb, _ := PolicyValue{Verdict: e.Verdict}.MarshalBinary()
		if err := s.policy.insert(kb, vb); err != nil {
			return nil, fmt.Errorf("policy entry %v: %w", k, err)
		}
	}
	return s, nil
}

// Simulate decides one packet against a rule set. It panics if the rule
// set is malformed (it is meant for rule sets from Compile); use
// NewSimulator to check one and to decide many packets.
func Simulate(rs *RuleSet, pkt policy.Packet) bool {
	s, err := NewSimulator(rs)
	if err != nil {
		panic("compile.Simulate: " + err.Error())
	}
	return s.Allowed(pkt)
}

// Allowed decides a packet.
func (s *Simulator) Allowed(pkt policy.Packet) bool {
	ok, _ := s.Decide(pkt)
	return ok
}

// Decide decides a packet and counts the lookups it took.
func (s *Simulator) Decide(pkt policy.Packet) (bool, Stats) {
	var st Stats
	src, srcOK := addrBytes(pkt.SrcIP)
	dst, dstOK := addrBytes(pkt.DstIP)

	var srcEP, dstEP EndpointPolicy
	var srcLocal, dstLocal bool
	if srcOK {
		srcEP, srcLocal = s.endpoint(src, &st)
	}
	if dstOK {
		dstEP, dstLocal = s.endpoint(dst, &st)
	}
	if srcOK && dstOK && src == dst {
		return true, st // a pod reaching itself (through its Service) is never denied
	}
	if srcLocal && srcEP.EgressIsolated {
		r := s.class(dst, dstOK, &st)
		if !s.policyAllows(Egress, srcEP.LocalID, r, pkt, &st) {
			return false, st
		}
	}
	if dstLocal && dstEP.IngressIsolated {
		r := s.class(src, srcOK, &st)
		if r != ClassHost && !s.policyAllows(Ingress, dstEP.LocalID, r, pkt, &st) {
			return false, st
		}
	}
	return true, st
}

func addrBytes(ip []byte) ([4]byte, bool) {
	a, ok := policy.Addr(ip)
	if !ok {
		return [4]byte{}, false
	}
	return a.As4(), true
}

func (s *Simulator) endpoint(a [4]byte, st *Stats) (EndpointPolicy, bool) {
	st.Lookups++
	v, ok := s.endpoints[a]
	if !ok {
		return EndpointPolicy{}, false
	}
	var ep EndpointPolicy
	if err := ep.UnmarshalBinary(v); err != nil {
		return EndpointPolicy{}, false
	}
	return ep, true
}

// class returns the remote class of an address: the ipcache LPM, world if
// it misses (or the address is not IPv4).
func (s *Simulator) class(a [4]byte, ok bool, st *Stats) uint32 {
	if !ok {
		return ClassWorld
	}
	st.Lookups++
	v, probes, hit := s.ipcache.lookup(a[:])
	st.Probes += probes
	if !hit {
		return ClassWorld
	}
	var cv IPCacheValue
	if err := cv.UnmarshalBinary(v); err != nil {
		return ClassWorld
	}
	return cv.Class
}

// policyAllows does the four policy lookups, stopping at the first hit.
func (s *Simulator) policyAllows(d Direction, local, remote uint32, pkt policy.Packet, st *Stats) bool {
	keys := [4]PolicyKey{
		{Dir: d, Proto: pkt.Proto, LocalID: local, RemoteClass: remote, Port: pkt.DstPort, PortBits: 16},
		{Dir: d, Proto: pkt.Proto, LocalID: local, RemoteClass: ClassAny, Port: pkt.DstPort, PortBits: 16},
		{Dir: d, Proto: ProtoAny, LocalID: local, RemoteClass: remote, Port: pkt.DstPort, PortBits: 16},
		{Dir: d, Proto: ProtoAny, LocalID: local, RemoteClass: ClassAny, Port: pkt.DstPort, PortBits: 16},
	}
	for _, k := range keys {
		kb, _ := k.MarshalBinary()
		st.Lookups++
		v, probes, hit := s.policy.lookup(kb[4:])
		st.Probes += probes
		if !hit {
			continue
		}
		var pv PolicyValue
		if err := pv.UnmarshalBinary(v); err == nil && pv.Verdict == VerdictAllow {
			return true
		}
	}
	return false
}

// lpm emulates BPF_MAP_TYPE_LPM_TRIE: keys are a u32 prefix length (host
// order) followed by the data bytes; a lookup with full data returns the
// value of the entry with the longest prefix that matches. It keeps one hash
// map per prefix length and probes the lengths present, longest first.
type lpm struct {
	dataLen int
	byLen   map[int]map[string][]byte
	lens    []int // descending
}

func newLPM(dataLen int) *lpm {
	return &lpm{dataLen: dataLen, byLen: map[int]map[string][]byte{}}
}

// insert takes a full binary key (prefix length, then data).
func (t *lpm) insert(key, value []byte) error {
	if len(key) != 4+t.dataLen {
		return fmt.Errorf("key of %d bytes, want %d", len(key), 4+t.dataLen)
	}
	plen := int(binary.NativeEndian.Uint32(key[:4]))
	if plen > 8*t.dataLen {
		return fmt.Errorf("prefix length %d > %d", plen, 8*t.dataLen)
	}
	data := key[4:]
	if m := maskBits(data, plen); string(m) != string(data) {
		return fmt.Errorf("data has bits set beyond prefix length %d", plen)
	}
	m := t.byLen[plen]
	if m == nil {
		m = map[string][]byte{}
		t.byLen[plen] = m
		t.lens = append(t.lens, plen)
		slices.Sort(t.lens)
		slices.Reverse(t.lens)
	}
	m[string(data)] = slices.Clone(value)
	return nil
}

// lookup takes the data bytes of a full-length key.
func (t *lpm) lookup(data []byte) (value []byte, probes int, ok bool) {
	for _, plen := range t.lens {
		probes++
		if v, hit := t.byLen[plen][string(maskBits(data, plen))]; hit {
			return v, probes, true
		}
	}
	return nil, probes, false
}

// maskBits returns a copy of data with every bit after the first n cleared
// (bits counted from the most significant bit of the first byte).
func maskBits(data []byte, n int) []byte {
	out := slices.Clone(data)
	for i := range out {
		switch {
		case n >= 8*(i+1):
		case n <= 8*i:
			out[i] = 0
		default:
			out[i] &= ^byte(0) << (8 - (n - 8*i))
		}
	}
	return out
}
