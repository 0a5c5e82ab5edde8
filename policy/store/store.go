// Package store keeps a node's NetworkPolicy state on disk and brings a
// network's datapath in line with it.
//
// Under <stateDir>/policy:
//
//   - state.json: the desired cluster state (Pods, Namespaces,
//     NetworkPolicies; manifest.State's JSON), shared by every network of
//     the node;
//   - applied-<network>.json: the rule set last applied to that network's
//     datapath (compile.RuleSet's JSON), the prev of the next update, so
//     identity and class numbers stay stable while an update is applied;
//   - applied-services-<network>.json: the Service table (services.Table)
//     last applied to a network whose datapath balances Services itself;
//   - lock: a file lock that serialises every change.
//
// Sync (CNI ADD and DEL) and Update (ternctl apply and delete) compile the
// state against the network's local endpoints, apply the result with the
// datapath's ApplyPolicy and then record it. Files are replaced atomically
// (temporary file, fsync, rename) and every step is undone when a later
// one fails: on error the files and the datapath keep what they had.
//
// The store does not serialise changes to a network's endpoint list: the
// caller holds the lock that does (the CNI plugin's attachment lock) across
// listing the endpoints and calling Sync or Update, so that a pod being
// added is never missing from a rule set being applied.
package store

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
	"github.com/ternlabs/tern/services"
)

// ErrNotImplemented is returned (wrapped) when policies would have to be
// enforced on a datapath that cannot enforce them yet.
var ErrNotImplemented = errors.New("NetworkPolicy enforcement is not implemented yet for this datapath")

// Store is the policy state of one node, under one state directory.
type Store struct{ dir string }

// New returns the store under stateDir. It touches nothing.
func New(stateDir string) *Store {
	return &Store{dir: filepath.Join(stateDir, "policy")}
}

// Endpoint is a pod attachment on this node: its IPv4 address and the
// Kubernetes pod it belongs to (CNI_ARGS K8S_POD_NAMESPACE and
// K8S_POD_NAME). Endpoints without a namespace and name are not pods as
// far as policy goes: no policy selects them.
type Endpoint struct {
	IP        net.IP
	Namespace string
	Name      string
}

// Node is one network of the node as Sync and Update see it.
type Node struct {
	Network string
	// Endpoints are the network's pods on this node. When two share an
	// IP, the later one wins (a pod being added comes last).
	Endpoints []Endpoint
	// Hosts returns the node's own addresses (traffic between them and
	// local pods is always allowed). It is called only when a rule set is
	// compiled.
	Hosts func() ([]net.IP, error)
	// Enforcer is the network's datapath; nil if it cannot enforce
	// policy. Then Sync and Update succeed only while the state holds no
	// NetworkPolicy.
	Enforcer datapath.PolicyEnforcer
	// Datapath names the datapath in errors ("ebpf").
	Datapath string
	// Reapply says the datapath lost its policy state (the eBPF maps were
	// recreated after the node's pins were lost): Sync applies the whole
	// rule set, not the difference from the one on record.
	Reapply bool
	// Balancer is the network's own Service load balancer (services:
	// "ebpf"); nil when something else (kube-proxy) translates Services.
	// The Services and EndpointSlices of the state are compiled for it
	// with the policy, in the same update.
	Balancer datapath.ServiceBalancer
	// NodeName is the node's name as EndpointSlices spell it (nodeName),
	// for traffic policy Local; pods of Endpoints are local either way.
	NodeName string
}

func (s *Store) statePath() string { return filepath.Join(s.dir, "state.json") }

func (s *Store) appliedPath(network string) string {
	return filepath.Join(s.dir, "applied-"+network+".json")
}

func (s *Store) appliedServicesPath(network string) string {
	return filepath.Join(s.dir, "applied-services-"+network+".json")
}

func validNetwork(network string) error {
	if network == "" || network == "." || network == ".." || strings.ContainsAny(network, "/\x00") {
		return fmt.Errorf("policy store: invalid network name %q", network)
	}
	return nil
}

// Sync compiles the stored state for the node's endpoints and applies it
// to the network's datapath. Without a state file and without an applied
// rule set it returns at once, taking no lock and compiling nothing.
func (s *Store) Sync(n Node) error {
	if err := validNetwork(n.Network); err != nil {
		return err
	}
	if !exists(s.statePath()) && !exists(s.appliedPath(n.Network)) && !exists(s.appliedServicesPath(n.Network)) {
		return nil
	}
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	st, err := s.loadState()
	if err != nil {
		return err
	}
	prev, err := s.loadApplied(n.Network)
	if err != nil {
		return err
	}
	if st == nil && prev == nil {
		return nil
	}
	if n.Enforcer == nil {
		return notEnforced(n, st)
	}
	_, err = s.enforce(n, st, prev)
	return err
}

