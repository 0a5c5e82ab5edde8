package store_test

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/policy/store"
)

// fakeDatapath is a PolicyEnforcer that keeps the rule set in force and
// can be told to fail, or to do something while it applies.
type fakeDatapath struct {
	mu      sync.Mutex
	inForce *compile.RuleSet
	calls   int
	prevs   []*compile.RuleSet
	fail    error
	during  func()
}

func (f *fakeDatapath) ApplyPolicy(prev, next *compile.RuleSet) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.prevs = append(f.prevs, prev)
	if f.during != nil {
		f.during()
	}
	if f.fail != nil {
		return f.fail
	}
	f.inForce = next
	return nil
}

const objects = `
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: web, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: db, labels: {app: db}}
spec: {containers: [{name: c}]}
`

const denyDB = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: deny-db}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
`

func decode(t *testing.T, yaml string) []manifest.Object {
	t.Helper()
	objs, err := manifest.Decode(strings.NewReader(yaml))
	if err != nil {
		t.Fatal(err)
	}
	return objs
}

func apply(objs []manifest.Object) func(*manifest.State) (*manifest.State, error) {
	return func(st *manifest.State) (*manifest.State, error) { return st.Apply(objs) }
}

var endpoints = []store.Endpoint{
	{IP: net.ParseIP("10.244.1.10"), Namespace: "prod", Name: "web"},
	{IP: net.ParseIP("10.244.1.11"), Namespace: "prod", Name: "db"},
}

func node(dp *fakeDatapath, eps []store.Endpoint) store.Node {
	n := store.Node{
		Network:   "net1",
		Endpoints: eps,
		Hosts:     func() ([]net.IP, error) { return []net.IP{net.ParseIP("10.244.1.1")}, nil },
		Datapath:  "fake",
	}
	if dp != nil {
		n.Enforcer = dp
	}
	return n
}

// snapshot reads every file of the store directory.
func snapshot(t *testing.T, stateDir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	entries, err := os.ReadDir(filepath.Join(stateDir, "policy"))
	if errors.Is(err, os.ErrNotExist) {
		return out
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "lock" || e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(stateDir, "policy", e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

func allowed(t *testing.T, rs *compile.RuleSet, src, dst string, port uint16) bool {
	t.Helper()
	return compile.Simulate(rs, policy.Packet{SrcIP: net.ParseIP(src), DstIP: net.ParseIP(dst), Proto: 6, DstPort: port})
}

// TestSyncWithoutStateIsFree: no state, nothing applied: no compile, no
// datapath call, no file, not even the directory.
func TestSyncWithoutStateIsFree(t *testing.T) {
	dir := t.TempDir()
	dp := &fakeDatapath{}
	n := node(dp, endpoints)
	n.Hosts = func() ([]net.IP, error) { t.Fatal("hosts asked for"); return nil, nil }
	if err := store.New(dir).Sync(n); err != nil {
		t.Fatal(err)
	}
	if dp.calls != 0 {
		t.Errorf("ApplyPolicy called %d times", dp.calls)
	}
	if _, err := os.Stat(filepath.Join(dir, "policy")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("store directory created: %v", err)
	}
}

func TestUpdateAndSync(t *testing.T) {
	dir := t.TempDir()
	s := store.New(dir)
	dp := &fakeDatapath{}
	before, after, err := s.Update(node(dp, endpoints), apply(decode(t, objects+"---"+denyDB)))
	if err != nil {
		t.Fatal(err)
	}
	if len(before.Policies) != 0 || len(after.Policies) != 1 {
		t.Errorf("before/after: %d/%d policies", len(before.Policies), len(after.Policies))
	}
	if dp.calls != 1 || dp.prevs[0] != nil {
		t.Fatalf("first apply: %d calls, prev %v", dp.calls, dp.prevs)
	}
	rs := dp.inForce
	if !rs.Endpoints["10.244.1.11"].IngressIsolated || rs.Endpoints["10.244.1.10"].IngressIsolated {
		t.Errorf("isolation: %+v", rs.Endpoints)
	}
	if !allowed(t, rs, "10.244.1.10", "10.244.1.11", 5432) || allowed(t, rs, "192.0.2.1", "10.244.1.11", 5432) {
		t.Errorf("web -> db must pass, outside -> db must not")
	}
	if !allowed(t, rs, "10.244.1.1", "10.244.1.11", 5432) {
		t.Errorf("host -> db must pass")
	}
	applied, err := s.Applied("net1")
	if err != nil || !reflect.DeepEqual(applied, rs) {
		t.Fatalf("applied file %v differs from the rule set in force (%v)", applied, err)
	}
	st, err := s.State()
	if err != nil || len(st.Policies) != 1 || len(st.Pods) != 2 {
		t.Fatalf("state file: %v, %v", st, err)
	}

	// A new pod: Sync passes the applied rule set as prev, so numbers stay.
	eps := append(endpoints, store.Endpoint{IP: net.ParseIP("10.244.1.12"), Namespace: "prod", Name: "db2"})
	if err := s.Sync(node(dp, eps)); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(dp.prevs[1], rs) {
		t.Errorf("Sync's prev is not the applied rule set")
	}
	// db2 has no Pod object: no labels, not selected.
	if got := dp.inForce.Endpoints["10.244.1.12"]; got.IngressIsolated || got.LocalID == 0 {
		t.Errorf("db2: %+v", got)
	}
	if dp.inForce.Endpoints["10.244.1.11"] != rs.Endpoints["10.244.1.11"] {
		t.Errorf("db's identity changed: %+v -> %+v", rs.Endpoints["10.244.1.11"], dp.inForce.Endpoints["10.244.1.11"])
	}

	// Delete the policy: everything open again.
	if _, _, err := s.Update(node(dp, eps), func(st *manifest.State) (*manifest.State, error) { return st.Delete(decode(t, denyDB)) }); err != nil {
		t.Fatal(err)
	}
	for ip, ep := range dp.inForce.Endpoints {
		if ep.IngressIsolated || ep.EgressIsolated {
			t.Errorf("%s still isolated", ip)
		}
	}

	// The datapath dropped everything (ReleaseNode): the next update
	// starts from nothing, while the desired state stays.
	if err := s.Forget("net1"); err != nil {
		t.Fatal(err)
	}
	if rs, err := s.Applied("net1"); rs != nil || err != nil {
		t.Fatalf("applied after Forget: %v, %v", rs, err)
	}
	if err := s.Sync(node(dp, eps)); err != nil {
		t.Fatal(err)
	}
	if last := dp.prevs[len(dp.prevs)-1]; last != nil {
		t.Errorf("Sync after Forget got prev %v", last)
	}
	if err := s.Forget("net-never-applied"); err != nil {
		t.Error(err)
	}
}

// TestUpdateErrorChangesNothing: a failing change, a failing datapath and
// failing writes after the datapath was updated all leave files and
// datapath as they were.
func TestUpdateErrorChangesNothing(t *testing.T) {
	dir := t.TempDir()
	s := store.New(dir)
	dp := &fakeDatapath{}
	if _, _, err := s.Update(node(dp, endpoints), apply(decode(t, objects))); err != nil {
		t.Fatal(err)
	}
	files := snapshot(t, dir)
	inForce := dp.inForce
	check := func(what string) {
		t.Helper()
		if got := snapshot(t, dir); !reflect.DeepEqual(got, files) {
			t.Errorf("%s: files changed:\n%v\nwant\n%v", what, got, files)
		}
		if !reflect.DeepEqual(dp.inForce, inForce) {
			t.Errorf("%s: datapath changed", what)
		}
	}

	// The change fails (an invalid object).
	bad := func(st *manifest.State) (*manifest.State, error) {
		return nil, errors.New("NetworkPolicy prod/x: invalid")
	}
	if _, _, err := s.Update(node(dp, endpoints), bad); err == nil {
		t.Fatal("no error")
	}
	check("failing change")

	// The datapath fails.
	dp.fail = errors.New("datapath says no")
	if _, _, err := s.Update(node(dp, endpoints), apply(decode(t, denyDB))); err == nil || !strings.Contains(err.Error(), "datapath says no") {
		t.Fatalf("err = %v", err)
	}
	dp.fail = nil
	check("failing datapath")
	if err := func() error {
		dp.fail = errors.New("no")
		defer func() { dp.fail = nil }()
		return s.Sync(node(dp, endpoints))
	}(); err == nil {
		t.Fatal("Sync with a failing datapath: no error")
	}
	check("failing datapath on Sync")

	// The state file cannot be written after the datapath took the new
	// rule set: the datapath gets the old one back, the applied file too.
	statePath := filepath.Join(dir, "policy", "state.json")
	once := func(f func()) func() {
		done := false
		return func() {
			if !done { // the update, not the undo
				done = true
				f()
			}
		}
	}
	dp.during = once(func() {
		os.Rename(statePath, statePath+".away")
		os.MkdirAll(filepath.Join(statePath, "blocker"), 0o700)
	})
	_, _, err := s.Update(node(dp, endpoints), apply(decode(t, denyDB)))
	dp.during = nil
	if err == nil {
		t.Fatal("state write into a directory: no error")
	}
	os.RemoveAll(statePath)
	os.Rename(statePath+".away", statePath)
	check("failing state write")

	// The applied file cannot be written.
	appliedPath := filepath.Join(dir, "policy", "applied-net1.json")
	dp.during = once(func() {
		os.Rename(appliedPath, appliedPath+".away")
		os.MkdirAll(filepath.Join(appliedPath, "blocker"), 0o700)
	})
	_, _, err = s.Update(node(dp, endpoints), apply(decode(t, denyDB)))
	dp.during = nil
	if err == nil {
		t.Fatal("applied write into a directory: no error")
	}
	os.RemoveAll(appliedPath)
	os.Rename(appliedPath+".away", appliedPath)
	check("failing applied write")

	// No temporary files anywhere.
	entries, _ := os.ReadDir(filepath.Join(dir, "policy"))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("temporary file left: %s", e.Name())
		}
	}
}

// TestFirstUpdateUndo: the very first update fails after applying: the
// applied file must not exist afterwards and the datapath is back to an
// empty rule set.
func TestFirstUpdateUndo(t *testing.T) {
	dir := t.TempDir()
	s := store.New(dir)
	dp := &fakeDatapath{}
	statePath := filepath.Join(dir, "policy", "state.json")
	dp.during = func() {
		if dp.inForce == nil {
			os.MkdirAll(filepath.Join(statePath, "blocker"), 0o700)
		}
	}
	if _, _, err := s.Update(node(dp, endpoints), apply(decode(t, objects+"---"+denyDB))); err == nil {
		t.Fatal("no error")
	}
	os.RemoveAll(statePath)
	if got := snapshot(t, dir); len(got) != 0 {
		t.Errorf("files left: %v", got)
	}
	if dp.inForce == nil || len(dp.inForce.Endpoints) != 0 || len(dp.inForce.Policy) != 0 {
		t.Errorf("datapath not back to empty: %+v", dp.inForce)
	}
}

// TestNotImplemented: a datapath without enforcement takes state without
// policies, refuses policies, and Sync refuses to admit pods then.
func TestNotImplemented(t *testing.T) {
	dir := t.TempDir()
	s := store.New(dir)
	n := node(nil, endpoints)
	if _, _, err := s.Update(n, apply(decode(t, objects))); err != nil {
		t.Fatalf("pods and namespaces only: %v", err)
	}
	if err := s.Sync(n); err != nil {
		t.Fatalf("Sync without policies: %v", err)
	}
	files := snapshot(t, dir)
	_, _, err := s.Update(n, apply(decode(t, denyDB)))
	if !errors.Is(err, store.ErrNotImplemented) || !strings.Contains(err.Error(), "fake datapath") {
		t.Fatalf("Update with a policy: %v", err)
	}
	if got := snapshot(t, dir); !reflect.DeepEqual(got, files) {
		t.Errorf("refused update changed files")
	}
	// Policies stored through another network of the node reach this one.
	other := node(&fakeDatapath{}, nil)
	other.Network = "net2"
	if _, _, err := s.Update(other, apply(decode(t, denyDB))); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(n); !errors.Is(err, store.ErrNotImplemented) {
		t.Errorf("Sync with a policy in force: %v", err)
	}
}

func TestConcurrentUpdates(t *testing.T) {
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Go(func() {
			dp := &fakeDatapath{}
			y := strings.ReplaceAll(denyDB, "deny-db", fmt.Sprintf("p%d", i))
			objs, err := manifest.Decode(strings.NewReader(y))
			if err == nil {
				_, _, err = store.New(dir).Update(node(dp, endpoints), apply(objs))
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	st, err := store.New(dir).State()
	if err != nil || len(st.Policies) != 8 {
		t.Fatalf("after 8 concurrent updates: %d policies (%v)", len(st.Policies), err)
	}
}

func TestTopology(t *testing.T) {
	st, err := manifest.NewState().Apply(decode(t, objects+`
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: far, labels: {app: web}}
spec: {nodeName: other, containers: [{name: c}]}
status: {podIP: 10.244.2.5}
---
apiVersion: v1
kind: Pod
metadata: {namespace: prod, name: moved}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.2.6}
`))
	if err != nil {
		t.Fatal(err)
	}
	eps := []store.Endpoint{
		{IP: net.ParseIP("10.244.1.10"), Namespace: "prod", Name: "old"},
		{IP: net.ParseIP("10.244.1.10"), Namespace: "prod", Name: "web"}, // reused IP: the later wins
		{IP: net.ParseIP("10.244.1.20")},                                 // no pod: left out
		{IP: net.ParseIP("fd00::1"), Namespace: "prod", Name: "v6"},      // not IPv4: left out
		{IP: net.ParseIP("10.244.1.30"), Namespace: "prod", Name: "moved"},
	}
	topo := store.Topology(st, eps, []net.IP{net.ParseIP("10.244.1.1"), net.ParseIP("10.244.1.1"), net.ParseIP("10.244.1.30"), net.ParseIP("fe80::1")})
	want := &policy.Topology{
		Endpoints: map[string]policy.Endpoint{
			"10.244.1.10": {Namespace: "prod", Name: "web", Local: true},
			"10.244.1.30": {Namespace: "prod", Name: "moved", Local: true},
			"10.244.2.5":  {Namespace: "prod", Name: "far"}, // another node's pod from the state
		},
		Hosts: []net.IP{net.ParseIP("10.244.1.1").To4()},
	}
	if !reflect.DeepEqual(topo, want) {
		t.Errorf("got %+v\nwant %+v", topo, want)
	}
	if err := topo.Validate(); err != nil {
		t.Error(err)
	}
}

func TestDescribe(t *testing.T) {
	st, err := manifest.NewState().Apply(decode(t, objects+"---"+denyDB+`
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: egress}
spec:
  podSelector: {}
  egress: [{}, {ports: [{port: 53, protocol: UDP}]}]
`))
	if err != nil {
		t.Fatal(err)
	}
	got := store.Describe(st, endpoints)
	want := []store.PolicyInfo{
		{Namespace: "prod", Name: "deny-db", PolicyTypes: []string{"Ingress"}, IngressRules: 1, Endpoints: []string{"prod/db"}},
		{Namespace: "prod", Name: "egress", PolicyTypes: []string{"Ingress", "Egress"}, EgressRules: 2, Endpoints: []string{"prod/db", "prod/web"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
}

func TestInvalidNetwork(t *testing.T) {
	s := store.New(t.TempDir())
	for _, name := range []string{"", "..", "a/b"} {
		n := node(&fakeDatapath{}, nil)
		n.Network = name
		if err := s.Sync(n); err == nil {
			t.Errorf("Sync accepted network %q", name)
		}
	}
}
