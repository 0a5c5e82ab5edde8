package services_test

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/services"
)

func state(t *testing.T, yaml string) *manifest.State {
	t.Helper()
	objs, err := manifest.Decode(strings.NewReader(yaml))
	if err != nil {
		t.Fatal(err)
	}
	st, err := manifest.NewState().Apply(objs)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

var node = services.Node{
	Name:      "node-a",
	Addrs:     []netip.Addr{netip.MustParseAddr("192.168.1.10"), netip.MustParseAddr("fd00::10")},
	LocalPods: []netip.Addr{netip.MustParseAddr("10.244.0.5")},
}

func fe(ip string, port uint16, proto uint8) services.Frontend {
	return services.Frontend{IP: netip.MustParseAddr(ip), Port: port, Proto: proto}
}

func be(ip string, port uint16, local bool) services.Backend {
	return services.Backend{IP: netip.MustParseAddr(ip), Port: port, Local: local}
}

const webService = `
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: [192.0.2.10]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
  - {name: sig, port: 9000, protocol: SCTP}
status: {loadBalancer: {ingress: [{ip: 198.51.100.7}, {hostname: lb.example}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.244.0.5]
  conditions: {ready: true}
- addresses: [10.244.1.7]
  nodeName: node-b
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
- {name: sig, port: 9000, protocol: SCTP}
---
# The same named port resolves to another number in pods of another slice.
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.244.2.9]
  nodeName: node-a
  conditions: {ready: true}
ports:
- {name: http, port: 8081}
`

// Every frontend kind of a LoadBalancer Service, each protocol, named
// targetPorts resolved per slice, affinity, and which backends are local.
func TestCompileFrontends(t *testing.T) {
	tab, err := services.Compile(state(t, webService), node, nil)
	if err != nil {
		t.Fatal(err)
	}
	http := []services.Backend{be("10.244.0.5", 8080, true), be("10.244.1.7", 8080, false), be("10.244.2.9", 8081, true)}
	want := map[services.Frontend]struct {
		scope    string
		backends []services.Backend
	}{
		fe("10.96.0.20", 80, services.ProtoTCP):      {services.ScopeClusterIP, http},
		fe("10.96.0.20", 53, services.ProtoUDP):      {services.ScopeClusterIP, []services.Backend{be("10.244.0.5", 5353, true), be("10.244.1.7", 5353, false)}},
		fe("10.96.0.20", 9000, services.ProtoSCTP):   {services.ScopeClusterIP, []services.Backend{be("10.244.0.5", 9000, true), be("10.244.1.7", 9000, false)}},
		fe("192.168.1.10", 30080, services.ProtoTCP): {services.ScopeNodePort, http},
		fe("192.0.2.10", 80, services.ProtoTCP):      {services.ScopeExternalIP, http},
		fe("192.0.2.10", 53, services.ProtoUDP):      {services.ScopeExternalIP, nil},
		fe("192.0.2.10", 9000, services.ProtoSCTP):   {services.ScopeExternalIP, nil},
		fe("198.51.100.7", 80, services.ProtoTCP):    {services.ScopeLoadBalancer, http},
		fe("198.51.100.7", 53, services.ProtoUDP):    {services.ScopeLoadBalancer, nil},
		fe("198.51.100.7", 9000, services.ProtoSCTP): {services.ScopeLoadBalancer, nil},
	}
	if len(tab.Entries) != len(want) {
		t.Errorf("%d entries, want %d: %+v", len(tab.Entries), len(want), tab.Entries)
	}
	ids := map[uint16]bool{}
	for f, w := range want {
		e, ok := tab.Lookup(f)
		if !ok {
			t.Errorf("%s: no entry", f)
			continue
		}
		if e.Scope != w.scope || e.Service != "shop/web" || e.AffinityTimeout != 60 {
			t.Errorf("%s: scope %s service %s affinity %d", f, e.Scope, e.Service, e.AffinityTimeout)
		}
		if w.backends != nil && !reflect.DeepEqual(e.Backends, w.backends) {
			t.Errorf("%s: backends %+v\nwant %+v", f, e.Backends, w.backends)
		}
		if e.ID == 0 || ids[e.ID] {
			t.Errorf("%s: id %d zero or reused", f, e.ID)
		}
		ids[e.ID] = true
	}
	if _, ok := tab.Lookup(fe("192.168.1.10", 80, services.ProtoTCP)); ok {
		t.Errorf("service port on a node address without a nodePort")
	}
}

// Endpoint conditions: ready ones only; terminating serving ones only when
// no endpoint is ready; no usable endpoint rejects; Local traffic policy
// without a local backend drops; headless and ExternalName are skipped.
func TestCompileConditionsAndPolicies(t *testing.T) {
	const base = `
apiVersion: v1
kind: Service
metadata: {name: s, namespace: ns}
spec:
  clusterIP: 10.96.0.30
  type: NodePort
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30001}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s-1, namespace: ns, labels: {kubernetes.io/service-name: s}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
`
	cases := []struct {
		name       string
		endpoints  string
		backends   []services.Backend
		noBackends string
		draining   []services.Backend // endpoints whose established flows stay
	}{
		{"ready local wins over terminating", `
- {addresses: [10.244.0.5], conditions: {ready: true}}
- {addresses: [10.244.0.6], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
`, []services.Backend{be("10.244.0.5", 8080, true)}, "", []services.Backend{{IP: netip.MustParseAddr("10.244.0.6"), Port: 8080, Local: true, Terminating: true}}},
		{"terminating serving when none ready", `
- {addresses: [10.244.0.6], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.0.7], nodeName: node-a, conditions: {ready: false, serving: false, terminating: true}}
`, []services.Backend{{IP: netip.MustParseAddr("10.244.0.6"), Port: 8080, Local: true, Terminating: true}}, "", []services.Backend{{IP: netip.MustParseAddr("10.244.0.7"), Port: 8080, Local: true, Terminating: true}}},
		{"not ready, not serving: reject", `
- {addresses: [10.244.0.5], conditions: {ready: false}}
`, []services.Backend{}, services.NoBackendsReject, []services.Backend{be("10.244.0.5", 8080, true)}},
		{"only remote ready under Local: drop", `
- {addresses: [10.244.9.9], nodeName: node-b, conditions: {ready: true}}
`, []services.Backend{}, services.NoBackendsDrop, []services.Backend{be("10.244.9.9", 8080, false)}},
		{"no endpoints: reject", ` []`, []services.Backend{}, services.NoBackendsReject, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			tab, err := services.Compile(state(t, base+c.endpoints), node, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range []services.Frontend{fe("10.96.0.30", 80, services.ProtoTCP), fe("192.168.1.10", 30001, services.ProtoTCP)} {
				e, ok := tab.Lookup(f)
				if !ok {
					t.Fatalf("%s: no entry", f)
				}
				if !e.TrafficPolicyLocal || !reflect.DeepEqual(e.Backends, c.backends) || e.NoBackends != c.noBackends {
					t.Errorf("%s: local %v backends %+v noBackends %q\nwant %+v %q", f, e.TrafficPolicyLocal, e.Backends, e.NoBackends, c.backends, c.noBackends)
				}
				if !reflect.DeepEqual(e.Draining, c.draining) {
					t.Errorf("%s: draining %+v, want %+v", f, e.Draining, c.draining)
				}
			}
		})
	}

	// Cluster policies: a remote ready backend serves both frontends.
	clusterPol := strings.NewReplacer("  externalTrafficPolicy: Local\n", "", "  internalTrafficPolicy: Local\n", "").Replace(base)
	tab, err := services.Compile(state(t, clusterPol+"- {addresses: [10.244.9.9], nodeName: node-b}\n"), node, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range tab.Entries {
		if e.TrafficPolicyLocal || !reflect.DeepEqual(e.Backends, []services.Backend{be("10.244.9.9", 8080, false)}) {
			t.Errorf("%s: %+v", e.Frontend, e)
		}
	}

	headless := `
apiVersion: v1
kind: Service
metadata: {name: h}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: x}
spec: {type: ExternalName, externalName: example.com}
`
	if tab, err := services.Compile(state(t, headless), node, nil); err != nil || len(tab.Entries) != 0 {
		t.Errorf("headless / ExternalName: %v %+v", err, tab)
	}
}

// Rev-NAT ids survive recompilation: a frontend keeps its id when others
// come and go, and a new one takes the lowest free id. Slices of another
// Service, of another namespace, or without the service-name label are
// not used; two Services claiming one frontend are reported.
func TestCompileStableIDsAndConflicts(t *testing.T) {
	one := `
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
`
	first, err := services.Compile(state(t, one), node, nil)
	if err != nil {
		t.Fatal(err)
	}
	idB := mustLookup(t, first, fe("10.96.0.2", 80, services.ProtoTCP)).ID
	// a goes away, c comes: b keeps its id, c takes a's freed id.
	two := `
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIP: 10.96.0.0, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: d, namespace: other}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: wrong-ns, namespace: other, labels: {kubernetes.io/service-name: b}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.1]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: b-unlabelled}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.2]}]
`
	second, err := services.Compile(state(t, two), node, first)
	if err != nil {
		t.Fatal(err)
	}
	b := mustLookup(t, second, fe("10.96.0.2", 80, services.ProtoTCP))
	if b.ID != idB || b.Service != "default/b" || len(b.Backends) != 0 || b.NoBackends != services.NoBackendsReject {
		t.Errorf("b: %+v (id was %d)", b, idB)
	}
	if c := mustLookup(t, second, fe("10.96.0.0", 80, services.ProtoTCP)); c.ID == idB || c.ID != mustLookup(t, first, fe("10.96.0.1", 80, services.ProtoTCP)).ID {
		t.Errorf("c: id %d", c.ID)
	}
	if len(second.Conflicts) != 1 || !strings.Contains(second.Conflicts[0], "default/b keeps it") {
		t.Errorf("conflicts: %q", second.Conflicts)
	}
}

func mustLookup(t *testing.T, tab *services.Table, f services.Frontend) services.Entry {
	t.Helper()
	e, ok := tab.Lookup(f)
	if !ok {
		t.Fatalf("%s: no entry", f)
	}
	return e
}
