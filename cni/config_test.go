package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/ternlabs/tern/loader"
)

// confJSON returns a valid tern config with the top-level fields in set
// replaced (a nil value deletes the field) and the ipam fields in ipamSet
// replaced likewise.
func confJSON(t *testing.T, set, ipamSet map[string]any) []byte {
	t.Helper()
	ipamConf := map[string]any{"type": "tern-ipam", "subnet": "10.1.2.0/24"}
	for k, v := range ipamSet {
		if v == nil {
			delete(ipamConf, k)
		} else {
			ipamConf[k] = v
		}
	}
	conf := map[string]any{
		"cniVersion": "1.1.0",
		"name":       "testnet",
		"type":       "tern",
		"ipam":       ipamConf,
	}
	for k, v := range set {
		if v == nil {
			delete(conf, k)
		} else {
			conf[k] = v
		}
	}
	b, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseConfigDefaults(t *testing.T) {
	conf, err := ParseConfig(confJSON(t, nil, nil))
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	checks := []struct {
		what      string
		got, want any
	}{
		{"name", conf.Name, "testnet"},
		{"datapath", conf.Datapath, DatapathEBPF},
		{"stateDir", conf.StateDir, "/var/lib/tern"},
		{"bpffsDir", conf.BPFFSDir, "/sys/fs/bpf/tern"},
		{"bridge", conf.Bridge, "tern0"},
		{"ipMasq", conf.masquerade(), true},
		{"mtu", conf.MTU, 0},
		{"attach mode", conf.attachMode, loader.ModeAuto},
		{"built-in IPAM", conf.builtinIPAM(), true},
		{"clusterCIDR", conf.clusterCIDR == nil, true},
		{"nonMasqueradeCIDRs", len(conf.nonMasq), 0},
		{"services", conf.Services, ServicesKubeProxy},
		{"serviceCIDR", len(conf.serviceCIDR), 0},
		{"routing", conf.Routing, RoutingNative},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
	if got := conf.pool.Subnet.String(); got != "10.1.2.0/24" {
		t.Errorf("pool subnet = %s, want 10.1.2.0/24", got)
	}
	if got := conf.pool.Gateway.String(); got != "10.1.2.1" {
		t.Errorf("pool gateway = %s, want 10.1.2.1", got)
	}
}

func TestParseConfigExplicit(t *testing.T) {
	conf, err := ParseConfig(confJSON(t, map[string]any{
		"datapath":           "iptables",
		"mtu":                9000,
		"clusterCIDR":        "10.244.0.0/16",
		"nonMasqueradeCIDRs": []string{"192.168.0.0/16", "172.16.0.0/12"},
		"stateDir":           "/run/tern-test/state",
		"bpffsDir":           "/run/tern-test/bpf",
		"bridge":             "br-tern",
		"ipMasq":             false,
		"tcAttach":           "legacy",
		"natPortRange":       "50000-60999",
		"natMemoryMiB":       48,
		"services":           "kube-proxy",
		"serviceCIDR":        []string{"10.96.0.0/12", "172.30.0.0/16"},
		"routing":            "vxlan",
	}, nil))
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	checks := []struct {
		what      string
		got, want any
	}{
		{"datapath", conf.Datapath, DatapathIPTables},
		{"mtu", conf.MTU, 9000},
		{"clusterCIDR", conf.clusterCIDR.String(), "10.244.0.0/16"},
		{"nonMasqueradeCIDRs", fmt.Sprint(conf.nonMasq), "[{192.168.0.0 ffff0000} {172.16.0.0 fff00000}]"},
		{"stateDir", conf.StateDir, "/run/tern-test/state"},
		{"bpffsDir", conf.BPFFSDir, "/run/tern-test/bpf"},
		{"bridge", conf.Bridge, "br-tern"},
		{"ipMasq", conf.masquerade(), false},
		{"attach mode", conf.attachMode, loader.ModeLegacy},
		{"natPortRange", [2]uint16{conf.natPortMin, conf.natPortMax}, [2]uint16{50000, 60999}},
		{"natMemoryMiB", conf.NATMemoryMiB, 48},
		{"services", conf.Services, ServicesKubeProxy},
		{"serviceCIDR", fmt.Sprint(conf.serviceCIDR), "[{10.96.0.0 fff00000} {172.30.0.0 ffff0000}]"},
		{"routing", conf.Routing, RoutingVXLAN},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %v, want %v", c.what, c.got, c.want)
		}
	}
	// "auto" is the spelled-out default.
	conf, err = ParseConfig(confJSON(t, map[string]any{"tcAttach": "auto", "ipMasq": true}, nil))
	if err != nil {
		t.Fatalf("ParseConfig tcAttach=auto: %v", err)
	}
	if conf.attachMode != loader.ModeAuto || !conf.masquerade() {
		t.Errorf("tcAttach auto, ipMasq true: mode %q, masquerade %v", conf.attachMode, conf.masquerade())
	}
}

// A delegated IPAM plugin's section is not validated by tern.
func TestParseConfigDelegatedIPAM(t *testing.T) {
	b := []byte(`{"cniVersion":"1.0.0","name":"n","type":"tern",
		"ipam":{"type":"host-local","ranges":[[{"subnet":"10.9.0.0/24"}]]}}`)
	conf, err := ParseConfig(b)
	if err != nil {
		t.Fatalf("ParseConfig: %v", err)
	}
	if conf.builtinIPAM() {
		t.Error("host-local config uses the built-in IPAM")
	}
	if conf.IPAM.Type != "host-local" {
		t.Errorf("ipam.type = %q, want host-local", conf.IPAM.Type)
	}
}

func TestParseConfigDecodeError(t *testing.T) {
	for _, in := range []string{``, `{`, `not json`, `{"name": 5}`, `[]`} {
		_, err := ParseConfig([]byte(in))
		var te *types.Error
		if !errors.As(err, &te) {
			t.Errorf("ParseConfig(%q) = %v (%T), want *types.Error", in, err, err)
			continue
		}
		if te.Code != types.ErrDecodingFailure {
			t.Errorf("ParseConfig(%q): code %d, want %d", in, te.Code, types.ErrDecodingFailure)
		}
		// cniError keeps a code already chosen.
		if got := cniError(err); got != err {
			t.Errorf("cniError changed %v into %v", err, got)
		}
	}
}

func TestParseConfigFieldErrors(t *testing.T) {
	tests := []struct {
		name    string
		set     map[string]any // top-level fields (nil value deletes)
		ipamSet map[string]any // ipam fields (nil value deletes)
		field   string         // ConfigError.Field
	}{
		{"missing name", map[string]any{"name": nil}, nil, "name"},
		{"empty name", map[string]any{"name": ""}, nil, "name"},
		{"unknown datapath", map[string]any{"datapath": "xdp"}, nil, "datapath"},
		{"datapath wrong case", map[string]any{"datapath": "EBPF"}, nil, "datapath"},
		{"negative mtu", map[string]any{"mtu": -1}, nil, "mtu"},
		{"mtu below 576", map[string]any{"mtu": 575}, nil, "mtu"},
		{"mtu above 65535", map[string]any{"mtu": 65536}, nil, "mtu"},
		{"clusterCIDR not a CIDR", map[string]any{"clusterCIDR": "10.0.0.0"}, nil, "clusterCIDR"},
		{"clusterCIDR garbage", map[string]any{"clusterCIDR": "nope"}, nil, "clusterCIDR"},
		{"clusterCIDR IPv6", map[string]any{"clusterCIDR": "fd00::/64"}, nil, "clusterCIDR"},
		{"nonMasqueradeCIDRs[0] bad", map[string]any{"nonMasqueradeCIDRs": []string{"bad"}}, nil, "nonMasqueradeCIDRs[0]"},
		{"nonMasqueradeCIDRs[2] bad", map[string]any{"nonMasqueradeCIDRs": []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.1.1"}}, nil, "nonMasqueradeCIDRs[2]"},
		{"nonMasqueradeCIDRs[1] IPv6", map[string]any{"nonMasqueradeCIDRs": []string{"10.0.0.0/8", "fd00::/8"}}, nil, "nonMasqueradeCIDRs[1]"},
		{"services ebpf on the iptables datapath", map[string]any{"services": "ebpf", "datapath": "iptables"}, nil, "services"},
		{"serviceLoopbackIP without services ebpf", map[string]any{"serviceLoopbackIP": "169.254.1.1"}, nil, "serviceLoopbackIP"},
		{"serviceLoopbackIP IPv6", map[string]any{"services": "ebpf", "serviceLoopbackIP": "fe80::1"}, nil, "serviceLoopbackIP"},
		{"serviceLoopbackIP in clusterCIDR", map[string]any{"services": "ebpf", "serviceLoopbackIP": "10.244.9.9", "clusterCIDR": "10.244.0.0/16"}, nil, "serviceLoopbackIP"},
		{"unknown services", map[string]any{"services": "ipvs"}, nil, "services"},
		{"nodePortAcceleration unknown", map[string]any{"services": "ebpf", "nodePortAcceleration": "native"}, nil, "nodePortAcceleration"},
		{"nodePortAcceleration without services ebpf", map[string]any{"nodePortAcceleration": "xdp"}, nil, "nodePortAcceleration"},
		{"serviceCIDR[0] bad", map[string]any{"serviceCIDR": []string{"10.96.0.10"}}, nil, "serviceCIDR[0]"},
		{"serviceCIDR[1] IPv6", map[string]any{"serviceCIDR": []string{"10.96.0.0/12", "fd00::/108"}}, nil, "serviceCIDR[1]"},
		{"relative stateDir", map[string]any{"stateDir": "var/lib/tern"}, nil, "stateDir"},
		{"dot stateDir", map[string]any{"stateDir": "./state"}, nil, "stateDir"},
		{"relative bpffsDir", map[string]any{"bpffsDir": "sys/fs/bpf/tern"}, nil, "bpffsDir"},
		{"bridge too long", map[string]any{"bridge": "tern-bridge-0123"}, nil, "bridge"},
		{"bridge with slash", map[string]any{"bridge": "br/0"}, nil, "bridge"},
		{"bridge with space", map[string]any{"bridge": "br 0"}, nil, "bridge"},
		{"bridge with tab", map[string]any{"bridge": "br\t0"}, nil, "bridge"},
		{"unknown tcAttach", map[string]any{"tcAttach": "xdp"}, nil, "tcAttach"},
		{"natPortRange one port number", map[string]any{"natPortRange": "61000"}, nil, "natPortRange"},
		{"natPortRange reversed", map[string]any{"natPortRange": "65000-61000"}, nil, "natPortRange"},
		{"natPortRange below 1024", map[string]any{"natPortRange": "80-2000"}, nil, "natPortRange"},
		{"natPortRange above 65535", map[string]any{"natPortRange": "61000-70000"}, nil, "natPortRange"},
		{"natMemoryMiB negative", map[string]any{"natMemoryMiB": -1}, nil, "natMemoryMiB"},
		{"natMemoryMiB above 4096", map[string]any{"natMemoryMiB": 5000}, nil, "natMemoryMiB"},
		{"unknown routing", map[string]any{"routing": "geneve"}, nil, "routing"},
		{"missing ipam", map[string]any{"ipam": nil}, nil, "ipam.type"},
		{"missing ipam.type", nil, map[string]any{"type": nil}, "ipam.type"},
		{"empty ipam.type", nil, map[string]any{"type": ""}, "ipam.type"},
		{"ipam field of wrong type", nil, map[string]any{"subnet": 10}, "ipam"},
		{"missing ipam.subnet", nil, map[string]any{"subnet": nil}, "ipam.subnet"},
		{"ipam.subnet not a CIDR", nil, map[string]any{"subnet": "10.1.2.0"}, "ipam.subnet"},
		{"ipam.subnet IPv6", nil, map[string]any{"subnet": "fd00::/64"}, "ipam.subnet"},
		{"ipam.subnet too small", nil, map[string]any{"subnet": "10.1.2.0/31"}, "ipam.subnet"},
		{"ipam.subnet host bits", nil, map[string]any{"subnet": "10.1.2.5/24"}, "ipam.subnet"},
		{"ipam.gateway outside", nil, map[string]any{"gateway": "10.1.3.1"}, "ipam.gateway"},
		{"ipam.gateway not an IP", nil, map[string]any{"gateway": "gw"}, "ipam.gateway"},
		{"ipam.gateway broadcast", nil, map[string]any{"gateway": "10.1.2.255"}, "ipam.gateway"},
		{"ipam.rangeStart outside", nil, map[string]any{"rangeStart": "10.1.3.10"}, "ipam.rangeStart"},
		{"ipam.rangeStart network address", nil, map[string]any{"rangeStart": "10.1.2.0"}, "ipam.rangeStart"},
		{"ipam.rangeEnd not an IP", nil, map[string]any{"rangeEnd": "end"}, "ipam.rangeEnd"},
		{"ipam.rangeEnd broadcast", nil, map[string]any{"rangeEnd": "10.1.2.255"}, "ipam.rangeEnd"},
		{"ipam range reversed", nil, map[string]any{"rangeStart": "10.1.2.100", "rangeEnd": "10.1.2.50"}, "ipam.rangeStart"},
		{"ipam range only gateway", nil, map[string]any{"rangeStart": "10.1.2.1", "rangeEnd": "10.1.2.1"}, "ipam.rangeStart"},
		{"ipam.routes[0].dst missing", nil, map[string]any{"routes": []map[string]string{{"gw": "10.1.2.1"}}}, "ipam.routes[0].dst"},
		{"ipam.routes[1].dst bad", nil, map[string]any{"routes": []map[string]string{{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.1/8"}}}, "ipam.routes[1].dst"},
		{"ipam.routes[0].dst IPv6", nil, map[string]any{"routes": []map[string]string{{"dst": "::/0"}}}, "ipam.routes[0].dst"},
		{"ipam.routes[0].gw bad", nil, map[string]any{"routes": []map[string]string{{"dst": "0.0.0.0/0", "gw": "gateway"}}}, "ipam.routes[0].gw"},
		{"ipam.routes[0].gw IPv6", nil, map[string]any{"routes": []map[string]string{{"dst": "0.0.0.0/0", "gw": "fd00::1"}}}, "ipam.routes[0].gw"},
		{"bad prevResult", map[string]any{"prevResult": map[string]any{"ips": "not a list"}}, nil, "prevResult"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdin := confJSON(t, tt.set, tt.ipamSet)
			conf, err := ParseConfig(stdin)
			if err == nil {
				t.Fatalf("ParseConfig(%s) succeeded (%+v), want an error for %s", stdin, conf, tt.field)
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("ParseConfig(%s) = %v (%T), want *ConfigError", stdin, err, err)
			}
			if ce.Field != tt.field {
				t.Errorf("field = %q, want %q (error: %v)", ce.Field, tt.field, err)
			}
			if !strings.Contains(err.Error(), tt.field) {
				t.Errorf("error %q does not name %s", err, tt.field)
			}
			var te *types.Error
			if !errors.As(cniError(err), &te) {
				t.Fatalf("cniError(%v) = %T, want *types.Error", err, cniError(err))
			}
			if te.Code != types.ErrInvalidNetworkConfig {
				t.Errorf("CNI code = %d, want %d", te.Code, types.ErrInvalidNetworkConfig)
			}
			if !strings.Contains(te.Msg, tt.field) {
				t.Errorf("CNI error message %q does not name %s", te.Msg, tt.field)
			}
		})
	}
}

func TestCNIError(t *testing.T) {
	if cniError(nil) != nil {
		t.Error("cniError(nil) != nil")
	}
	tests := []struct {
		name string
		in   error
		code uint
		msg  string
	}{
		{"chosen code kept", types.NewError(types.ErrTryAgainLater, "IP pool exhausted", "d"), types.ErrTryAgainLater, "IP pool exhausted"},
		{"config error", fieldErr("mtu", "bad"), types.ErrInvalidNetworkConfig, "invalid network config: mtu: bad"},
		{"wrapped config error", fmt.Errorf("context: %w", fieldErr("name", "missing")), types.ErrInvalidNetworkConfig, "context: invalid network config: name: missing"},
		{"wrapped chosen code", fmt.Errorf("delegate ADD to IPAM plugin host-local: %w", types.NewError(types.ErrTryAgainLater, "no IP left", "range full")), types.ErrTryAgainLater, "delegate ADD to IPAM plugin host-local: no IP left; range full"},
		{"joined chosen code", errors.Join(types.NewError(types.ErrInvalidNetNS, "bad netns", "")), types.ErrInvalidNetNS, "bad netns"},
		{"other error", errors.New("boom"), types.ErrInternal, "boom"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			te, ok := cniError(tt.in).(*types.Error)
			if !ok {
				t.Fatalf("cniError(%v) = %T, want *types.Error", tt.in, cniError(tt.in))
			}
			if te.Code != tt.code || te.Msg != tt.msg {
				t.Errorf("cniError(%v) = code %d msg %q, want code %d msg %q", tt.in, te.Code, te.Msg, tt.code, tt.msg)
			}
		})
	}
}

func TestParseArgs(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    K8sArgs // compared on the K8S_* fields
		wantErr bool
	}{
		{name: "empty", in: ""},
		{
			name: "kubernetes args",
			in:   "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-abc;K8S_POD_INFRA_CONTAINER_ID=0123abcd;K8S_POD_UID=6f1c-42",
			want: K8sArgs{K8S_POD_NAMESPACE: "kube-system", K8S_POD_NAME: "coredns-abc", K8S_POD_INFRA_CONTAINER_ID: "0123abcd", K8S_POD_UID: "6f1c-42"},
		},
		{
			name: "unknown ignored with IgnoreUnknown",
			in:   "IgnoreUnknown=true;FOO=bar;K8S_POD_NAME=web",
			want: K8sArgs{K8S_POD_NAME: "web"},
		},
		{
			name: "IgnoreUnknown after the unknown key",
			in:   "FOO=bar;K8S_POD_NAMESPACE=default;IgnoreUnknown=1",
			want: K8sArgs{K8S_POD_NAMESPACE: "default"},
		},
		{name: "unknown without IgnoreUnknown", in: "FOO=bar;K8S_POD_NAME=web", wantErr: true},
		{name: "IgnoreUnknown=0", in: "IgnoreUnknown=0;FOO=bar", wantErr: true},
		{name: "pair without =", in: "K8S_POD_NAME", wantErr: true},
		{name: "pair with two =", in: "K8S_POD_NAME=a=b", wantErr: true},
		{name: "bad IgnoreUnknown value", in: "IgnoreUnknown=maybe", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseArgs(tt.in)
			if tt.wantErr {
				var te *types.Error
				if !errors.As(err, &te) {
					t.Fatalf("parseArgs(%q) = %v, %v; want *types.Error", tt.in, got, err)
				}
				if te.Code != types.ErrInvalidEnvironmentVariables {
					t.Errorf("parseArgs(%q): code %d, want %d", tt.in, te.Code, types.ErrInvalidEnvironmentVariables)
				}
				if cniError(err) != err {
					t.Errorf("cniError changed the code of %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseArgs(%q): %v", tt.in, err)
			}
			if got.K8S_POD_NAMESPACE != tt.want.K8S_POD_NAMESPACE || got.K8S_POD_NAME != tt.want.K8S_POD_NAME ||
				got.K8S_POD_INFRA_CONTAINER_ID != tt.want.K8S_POD_INFRA_CONTAINER_ID || got.K8S_POD_UID != tt.want.K8S_POD_UID {
				t.Errorf("parseArgs(%q) = %+v, want %+v", tt.in, *got, tt.want)
			}
		})
	}
}

func TestHostVethName(t *testing.T) {
	id := "3f2a9c1d4e5b6a7980f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6e5f4a3b"
	name := hostVethName(id, "eth0")
	if again := hostVethName(id, "eth0"); again != name {
		t.Errorf("not deterministic: %q then %q", name, again)
	}
	if len(name) > 15 {
		t.Errorf("%q is %d characters, over IFNAMSIZ-1", name, len(name))
	}
	if !strings.HasPrefix(name, "tern") {
		t.Errorf("%q lacks the tern prefix", name)
	}
	seen := map[string]string{}
	for _, cid := range []string{id, id[:63] + "c", "a", "b", "cnitool-0123456789abcdef0123"} {
		for _, ifname := range []string{"eth0", "eth1", "net1"} {
			n := hostVethName(cid, ifname)
			if len(n) > 15 {
				t.Errorf("hostVethName(%q, %q) = %q: too long", cid, ifname, n)
			}
			key := cid + " " + ifname
			if prev, ok := seen[n]; ok {
				t.Errorf("hostVethName(%s) = %q, same as for %s", key, n, prev)
			}
			seen[n] = key
		}
	}
}

func TestRecordsRoundTrip(t *testing.T) {
	stateDir := t.TempDir()
	recs := newRecords(stateDir, "net1")
	if want := filepath.Join(stateDir, "attachments", "net1"); recs.dir != want {
		t.Errorf("records dir = %s, want %s", recs.dir, want)
	}

	// Nothing stored yet: no error, nothing found.
	if all, err := recs.list(); err != nil || len(all) != 0 {
		t.Fatalf("list of a missing dir = %v, %v", all, err)
	}
	if r, err := recs.load("c1", "eth0"); err != nil || r != nil {
		t.Fatalf("load of a missing record = %v, %v", r, err)
	}
	if err := recs.remove("c1", "eth0"); err != nil {
		t.Fatalf("remove of a missing record: %v", err)
	}

	_, dst, _ := net.ParseCIDR("0.0.0.0/0")
	r1 := &record{
		ContainerID:  "c1",
		IfName:       "eth0",
		Netns:        "/var/run/netns/pod1",
		Datapath:     DatapathEBPF,
		HostVeth:     hostVethName("c1", "eth0"),
		HostIfindex:  42,
		HostMAC:      "02:00:00:00:00:01",
		PodMAC:       "02:00:00:00:00:02",
		IP:           "10.1.2.3/24",
		Gateway:      "10.1.2.1",
		Routes:       []*types.Route{{Dst: *dst, GW: net.ParseIP("10.1.2.1").To4()}},
		PodNamespace: "default",
		PodName:      "web-0",
	}
	r2 := &record{ContainerID: "c2", IfName: "eth0", IP: "10.1.2.4/24"}
	r3 := &record{ContainerID: "c1", IfName: "net1", IP: "10.1.2.5/24"}
	for _, r := range []*record{r1, r2, r3} {
		if err := recs.save(r); err != nil {
			t.Fatalf("save %s/%s: %v", r.ContainerID, r.IfName, err)
		}
	}
	// A stray temp file and a foreign file are not records.
	if err := os.WriteFile(filepath.Join(recs.dir, "c9_eth0.json.tmp"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(recs.dir, "README"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}

	got, err := recs.load("c1", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	// Compared as JSON: net.IP may come back in its 16-byte form.
	gotJSON, _ := json.Marshal(got)
	wantJSON, _ := json.Marshal(r1)
	if string(gotJSON) != string(wantJSON) {
		t.Errorf("load c1/eth0 = %s, want %s", gotJSON, wantJSON)
	}
	fi, err := os.Stat(recs.path("c1", "eth0"))
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("record mode %o, want 600", perm)
	}

	all, err := recs.list()
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]bool{}
	for _, r := range all {
		keys[r.ContainerID+"/"+r.IfName] = true
	}
	if want := map[string]bool{"c1/eth0": true, "c2/eth0": true, "c1/net1": true}; !reflect.DeepEqual(keys, want) {
		t.Errorf("list = %v, want %v", keys, want)
	}

	// Overwrite replaces.
	r2.IP = "10.1.2.9/24"
	if err := recs.save(r2); err != nil {
		t.Fatal(err)
	}
	if got, _ := recs.load("c2", "eth0"); got == nil || got.IP != "10.1.2.9/24" {
		t.Errorf("after overwrite load c2/eth0 = %+v", got)
	}

	if err := recs.remove("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if got, err := recs.load("c1", "eth0"); err != nil || got != nil {
		t.Errorf("load after remove = %v, %v", got, err)
	}
	if got, _ := recs.load("c1", "net1"); got == nil {
		t.Error("remove c1/eth0 also removed c1/net1")
	}
	if all, _ := recs.list(); len(all) != 2 {
		t.Errorf("list after remove has %d records, want 2", len(all))
	}

	// Another network's records are separate.
	other := newRecords(stateDir, "net2")
	if all, err := other.list(); err != nil || len(all) != 0 {
		t.Errorf("net2 list = %v, %v", all, err)
	}

	// A corrupt record is an error naming the file, not a silent nil.
	if err := os.WriteFile(recs.path("bad", "eth0"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := recs.load("bad", "eth0"); err == nil {
		t.Error("load of a corrupt record succeeded")
	}
	if _, err := recs.list(); err == nil {
		t.Error("list with a corrupt record succeeded")
	}
}

func TestRecordEndpoint(t *testing.T) {
	r := &record{
		ContainerID: "c1", IfName: "eth0", HostVeth: "ternabc", HostIfindex: 7,
		HostMAC: "02:00:00:00:00:01", PodMAC: "02:00:00:00:00:02",
		IP: "10.1.2.3/24", Gateway: "10.1.2.1", PodNamespace: "ns", PodName: "p",
	}
	ep := r.endpoint()
	if ep.IP.String() != "10.1.2.3/24" || ep.Gateway.String() != "10.1.2.1" || ep.HostIfindex != 7 ||
		ep.HostMAC.String() != r.HostMAC || ep.PodMAC.String() != r.PodMAC || ep.HostVeth != "ternabc" {
		t.Errorf("endpoint() = %+v", ep)
	}
	if got := subnetOf(ep).String(); got != "10.1.2.0/24" {
		t.Errorf("subnetOf = %s, want 10.1.2.0/24", got)
	}
	// DEL must work from a partial record: unparsable fields stay zero.
	ep = (&record{ContainerID: "c1", IfName: "eth0", HostVeth: "ternabc", IP: "garbage", HostMAC: "zz"}).endpoint()
	if ep.IP.IP != nil || ep.HostMAC != nil || ep.Gateway != nil || subnetOf(ep) != nil {
		t.Errorf("partial endpoint() = %+v", ep)
	}
}

func TestSafeName(t *testing.T) {
	tests := []struct{ in, want string }{
		{"abc123", "abc123"},
		{"a/b", "a%2Fb"},
		{"../../etc/passwd", "..%2F..%2Fetc%2Fpasswd"},
		{"/abs", "%2Fabs"},
		{"nul\x00byte", "nul%00byte"},
	}
	for _, tt := range tests {
		if got := safeName(tt.in); got != tt.want {
			t.Errorf("safeName(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}

	// Whatever the IDs hold, the record stays a direct child of the
	// records directory.
	stateDir := t.TempDir()
	recs := newRecords(stateDir, "net1")
	for _, id := range [][2]string{
		{"../../../escape", "eth0"},
		{"c1", "../../x"},
		{"/etc/passwd", "eth0"},
		{"..", ".."},
	} {
		p := recs.path(id[0], id[1])
		if filepath.Dir(p) != recs.dir {
			t.Errorf("path(%q, %q) = %s, outside %s", id[0], id[1], p, recs.dir)
		}
		r := &record{ContainerID: id[0], IfName: id[1], IP: "10.1.2.3/24"}
		if err := recs.save(r); err != nil {
			t.Fatalf("save %q/%q: %v", id[0], id[1], err)
		}
		got, err := recs.load(id[0], id[1])
		if err != nil || got == nil || got.ContainerID != id[0] || got.IfName != id[1] {
			t.Errorf("load %q/%q = %+v, %v", id[0], id[1], got, err)
		}
		if err := recs.remove(id[0], id[1]); err != nil {
			t.Errorf("remove %q/%q: %v", id[0], id[1], err)
		}
	}
	// Nothing was written outside the records directory.
	err := filepath.Walk(stateDir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if !fi.IsDir() && filepath.Dir(p) != recs.dir {
			t.Errorf("file written outside the records dir: %s", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// services "ebpf" is Tern's own load balancer: accepted on the eBPF
// datapath (with the default service-loopback address, or another), and
// refused on the iptables datapath with a message that says why and what
// to use instead (CNI error code 7).
func TestParseConfigServicesEBPF(t *testing.T) {
	conf, err := ParseConfig(confJSON(t, map[string]any{"services": "ebpf"}, nil))
	if err != nil {
		t.Fatal(err)
	}
	if conf.Services != ServicesEBPF || conf.lbLoopback.String() != DefaultServiceLoopbackIP {
		t.Errorf("services %q loopback %s", conf.Services, conf.lbLoopback)
	}
	conf, err = ParseConfig(confJSON(t, map[string]any{"services": "ebpf", "serviceLoopbackIP": "169.254.7.7"}, nil))
	if err != nil || conf.lbLoopback.String() != "169.254.7.7" {
		t.Fatalf("serviceLoopbackIP: %v %v", conf, err)
	}
	_, err = ParseConfig(confJSON(t, map[string]any{"services": "ebpf", "datapath": "iptables"}, nil))
	te, ok := cniError(err).(*types.Error)
	if !ok || te.Code != types.ErrInvalidNetworkConfig {
		t.Fatalf("services ebpf on iptables: %v, want CNI error code %d", err, types.ErrInvalidNetworkConfig)
	}
	if !strings.Contains(te.Msg, "needs the eBPF datapath") || !strings.Contains(te.Msg, "kube-proxy") {
		t.Errorf("message %q does not say services ebpf needs the eBPF datapath", te.Msg)
	}
}

// hostServicesCgroup: an absolute path or "none", with services "ebpf"
// only; unset, the datapath gets the cgroup2 root of this machine.
func TestParseConfigHostServicesCgroup(t *testing.T) {
	for _, c := range []struct {
		extra map[string]any
		ok    bool
		want  string // the datapath's cgroup; "*" any non-empty
	}{
		{map[string]any{"services": "ebpf"}, true, "*"},
		{map[string]any{"services": "ebpf", "hostServicesCgroup": "/sys/fs/cgroup/x"}, true, "/sys/fs/cgroup/x"},
		{map[string]any{"services": "ebpf", "hostServicesCgroup": "none"}, true, ""},
		{map[string]any{"services": "ebpf", "hostServicesCgroup": "relative/x"}, false, ""},
		{map[string]any{"hostServicesCgroup": "/sys/fs/cgroup"}, false, ""},
	} {
		conf, err := ParseConfig(confJSON(t, c.extra, nil))
		if (err == nil) != c.ok {
			t.Errorf("%v: error %v, want ok %v", c.extra, err, c.ok)
			continue
		}
		if err != nil {
			continue
		}
		got := conf.hostServicesCgroup()
		if c.want == "*" {
			if root, _ := loader.Cgroup2Root(); got != root {
				t.Errorf("%v: cgroup %q, want the cgroup2 root %q", c.extra, got, root)
			}
		} else if got != c.want {
			t.Errorf("%v: cgroup %q, want %q", c.extra, got, c.want)
		}
	}
}
