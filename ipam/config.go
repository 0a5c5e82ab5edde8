// Package ipam is tern-ipam, the built-in host-local-style IPv4 allocator:
// it validates the "ipam" section of a network config into a Pool and keeps
// the allocations of that pool on disk in a Store.
package ipam

import (
	"encoding/binary"
	"fmt"
	"net"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// TypeName is the value of the "ipam.type" field that selects this allocator.
const TypeName = "tern-ipam"

// Config is the "ipam" section when "type" is "tern-ipam".
type Config struct {
	Type       string  `json:"type"`
	Subnet     string  `json:"subnet"`               // required, IPv4 CIDR e.g. "10.244.1.0/24"
	RangeStart string  `json:"rangeStart,omitempty"` // optional, inside subnet
	RangeEnd   string  `json:"rangeEnd,omitempty"`   // optional, inside subnet
	Gateway    string  `json:"gateway,omitempty"`    // default: first host address of the subnet (.1)
	Routes     []Route `json:"routes,omitempty"`     // routes given to the pod
}

// Route is one entry of Config.Routes. An empty GW means the pod's default
// gateway for that destination.
type Route struct {
	Dst string `json:"dst"`
	GW  string `json:"gw,omitempty"`
}

// Pool is a validated Config. All addresses are 4-byte IPv4.
type Pool struct {
	Subnet net.IPNet
	// Start and End bound the allocation range, both inclusive. The gateway
	// may lie inside an explicitly configured range; it is never allocated.
	Start, End net.IP
	Gateway    net.IP
	Routes     []*types.Route
}

// FieldError reports a missing or invalid config field. The CNI plugin maps
// it to error code 7 (invalid network config).
type FieldError struct {
	Field string // JSON path of the field, e.g. "ipam.subnet"
	Msg   string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("invalid ipam config: %s: %s", e.Field, e.Msg)
}

func fieldErr(field, format string, args ...any) *FieldError {
	return &FieldError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// smallestPrefix is the longest accepted prefix: a /30 still has two host
// addresses, one for the gateway and one for a pod.
const smallestPrefix = 30

// ParseConfig validates c and fills in the defaults. Every validation
// failure is a *FieldError.
func ParseConfig(c Config) (*Pool, error) {
	if c.Type != "" && c.Type != TypeName {
		return nil, fieldErr("ipam.type", "must be %q, got %q", TypeName, c.Type)
	}

	if c.Subnet == "" {
		return nil, fieldErr("ipam.subnet", "missing")
	}
	ip, subnet, err := net.ParseCIDR(c.Subnet)
	if err != nil {
		return nil, fieldErr("ipam.subnet", "%q is not a CIDR", c.Subnet)
	}
	ones, bits := subnet.Mask.Size()
	if ip.To4() == nil || bits != 32 {
		return nil, fieldErr("ipam.subnet", "%q is not IPv4; only IPv4 is supported", c.Subnet)
	}
	if ones > smallestPrefix {
		return nil, fieldErr("ipam.subnet", "%q is smaller than /%d", c.Subnet, smallestPrefix)
	}
	// A CIDR with host bits set is usually a typo for a different subnet,
	// so it is refused rather than silently masked.
	if !ip.Equal(subnet.IP) {
		return nil, fieldErr("ipam.subnet", "%q has host bits set (network is %s)", c.Subnet, subnet)
	}
	p := &Pool{Subnet: net.IPNet{IP: subnet.IP.To4(), Mask: subnet.Mask}}

	network := ipToU32(p.Subnet.IP)
	broadcast := network | ^binary.BigEndian.Uint32(p.Subnet.Mask)
	firstHost, lastHost := network+1, broadcast-1

	gw := firstHost
	if c.Gateway != "" {
		gw, err = parseHost(c.Gateway, network, broadcast, &p.Subnet)
		if err != nil {
			return nil, fieldErr("ipam.gateway", "%v", err)
		}
	}
	p.Gateway = u32ToIP(gw)

	// The default range is every host address except the gateway; when the
	// gateway sits at either end the range shrinks around it, otherwise the
	// allocator skips it.
	start, end := firstHost, lastHost
	if c.RangeStart == "" && start == gw {
		start++
	}
	if c.RangeEnd == "" && end == gw {
		end--
	}
	if c.RangeStart != "" {
		if start, err = parseHost(c.RangeStart, network, broadcast, &p.Subnet); err != nil {
			return nil, fieldErr("ipam.rangeStart", "%v", err)
		}
	}
	if c.RangeEnd != "" {
		if end, err = parseHost(c.RangeEnd, network, broadcast, &p.Subnet); err != nil {
			return nil, fieldErr("ipam.rangeEnd", "%v", err)
		}
	}
	if start > end {
		return nil, fieldErr("ipam.rangeStart", "%s is after the range end %s", u32ToIP(start), u32ToIP(end))
	}
	if start == end && start == gw {
		return nil, fieldErr("ipam.rangeStart", "range %s-%s holds only the gateway", u32ToIP(start), u32ToIP(end))
	}
	p.Start, p.End = u32ToIP(start), u32ToIP(end)

	for i, r := range c.Routes {
		route, err := parseRoute(r)
		if err != nil {
			err.Field = fmt.Sprintf("ipam.routes[%d].%s", i, err.Field)
			return nil, err
		}
		p.Routes = append(p.Routes, route)
	}
	return p, nil
}

// parseHost parses s as a usable host address of subnet: inside it and
// neither its network nor its broadcast address.
func parseHost(s string, network, broadcast uint32, subnet *net.IPNet) (uint32, error) {
	ip := net.ParseIP(s)
	if ip == nil {
		return 0, fmt.Errorf("%q is not an IP address", s)
	}
	ip4 := ip.To4()
	if ip4 == nil {
		return 0, fmt.Errorf("%q is not IPv4; only IPv4 is supported", s)
	}
	if !subnet.Contains(ip4) {
		return 0, fmt.Errorf("%s is outside subnet %s", ip4, subnet)
	}
	switch v := ipToU32(ip4); v {
	case network:
		return 0, fmt.Errorf("%s is the network address of %s", ip4, subnet)
	case broadcast:
		return 0, fmt.Errorf("%s is the broadcast address of %s", ip4, subnet)
	default:
		return v, nil
	}
}

// parseRoute returns a FieldError whose Field is relative to the route
// ("dst" or "gw"); the caller prefixes the route's position.
func parseRoute(r Route) (*types.Route, *FieldError) {
	if r.Dst == "" {
		return nil, fieldErr("dst", "missing")
	}
	ip, dst, err := net.ParseCIDR(r.Dst)
	if err != nil {
		return nil, fieldErr("dst", "%q is not a CIDR", r.Dst)
	}
	if _, bits := dst.Mask.Size(); ip.To4() == nil || bits != 32 {
		return nil, fieldErr("dst", "%q is not IPv4; only IPv4 is supported", r.Dst)
	}
	// The kernel refuses a route whose destination has host bits set, so
	// fail here with the field name instead of later inside the pod.
	if !ip.Equal(dst.IP) {
		return nil, fieldErr("dst", "%q has host bits set (network is %s)", r.Dst, dst)
	}
	route := &types.Route{Dst: net.IPNet{IP: dst.IP.To4(), Mask: dst.Mask}}
	if r.GW != "" {
		gw := net.ParseIP(r.GW)
		if gw == nil {
			return nil, fieldErr("gw", "%q is not an IP address", r.GW)
		}
		if gw.To4() == nil {
			return nil, fieldErr("gw", "%q is not IPv4; only IPv4 is supported", r.GW)
		}
		route.GW = gw.To4()
	}
	return route, nil
}

// Result is the CNI IP configuration for ip allocated from p. The caller
// sets Interface.
func (p *Pool) Result(ip net.IP) *current.IPConfig {
	return &current.IPConfig{
		Address: net.IPNet{IP: cloneIP(ip.To4()), Mask: cloneMask(p.Subnet.Mask)},
		Gateway: cloneIP(p.Gateway),
	}
}

// size is the number of addresses in [Start, End], the gateway included.
func (p *Pool) size() uint32 {
	return ipToU32(p.End) - ipToU32(p.Start) + 1
}

// contains reports whether ip is allocatable from p: inside the range and
// not the gateway.
func (p *Pool) contains(ip net.IP) bool {
	return p.inRange(ip) && !ip.Equal(p.Gateway)
}

// inRange reports whether ip lies in [Start, End].
func (p *Pool) inRange(ip net.IP) bool {
	v := ipToU32(ip)
	return ip.To4() != nil && v >= ipToU32(p.Start) && v <= ipToU32(p.End)
}

// rangeString shortens the range to its last octets when they share the
// first three ("10.244.1.2-10.244.1.254" becomes ".2-.254").
func (p *Pool) rangeString() string {
	s, e := p.Start.To4(), p.End.To4()
	if s[0] == e[0] && s[1] == e[1] && s[2] == e[2] {
		return fmt.Sprintf(".%d-.%d", s[3], e[3])
	}
	return fmt.Sprintf("%s-%s", s, e)
}

func ipToU32(ip net.IP) uint32 {
	ip4 := ip.To4()
	if ip4 == nil {
		return 0
	}
	return binary.BigEndian.Uint32(ip4)
}

func u32ToIP(v uint32) net.IP {
	ip := make(net.IP, net.IPv4len)
	binary.BigEndian.PutUint32(ip, v)
	return ip
}

func cloneIP(ip net.IP) net.IP {
	if ip == nil {
		return nil
	}
	return append(net.IP(nil), ip...)
}

func cloneMask(m net.IPMask) net.IPMask {
	return append(net.IPMask(nil), m...)
}
