package compile

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Binary layouts of the datapath maps. Multi-byte fields are in the host's
// byte order (the kernel's LPM prefixlen, identities, classes, flags), except
// IP addresses and ports, which are in network byte order as they are in
// packet headers. LPM keys start with the u32 prefix length the kernel's
// BPF_MAP_TYPE_LPM_TRIE expects; the prefix counts bits of the data after
// it, most significant bit of each byte first. The C side must declare the
// structs packed.
//
//	/* BPF_MAP_TYPE_HASH, key: pod IPv4 address */
//	struct endpoint_key   { __be32 addr; };                      /* 4 bytes */
//	struct endpoint_value { __u32 local_id; __u32 flags; };      /* 8 bytes */
//	#define EP_INGRESS_ISOLATED (1 << 0)
//	#define EP_EGRESS_ISOLATED  (1 << 1)
//
//	/* BPF_MAP_TYPE_LPM_TRIE, data 32 bits */
//	struct ipcache_key   { __u32 prefixlen; __be32 addr; };      /* 8 bytes */
//	struct ipcache_value { __u32 class; };                       /* 4 bytes */
//
//	/* BPF_MAP_TYPE_LPM_TRIE, data 96 bits, prefixlen 80..96 */
//	struct policy_key {
//		__u32  prefixlen;     /* offset 0: 80 + port bits */
//		__u8   dir;           /* offset 4: 0 ingress, 1 egress */
//		__u8   proto;         /* offset 5: IPPROTO_*, 0 = any */
//		__u32  local_id;      /* offset 6 */
//		__u32  remote_class;  /* offset 10: 0xffffffff = any */
//		__be16 dport;         /* offset 14 */
//	} __attribute__((packed));                                   /* 16 bytes */
//	struct policy_value { __u8 verdict; __u8 pad[3]; };          /* 4 bytes, verdict 1 = allow */
const (
	EndpointKeySize    = 4
	EndpointValueSize  = 8
	IPCacheKeySize     = 8
	IPCacheValueSize   = 4
	IPCacheDataBits    = 32
	PolicyKeySize      = 16
	PolicyValueSize    = 4
	PolicyDataBits     = 96
	PolicyFixedBits    = 80 // dir, proto, local identity, remote class
	EndpointIngressBit = 1 << 0
	EndpointEgressBit  = 1 << 1
)

// EndpointKey is the endpoint map key.
type EndpointKey struct{ Addr [4]byte }

// MarshalBinary encodes the key (4 bytes, network order).
func (k EndpointKey) MarshalBinary() ([]byte, error) { return k.Addr[:], nil }

// EndpointKeyOf returns the key of an endpoint address ("10.244.1.5").
func EndpointKeyOf(ip string) (EndpointKey, error) {
	a, err := netip.ParseAddr(ip)
	if err != nil || !a.Is4() {
		return EndpointKey{}, fmt.Errorf("endpoint %q: not an IPv4 address", ip)
	}
	return EndpointKey{Addr: a.As4()}, nil
}

// MarshalBinary encodes the endpoint map value.
func (v EndpointPolicy) MarshalBinary() ([]byte, error) {
	b := make([]byte, EndpointValueSize)
	binary.NativeEndian.PutUint32(b[0:], v.LocalID)
	var flags uint32
	if v.IngressIsolated {
		flags |= EndpointIngressBit
	}
	if v.EgressIsolated {
		flags |= EndpointEgressBit
	}
	binary.NativeEndian.PutUint32(b[4:], flags)
	return b, nil
}

// UnmarshalBinary decodes the endpoint map value.
func (v *EndpointPolicy) UnmarshalBinary(b []byte) error {
	if len(b) != EndpointValueSize {
		return fmt.Errorf("endpoint value: %d bytes, want %d", len(b), EndpointValueSize)
	}
	flags := binary.NativeEndian.Uint32(b[4:])
	*v = EndpointPolicy{
		LocalID:         binary.NativeEndian.Uint32(b[0:]),
		IngressIsolated: flags&EndpointIngressBit != 0,
		EgressIsolated:  flags&EndpointEgressBit != 0,
	}
	return nil
}

// IPCacheKey is the ipcache LPM key.
type IPCacheKey struct {
	PrefixLen uint32
	Addr      [4]byte
}