// Update replaces the desired state with change(current state) and
// enforces the result on the node's network before it returns. change gets
// a non-nil state and must not modify it (manifest.State's Apply and
// Delete return new states). On error nothing changes: not the state file,
// not the applied rule set, not the datapath. It returns the state before
// and after.
func (s *Store) Update(n Node, change func(*manifest.State) (*manifest.State, error)) (before, after *manifest.State, err error) {
	if err := validNetwork(n.Network); err != nil {
		return nil, nil, err
	}
	unlock, err := s.lock()
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	before, err = s.loadState()
	if err != nil {
		return nil, nil, err
	}
	if before == nil {
		before = manifest.NewState()
	}
	after, err = change(before)
	if err != nil {
		return nil, nil, err
	}
	if after == nil {
		after = manifest.NewState()
	}
	if n.Enforcer == nil {
		if err := notEnforced(n, after); err != nil {
			return nil, nil, err
		}
		if err := s.saveState(after); err != nil {
			return nil, nil, err
		}
		return before, after, nil
	}
	prev, err := s.loadApplied(n.Network)
	if err != nil {
		return nil, nil, err
	}
	undo, err := s.enforce(n, after, prev)
	if err != nil {
		return nil, nil, err
	}
	if err := s.saveState(after); err != nil {
		return nil, nil, errors.Join(err, undo())
	}
	return before, after, nil
}

// UpdateState replaces the desired state with change(current state)
// without compiling or applying anything: for a network that has no pod on
// the node and no rule set applied (ternd records the API server's state;
// the first CNI ADD enforces it). On error nothing changes.
func (s *Store) UpdateState(change func(*manifest.State) (*manifest.State, error)) (before, after *manifest.State, err error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, nil, err
	}
	defer unlock()
	before, err = s.loadState()
	if err != nil {
		return nil, nil, err
	}
	if before == nil {
		before = manifest.NewState()
	}
	if after, err = change(before); err != nil {
		return nil, nil, err
	}
	if after == nil {
		after = manifest.NewState()
	}
	if err := s.saveState(after); err != nil {
		return nil, nil, err
	}
	return before, after, nil
}

// notEnforced is the check for a datapath without enforcement: fine as
// long as no NetworkPolicy exists.
func notEnforced(n Node, st *manifest.State) error {
	if st == nil || len(st.Policies) == 0 {
		return nil
	}
	dp := n.Datapath
	if dp == "" {
		dp = "configured"
	}
	return fmt.Errorf("network %s: the %s datapath cannot enforce the %d NetworkPolicies in force: %w", n.Network, dp, len(st.Policies), ErrNotImplemented)
}

// enforce compiles st for the node, applies it and records it as applied.
// It returns the function that undoes both.
func (s *Store) enforce(n Node, st *manifest.State, prev *compile.RuleSet) (undo func() error, err error) {
	var hosts []net.IP
	if n.Hosts != nil {
		if hosts, err = n.Hosts(); err != nil {
			return nil, fmt.Errorf("policy: node addresses: %w", err)
		}
	}
	topo := Topology(st, n.Endpoints, hosts)
	next, err := compile.Compile(st, topo, prev)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	applyFrom := prev
	if n.Reapply {
		applyFrom = nil
	}
	if err := n.Enforcer.ApplyPolicy(applyFrom, next); err != nil {
		return nil, fmt.Errorf("policy: apply to network %s: %w", n.Network, err)
	}
	back := prev
	if back == nil {
		back = &compile.RuleSet{}
	}
	restoreDatapath := func() error {
		if err := n.Enforcer.ApplyPolicy(next, back); err != nil {
			return fmt.Errorf("policy: undo: restore the previous rule set of network %s: %w", n.Network, err)
		}
		return nil
	}
	if err := s.saveApplied(n.Network, next); err != nil {
		return nil, errors.Join(err, restoreDatapath())
	}
	undoServices := func() error { return nil }
	if n.Balancer != nil {
		if undoServices, err = s.balance(n, st, hosts); err != nil {
			return nil, errors.Join(err, s.restoreApplied(n.Network, prev), restoreDatapath())
		}
	}
	return func() error {
		return errors.Join(undoServices(), s.restoreApplied(n.Network, prev), restoreDatapath())
	}, nil
}

// restoreApplied puts back the record of the rule set applied before
// (none: no record).
func (s *Store) restoreApplied(network string, prev *compile.RuleSet) error {
	if prev == nil {
		if err := os.Remove(s.appliedPath(network)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("policy: undo: %w", err)
		}
		return nil
	}
	if err := s.saveApplied(network, prev); err != nil {
		return fmt.Errorf("policy: undo: %w", err)
	}
	return nil
}

