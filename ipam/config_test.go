package ipam

import (
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
)

func TestParseConfigDefaults(t *testing.T) {
	tests := []struct {
		name                 string
		cfg                  Config
		start, end, gw, cidr string
	}{
		{
			name: "/24 gateway and range default",
			cfg:  Config{Type: TypeName, Subnet: "10.244.1.0/24"},
			// .0 network, .1 gateway, .255 broadcast are all excluded.
			start: "10.244.1.2", end: "10.244.1.254", gw: "10.244.1.1", cidr: "10.244.1.0/24",
		},
		{
			name:  "empty type accepted",
			cfg:   Config{Subnet: "10.244.1.0/24"},
			start: "10.244.1.2", end: "10.244.1.254", gw: "10.244.1.1", cidr: "10.244.1.0/24",
		},
		{
			name:  "/30 leaves one address",
			cfg:   Config{Subnet: "192.168.0.4/30"},
			start: "192.168.0.6", end: "192.168.0.6", gw: "192.168.0.5", cidr: "192.168.0.4/30",
		},
		{
			name:  "gateway at last host shrinks the end",
			cfg:   Config{Subnet: "10.0.0.0/24", Gateway: "10.0.0.254"},
			start: "10.0.0.1", end: "10.0.0.253", gw: "10.0.0.254", cidr: "10.0.0.0/24",
		},
		{
			name:  "gateway in the middle stays in the range",
			cfg:   Config{Subnet: "10.0.0.0/24", Gateway: "10.0.0.100"},
			start: "10.0.0.1", end: "10.0.0.254", gw: "10.0.0.100", cidr: "10.0.0.0/24",
		},
		{
			name:  "explicit range",
			cfg:   Config{Subnet: "10.0.0.0/16", RangeStart: "10.0.1.10", RangeEnd: "10.0.1.20"},
			start: "10.0.1.10", end: "10.0.1.20", gw: "10.0.0.1", cidr: "10.0.0.0/16",
		},
		{
			name:  "explicit start only",
			cfg:   Config{Subnet: "10.0.0.0/24", RangeStart: "10.0.0.200"},
			start: "10.0.0.200", end: "10.0.0.254", gw: "10.0.0.1", cidr: "10.0.0.0/24",
		},
		{
			name:  "explicit end only",
			cfg:   Config{Subnet: "10.0.0.0/24", RangeEnd: "10.0.0.9"},
			start: "10.0.0.2", end: "10.0.0.9", gw: "10.0.0.1", cidr: "10.0.0.0/24",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ParseConfig(tt.cfg)
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if got := p.Subnet.String(); got != tt.cidr {
				t.Errorf("subnet = %s, want %s", got, tt.cidr)
			}
			for _, c := range []struct {
				what string
				got  net.IP
				want string
			}{{"start", p.Start, tt.start}, {"end", p.End, tt.end}, {"gateway", p.Gateway, tt.gw}} {
				if len(c.got) != net.IPv4len {
					t.Errorf("%s %v is not 4-byte", c.what, c.got)
				}
				if c.got.String() != c.want {
					t.Errorf("%s = %s, want %s", c.what, c.got, c.want)
				}
			}
			if p.Routes != nil {
				t.Errorf("routes = %v, want none", p.Routes)
			}
		})
	}
}

func TestParseConfigRoutes(t *testing.T) {
	p, err := ParseConfig(Config{
		Subnet: "10.244.1.0/24",
		Routes: []Route{{Dst: "0.0.0.0/0"}, {Dst: "10.96.0.0/12", GW: "10.244.1.254"}},
	})
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	if len(p.Routes) != 2 {
		t.Fatalf("got %d routes, want 2", len(p.Routes))
	}
	if got := p.Routes[0].Dst.String(); got != "0.0.0.0/0" || p.Routes[0].GW != nil {
		t.Errorf("route 0 = %s via %v, want 0.0.0.0/0 with no gateway", got, p.Routes[0].GW)
	}
	if got := p.Routes[1].Dst.String(); got != "10.96.0.0/12" || p.Routes[1].GW.String() != "10.244.1.254" {
		t.Errorf("route 1 = %s via %v, want 10.96.0.0/12 via 10.244.1.254", got, p.Routes[1].GW)
	}
}