// MarshalBinary encodes the key: prefixlen (host order), address (network
// order).
func (k IPCacheKey) MarshalBinary() ([]byte, error) {
	b := make([]byte, IPCacheKeySize)
	binary.NativeEndian.PutUint32(b[0:], k.PrefixLen)
	copy(b[4:], k.Addr[:])
	return b, nil
}

// UnmarshalBinary decodes the key.
func (k *IPCacheKey) UnmarshalBinary(b []byte) error {
	if len(b) != IPCacheKeySize {
		return fmt.Errorf("ipcache key: %d bytes, want %d", len(b), IPCacheKeySize)
	}
	k.PrefixLen = binary.NativeEndian.Uint32(b[0:])
	copy(k.Addr[:], b[4:])
	return nil
}

// Key returns the LPM key of the entry. The prefix must be IPv4.
func (e IPCacheEntry) Key() IPCacheKey {
	ones, _ := e.Prefix.Mask.Size()
	var k IPCacheKey
	k.PrefixLen = uint32(ones)
	copy(k.Addr[:], e.Prefix.IP.To4())
	return k
}

// IPCacheValue is the ipcache LPM value.
type IPCacheValue struct{ Class uint32 }

// MarshalBinary encodes the class (host order).
func (v IPCacheValue) MarshalBinary() ([]byte, error) {
	return binary.NativeEndian.AppendUint32(nil, v.Class), nil
}

// UnmarshalBinary decodes the value.
func (v *IPCacheValue) UnmarshalBinary(b []byte) error {
	if len(b) != IPCacheValueSize {
		return fmt.Errorf("ipcache value: %d bytes, want %d", len(b), IPCacheValueSize)
	}
	v.Class = binary.NativeEndian.Uint32(b)
	return nil
}

// MarshalBinary encodes the policy key as struct policy_key (16 bytes).
func (k PolicyKey) MarshalBinary() ([]byte, error) {
	b := make([]byte, PolicyKeySize)
	binary.NativeEndian.PutUint32(b[0:], k.PrefixLen())
	b[4] = byte(k.Dir)
	b[5] = k.Proto
	binary.NativeEndian.PutUint32(b[6:], k.LocalID)
	binary.NativeEndian.PutUint32(b[10:], k.RemoteClass)
	binary.BigEndian.PutUint16(b[14:], k.Port)
	return b, nil
}

// UnmarshalBinary decodes struct policy_key.
func (k *PolicyKey) UnmarshalBinary(b []byte) error {
	if len(b) != PolicyKeySize {
		return fmt.Errorf("policy key: %d bytes, want %d", len(b), PolicyKeySize)
	}
	pl := binary.NativeEndian.Uint32(b[0:])
	if pl < PolicyFixedBits || pl > PolicyDataBits {
		return fmt.Errorf("policy key: prefix length %d out of [%d, %d]", pl, PolicyFixedBits, PolicyDataBits)
	}
	*k = PolicyKey{
		Dir:         Direction(b[4]),
		Proto:       b[5],
		LocalID:     binary.NativeEndian.Uint32(b[6:]),
		RemoteClass: binary.NativeEndian.Uint32(b[10:]),
		Port:        binary.BigEndian.Uint16(b[14:]),
		PortBits:    uint8(pl - PolicyFixedBits),
	}
	return nil
}

// PolicyValue is the policy LPM value.
type PolicyValue struct{ Verdict Verdict }

// MarshalBinary encodes struct policy_value (4 bytes).
func (v PolicyValue) MarshalBinary() ([]byte, error) {
	return []byte{byte(v.Verdict), 0, 0, 0}, nil
}

// UnmarshalBinary decodes struct policy_value.
func (v *PolicyValue) UnmarshalBinary(b []byte) error {
	if len(b) != PolicyValueSize {
		return fmt.Errorf("policy value: %d bytes, want %d", len(b), PolicyValueSize)
	}
	v.Verdict = Verdict(b[0])
	return nil
}

// portMask returns the mask of the first bits bits of a port.
func portMask(bits uint8) uint16 {
	if bits == 0 {
		return 0
	}
	return ^uint16(0) << (16 - bits)
}