// balance compiles the Services of st for the node, applies the table to
// the network's load balancer and records it. It returns the undo.
func (s *Store) balance(n Node, st *manifest.State, hosts []net.IP) (undo func() error, err error) {
	prev, err := s.loadAppliedServices(n.Network)
	if err != nil {
		return nil, err
	}
	node := services.Node{Name: n.NodeName}
	for _, h := range hosts {
		if a, ok := netip.AddrFromSlice(h); ok {
			node.Addrs = append(node.Addrs, a.Unmap())
		}
	}
	for _, ep := range n.Endpoints {
		if a, ok := netip.AddrFromSlice(ep.IP); ok {
			node.LocalPods = append(node.LocalPods, a.Unmap())
		}
	}
	next, err := services.Compile(st, node, prev)
	if err != nil {
		return nil, err
	}
	if err := n.Balancer.ApplyServices(prev, next); err != nil {
		return nil, fmt.Errorf("services: apply to network %s: %w", n.Network, err)
	}
	back := prev
	if back == nil {
		back = &services.Table{}
	}
	restore := func() error {
		if err := n.Balancer.ApplyServices(next, back); err != nil {
			return fmt.Errorf("services: undo: restore the previous table of network %s: %w", n.Network, err)
		}
		return nil
	}
	if err := saveJSON(s.appliedServicesPath(n.Network), "services", next); err != nil {
		return nil, errors.Join(err, restore())
	}
	return func() error {
		var err error
		if prev == nil {
			if e := os.Remove(s.appliedServicesPath(n.Network)); e != nil && !errors.Is(e, os.ErrNotExist) {
				err = fmt.Errorf("services: undo: %w", e)
			}
		} else {
			err = saveJSON(s.appliedServicesPath(n.Network), "services", prev)
		}
		return errors.Join(err, restore())
	}, nil
}

// AppliedServices returns the Service table last applied to the network,
// nil if none.
func (s *Store) AppliedServices(network string) (*services.Table, error) {
	if err := validNetwork(network); err != nil {
		return nil, err
	}
	return s.loadAppliedServices(network)
}

func (s *Store) loadAppliedServices(network string) (*services.Table, error) {
	return loadJSON[services.Table](s.appliedServicesPath(network))
}

// saveJSON writes v (what it is, for errors) as indented JSON to path,
// atomically.
func saveJSON(path, what string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("policy store: encode %s: %w", what, err)
	}
	return writeFileAtomic(path, append(b, '\n'))
}

// loadJSON decodes the JSON file at path; nil, and no error, when there is
// no file.
func loadJSON[T any](path string) (*T, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("policy store: %w", err)
	}
	v := new(T)
	if err := json.Unmarshal(b, v); err != nil {
		return nil, fmt.Errorf("policy store: decode %s: %w", path, err)
	}
	return v, nil
}

// Topology builds the policy topology of a network on this node: its
// endpoints (local, matched to Pod objects by namespace and name), the pods
// of other nodes the state knows the IPs of (status.podIPs), and the host
// addresses. An endpoint without namespace and name, or whose address is
// not IPv4, is left out. A host address that is also an endpoint's is
// dropped from the hosts.
func Topology(st *manifest.State, eps []Endpoint, hosts []net.IP) *policy.Topology {
	topo := &policy.Topology{Endpoints: map[string]policy.Endpoint{}}
	local := map[types.NamespacedName]bool{}
	for _, ep := range eps {
		a, ok := policy.Addr(ep.IP)
		if !ok || ep.Namespace == "" || ep.Name == "" {
			continue
		}
		topo.Endpoints[a.String()] = policy.Endpoint{Namespace: ep.Namespace, Name: ep.Name, Local: true}
		local[types.NamespacedName{Namespace: ep.Namespace, Name: ep.Name}] = true
	}
	seen := map[netip.Addr]bool{}
	for _, h := range hosts {
		a, ok := policy.Addr(h)
		if !ok || seen[a] {
			continue
		}
		seen[a] = true
		if _, isEP := topo.Endpoints[a.String()]; isEP {
			continue
		}
		topo.Hosts = append(topo.Hosts, net.IP(a.AsSlice()))
	}
	if st != nil {
		for ip, ep := range policy.TopologyFromState(st, "", nil).Endpoints {
			a := netip.MustParseAddr(ip)
			if _, taken := topo.Endpoints[ip]; taken || seen[a] || local[types.NamespacedName{Namespace: ep.Namespace, Name: ep.Name}] {
				continue
			}
			ep.Local = false
			topo.Endpoints[ip] = ep
		}
	}
	return topo
}