func TestParseConfigErrors(t *testing.T) {
	const subnet = "10.244.1.0/24"
	tests := []struct {
		name  string
		cfg   Config
		field string
		msg   string // substring of the message
	}{
		{"wrong type", Config{Type: "host-local", Subnet: subnet}, "ipam.type", "must be"},
		{"missing subnet", Config{}, "ipam.subnet", "missing"},
		{"subnet not a CIDR", Config{Subnet: "10.244.1.0"}, "ipam.subnet", "not a CIDR"},
		{"subnet garbage", Config{Subnet: "banana/24"}, "ipam.subnet", "not a CIDR"},
		{"ipv6 subnet", Config{Subnet: "fd00::/64"}, "ipam.subnet", "not IPv4"},
		{"ipv4-mapped ipv6 subnet", Config{Subnet: "::ffff:10.0.0.0/120"}, "ipam.subnet", "not IPv4"},
		{"/31 too small", Config{Subnet: "10.0.0.0/31"}, "ipam.subnet", "smaller than /30"},
		{"/32 too small", Config{Subnet: "10.0.0.1/32"}, "ipam.subnet", "smaller than /30"},
		{"host bits set", Config{Subnet: "10.244.1.7/24"}, "ipam.subnet", "host bits"},
		{"gateway not an IP", Config{Subnet: subnet, Gateway: "x"}, "ipam.gateway", "not an IP"},
		{"gateway ipv6", Config{Subnet: subnet, Gateway: "fd00::1"}, "ipam.gateway", "not IPv4"},
		{"gateway outside subnet", Config{Subnet: subnet, Gateway: "10.244.2.1"}, "ipam.gateway", "outside subnet"},
		{"gateway is network", Config{Subnet: subnet, Gateway: "10.244.1.0"}, "ipam.gateway", "network address"},
		{"gateway is broadcast", Config{Subnet: subnet, Gateway: "10.244.1.255"}, "ipam.gateway", "broadcast address"},
		{"rangeStart not an IP", Config{Subnet: subnet, RangeStart: "10.244.1"}, "ipam.rangeStart", "not an IP"},
		{"rangeStart outside subnet", Config{Subnet: subnet, RangeStart: "10.244.0.10"}, "ipam.rangeStart", "outside subnet"},
		{"rangeStart is network", Config{Subnet: subnet, RangeStart: "10.244.1.0"}, "ipam.rangeStart", "network address"},
		{"rangeEnd not an IP", Config{Subnet: subnet, RangeEnd: "nope"}, "ipam.rangeEnd", "not an IP"},
		{"rangeEnd ipv6", Config{Subnet: subnet, RangeEnd: "::1"}, "ipam.rangeEnd", "not IPv4"},
		{"rangeEnd outside subnet", Config{Subnet: subnet, RangeEnd: "10.244.2.10"}, "ipam.rangeEnd", "outside subnet"},
		{"rangeEnd is broadcast", Config{Subnet: subnet, RangeEnd: "10.244.1.255"}, "ipam.rangeEnd", "broadcast address"},
		{"start after end", Config{Subnet: subnet, RangeStart: "10.244.1.50", RangeEnd: "10.244.1.40"}, "ipam.rangeStart", "after the range end"},
		{"range is only the gateway", Config{Subnet: subnet, RangeStart: "10.244.1.1", RangeEnd: "10.244.1.1"}, "ipam.rangeStart", "only the gateway"},
		{"route missing dst", Config{Subnet: subnet, Routes: []Route{{GW: "10.244.1.1"}}}, "ipam.routes[0].dst", "missing"},
		{"route bad dst", Config{Subnet: subnet, Routes: []Route{{Dst: "0.0.0.0/0"}, {Dst: "10.0.0.0/33"}}}, "ipam.routes[1].dst", "not a CIDR"},
		{"route dst without prefix", Config{Subnet: subnet, Routes: []Route{{Dst: "10.0.0.0"}}}, "ipam.routes[0].dst", "not a CIDR"},
		{"route ipv6 dst", Config{Subnet: subnet, Routes: []Route{{Dst: "::/0"}}}, "ipam.routes[0].dst", "not IPv4"},
		{"route dst host bits", Config{Subnet: subnet, Routes: []Route{{Dst: "10.96.0.1/12"}}}, "ipam.routes[0].dst", "host bits"},
		{"route bad gw", Config{Subnet: subnet, Routes: []Route{{Dst: "0.0.0.0/0", GW: "gw"}}}, "ipam.routes[0].gw", "not an IP"},
		{"route ipv6 gw", Config{Subnet: subnet, Routes: []Route{{Dst: "0.0.0.0/0", GW: "fe80::1"}}}, "ipam.routes[0].gw", "not IPv4"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := ParseConfig(tt.cfg)
			if err == nil {
				t.Fatalf("ParseConfig succeeded with %+v, want error on %s", p, tt.field)
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v (%T) is not a *FieldError", err, err)
			}
			if fe.Field != tt.field {
				t.Errorf("field = %q, want %q (error: %v)", fe.Field, tt.field, err)
			}
			if !strings.Contains(fe.Msg, tt.msg) {
				t.Errorf("msg = %q, want it to contain %q", fe.Msg, tt.msg)
			}
			if want := "invalid ipam config: " + tt.field + ": "; !strings.HasPrefix(err.Error(), want) {
				t.Errorf("error = %q, want prefix %q", err, want)
			}
		})
	}
}

