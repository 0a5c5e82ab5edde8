package policy_test

import (
	"net"
	"reflect"
	"strings"
	"testing"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/manifest"
)

func TestTopologyFromState(t *testing.T) {
	objs, err := manifest.Decode(strings.NewReader(`
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: here}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIPs: [{ip: 10.244.1.5}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: there}
spec: {nodeName: node-2, containers: [{name: c}]}
status: {podIP: 10.244.2.7}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: hostnet}
spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c}]}
status: {podIP: 172.18.0.2}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: done}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Succeeded, podIP: 10.244.1.9}
---
apiVersion: v1
kind: Pod
metadata: {namespace: a, name: pending}
spec: {containers: [{name: c}]}
`))
	if err != nil {
		t.Fatal(err)
	}
	st, err := manifest.NewState().Apply(objs)
	if err != nil {
		t.Fatal(err)
	}
	hosts := []net.IP{net.ParseIP("172.18.0.2")}
	topo := policy.TopologyFromState(st, "node-1", hosts)
	want := map[string]policy.Endpoint{
		"10.244.1.5": {Namespace: "a", Name: "here", Local: true},
		"10.244.2.7": {Namespace: "a", Name: "there", Local: false},
	}
	if !reflect.DeepEqual(topo.Endpoints, want) {
		t.Errorf("endpoints %v, want %v", topo.Endpoints, want)
	}
	if err := topo.Validate(); err != nil {
		t.Error(err)
	}
}

func TestTopologyValidate(t *testing.T) {
	ok := policy.Endpoint{Namespace: "a", Name: "b"}
	for _, c := range []struct {
		topo policy.Topology
		err  string
	}{
		{policy.Topology{Endpoints: map[string]policy.Endpoint{"10.0.0.1": ok}}, ""},
		{policy.Topology{Endpoints: map[string]policy.Endpoint{" 10.0.0.1": ok}}, "not a canonical IPv4"},
		{policy.Topology{Endpoints: map[string]policy.Endpoint{"::ffff:10.0.0.1": ok}}, "not a canonical IPv4"},
		{policy.Topology{Endpoints: map[string]policy.Endpoint{"10.0.0.1": {Name: "b"}}}, "namespace and name"},
		{policy.Topology{Hosts: []net.IP{net.ParseIP("::1")}}, "not an IPv4"},
		{policy.Topology{Endpoints: map[string]policy.Endpoint{"10.0.0.1": ok}, Hosts: []net.IP{net.ParseIP("10.0.0.1")}}, "also an endpoint"},
	} {
		err := c.topo.Validate()
		if (err == nil) != (c.err == "") || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("%+v: got %v, want %q", c.topo, err, c.err)
		}
	}
	var nilTopo *policy.Topology
	if err := nilTopo.Validate(); err != nil {
		t.Error(err)
	}
}