// Forget drops the record of the rule set applied to the network, for
// when the datapath has removed all of the network's policy state
// (ReleaseNode after the last pod): the next update starts from nothing.
func (s *Store) Forget(network string) error {
	if err := validNetwork(network); err != nil {
		return err
	}
	if !exists(s.appliedPath(network)) && !exists(s.appliedServicesPath(network)) {
		return nil
	}
	unlock, err := s.lock()
	if err != nil {
		return err
	}
	defer unlock()
	for _, p := range []string{s.appliedPath(network), s.appliedServicesPath(network)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("policy store: %w", err)
		}
	}
	return nil
}

// State returns the stored desired state (empty if there is none).
func (s *Store) State() (*manifest.State, error) {
	st, err := s.loadState()
	if st == nil && err == nil {
		st = manifest.NewState()
	}
	return st, err
}

// Applied returns the rule set last applied to the network, nil if none.
func (s *Store) Applied(network string) (*compile.RuleSet, error) {
	if err := validNetwork(network); err != nil {
		return nil, err
	}
	return s.loadApplied(network)
}

func (s *Store) loadState() (*manifest.State, error) {
	if !exists(s.statePath()) {
		return nil, nil
	}
	st, err := manifest.Load(s.statePath())
	if err != nil {
		return nil, fmt.Errorf("policy store: %w", err)
	}
	return st, nil
}

func (s *Store) saveState(st *manifest.State) error {
	return saveJSON(s.statePath(), "state", st)
}

func (s *Store) loadApplied(network string) (*compile.RuleSet, error) {
	return loadJSON[compile.RuleSet](s.appliedPath(network))
}

func (s *Store) saveApplied(network string, rs *compile.RuleSet) error {
	return saveJSON(s.appliedPath(network), "rule set", rs)
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// lock takes the store's file lock (blocking) and returns its release.
func (s *Store) lock() (func(), error) {
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("policy store: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("policy store: open lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("policy store: lock: %w", err)
	}
	return func() { f.Close() }, nil // closing the descriptor releases the lock
}

// writeFileAtomic replaces path with data: a temporary file in the same
// directory is written, synced and renamed over path, then the directory
// is synced.
func writeFileAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("policy store: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("policy store: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
			err = fmt.Errorf("policy store: write %s: %w", path, err)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Chmod(0o600); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// PolicyInfo describes one NetworkPolicy as it applies on this node.
type PolicyInfo struct {
	Namespace    string   `json:"namespace"`
	Name         string   `json:"name"`
	PolicyTypes  []string `json:"policyTypes"`
	IngressRules int      `json:"ingressRules"`
	EgressRules  int      `json:"egressRules"`
	// Endpoints are the local pods the policy selects, "namespace/name".
	Endpoints []string `json:"endpoints"`
}

// Describe lists the policies of st, sorted by namespace and name, with
// the local endpoints each selects. Policy types are the effective ones
// (Ingress always when none are given, Egress when there are egress
// rules); rule counts are those of the effective types.
func Describe(st *manifest.State, eps []Endpoint) []PolicyInfo {
	out := []PolicyInfo{}
	if st == nil {
		return out
	}
	for _, obj := range st.Objects() {
		np, ok := obj.(*networkingv1.NetworkPolicy)
		if !ok {
			continue
		}
		info := PolicyInfo{Namespace: np.Namespace, Name: np.Name, Endpoints: []string{}}
		ingress, egress := effectiveTypes(np)
		if ingress {
			info.PolicyTypes = append(info.PolicyTypes, string(networkingv1.PolicyTypeIngress))
			info.IngressRules = len(np.Spec.Ingress)
		}
		if egress {
			info.PolicyTypes = append(info.PolicyTypes, string(networkingv1.PolicyTypeEgress))
			info.EgressRules = len(np.Spec.Egress)
		}
		sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
		if err != nil {
			sel = labels.Nothing()
		}
		for _, ep := range eps {
			if ep.Namespace != np.Namespace || ep.Name == "" {
				continue
			}
			l := labels.Set{}
			if pod := st.Pods[types.NamespacedName{Namespace: ep.Namespace, Name: ep.Name}]; pod != nil {
				l = pod.Labels
			}
			if sel.Matches(l) {
				info.Endpoints = append(info.Endpoints, ep.Namespace+"/"+ep.Name)
			}
		}
		slices.Sort(info.Endpoints)
		info.Endpoints = slices.Compact(info.Endpoints)
		out = append(out, info)
	}
	return out
}

func effectiveTypes(np *networkingv1.NetworkPolicy) (ingress, egress bool) {
	if len(np.Spec.PolicyTypes) == 0 {
		return true, len(np.Spec.Egress) > 0
	}
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			ingress = true
		case networkingv1.PolicyTypeEgress:
			egress = true
		}
	}
	return ingress, egress
}