// TestConfigJSON pins the JSON field names the plugin reads from netconf.
func TestConfigJSON(t *testing.T) {
	raw := `{"type":"tern-ipam","subnet":"10.244.1.0/24","rangeStart":"10.244.1.10","rangeEnd":"10.244.1.20",
		"gateway":"10.244.1.1","routes":[{"dst":"0.0.0.0/0"},{"dst":"10.96.0.0/12","gw":"10.244.1.1"}]}`
	var c Config
	if err := json.Unmarshal([]byte(raw), &c); err != nil {
		t.Fatal(err)
	}
	want := Config{
		Type: TypeName, Subnet: "10.244.1.0/24", RangeStart: "10.244.1.10", RangeEnd: "10.244.1.20",
		Gateway: "10.244.1.1", Routes: []Route{{Dst: "0.0.0.0/0"}, {Dst: "10.96.0.0/12", GW: "10.244.1.1"}},
	}
	if c.Type != want.Type || c.Subnet != want.Subnet || c.RangeStart != want.RangeStart ||
		c.RangeEnd != want.RangeEnd || c.Gateway != want.Gateway || len(c.Routes) != 2 ||
		c.Routes[0] != want.Routes[0] || c.Routes[1] != want.Routes[1] {
		t.Errorf("unmarshalled %+v, want %+v", c, want)
	}
}

func TestPoolResult(t *testing.T) {
	p, err := ParseConfig(Config{Subnet: "10.244.1.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	r := p.Result(net.ParseIP("10.244.1.7"))
	if got := r.Address.String(); got != "10.244.1.7/24" {
		t.Errorf("address = %s, want 10.244.1.7/24", got)
	}
	if got := r.Gateway.String(); got != "10.244.1.1" {
		t.Errorf("gateway = %s, want 10.244.1.1", got)
	}
	if r.Interface != nil {
		t.Errorf("interface = %d, want unset", *r.Interface)
	}
	// The result must not alias the pool: the plugin may edit it.
	r.Gateway[3] = 99
	r.Address.Mask[3] = 0
	if p.Gateway.String() != "10.244.1.1" || p.Subnet.String() != "10.244.1.0/24" {
		t.Errorf("editing the result changed the pool to %s gw %s", &p.Subnet, p.Gateway)
	}
}
