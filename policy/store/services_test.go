package store_test

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/store"
	"github.com/ternlabs/tern/services"
)

// fakeBalancer is a ServiceBalancer that keeps the table in force.
type fakeBalancer struct {
	inForce *services.Table
	prevs   []*services.Table
	fail    error
}

func (f *fakeBalancer) ApplyServices(prev, next *services.Table) error {
	f.prevs = append(f.prevs, prev)
	if f.fail != nil {
		return f.fail
	}
	f.inForce = next
	return nil
}

const dnsService = `
apiVersion: v1
kind: Service
metadata: {namespace: prod, name: dns}
spec: {clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP, targetPort: dns}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {namespace: prod, name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.1.11]}]
`

// One store, one update: Services applied with ternctl's Update reach the
// network's balancer compiled, with the endpoints of the node marked
// local; the table is recorded and is the prev of the next update (ids
// kept); a failing balancer leaves state, policy and balancer as they
// were; Forget drops the record.
func TestUpdateServices(t *testing.T) {
	dir := t.TempDir()
	s := store.New(dir)
	dp, lb := &fakeDatapath{}, &fakeBalancer{}
	n := node(dp, endpoints)
	n.Balancer = lb
	if _, _, err := s.Update(n, apply(decode(t, objects+"---"+dnsService))); err != nil {
		t.Fatal(err)
	}
	fe := services.Frontend{IP: netip.MustParseAddr("10.96.0.10"), Port: 53, Proto: services.ProtoUDP}
	e, ok := lb.inForce.Lookup(fe)
	if !ok || len(e.Backends) != 1 || e.Backends[0] != (services.Backend{IP: netip.MustParseAddr("10.244.1.11"), Port: 5353, Local: true}) {
		t.Fatalf("table in force: %+v", lb.inForce)
	}
	rec, err := s.AppliedServices("net1")
	if err != nil || rec == nil {
		t.Fatalf("applied services: %v %v", rec, err)
	}
	if got, _ := rec.Lookup(fe); got.ID != e.ID {
		t.Errorf("recorded id %d, applied %d", got.ID, e.ID)
	}

	// The backend goes away: the next update gets the recorded table as
	// prev; the frontend keeps its id and now rejects.
	files := snapshot(t, dir)
	noEndpoints := func(st *manifest.State) (*manifest.State, error) {
		return st.Delete(decode(t, "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {namespace: prod, name: dns-1}\naddressType: IPv4\n"))
	}
	lb.fail = errors.New("balancer says no")
	if _, _, err := s.Update(n, noEndpoints); err == nil || !strings.Contains(err.Error(), "balancer says no") {
		t.Fatalf("failing balancer: %v", err)
	}
	lb.fail = nil
	if got := snapshot(t, dir); len(got) != len(files) || got["state.json"] != files["state.json"] || got["applied-services-net1.json"] != files["applied-services-net1.json"] || got["applied-net1.json"] != files["applied-net1.json"] {
		t.Errorf("failing balancer changed the files")
	}
	if _, _, err := s.Update(n, noEndpoints); err != nil {
		t.Fatal(err)
	}
	if last := lb.prevs[len(lb.prevs)-1]; last == nil || len(last.Entries) != 1 {
		t.Errorf("prev of the update: %+v", last)
	}
	if e2, _ := lb.inForce.Lookup(fe); e2.ID != e.ID || len(e2.Backends) != 0 || e2.NoBackends != services.NoBackendsReject {
		t.Errorf("after the backend left: %+v", e2)
	}

	// A network without a balancer (kube-proxy mode) never gets a table.
	other := node(dp, endpoints)
	other.Network = "net2"
	if err := s.Sync(other); err != nil {
		t.Fatal(err)
	}
	if rec, _ := s.AppliedServices("net2"); rec != nil {
		t.Errorf("kube-proxy network got a Service table")
	}
	if err := s.Forget("net1"); err != nil {
		t.Fatal(err)
	}
	if rec, _ := s.AppliedServices("net1"); rec != nil {
		t.Errorf("Forget kept the Service table")
	}
}
