package network

import (
	"net"
	"path/filepath"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
)

// fakeEnforcer records the rule sets it is asked to apply.
type fakeEnforcer struct{ applied [][2]*compile.RuleSet }

func (f *fakeEnforcer) ApplyPolicy(prev, next *compile.RuleSet) error {
	f.applied = append(f.applied, [2]*compile.RuleSet{prev, next})
	return nil
}

func testNetwork(t *testing.T, eps *[]*datapath.Endpoint, enf *fakeEnforcer, opened *int) *Network {
	dir := t.TempDir()
	return &Network{
		Name:       "net1",
		Datapath:   "ebpf",
		StateDir:   dir,
		AttachLock: filepath.Join(dir, "attach.lock"),
		Endpoints:  func() ([]*datapath.Endpoint, error) { return *eps, nil },
		OpenEnforcer: func() (datapath.PolicyEnforcer, func(), error) {
			*opened++
			return enf, func() {}, nil
		},
	}
}

func testState(t *testing.T) *manifest.State {
	t.Helper()
	st, err := manifest.NewState().Apply([]manifest.Object{
		&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "p", Labels: map[string]string{"app": "p"}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c"}}},
		},
		&networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "deny"},
			Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestReplaceWithoutPods: with no pod on the node and nothing applied,
// Replace records the desired state and does not open the datapath (a
// node without pods keeps no datapath state).
func TestReplaceWithoutPods(t *testing.T) {
	var eps []*datapath.Endpoint
	enf, opened := &fakeEnforcer{}, 0
	n := testNetwork(t, &eps, enf, &opened)
	got, err := n.Replace(testState(t))
	if err != nil || got != 0 {
		t.Fatalf("Replace: %d, %v", got, err)
	}
	if opened != 0 || len(enf.applied) != 0 {
		t.Fatalf("datapath opened %d times, %d applies", opened, len(enf.applied))
	}
	st, err := n.Store().State()
	if err != nil || len(st.Policies) != 1 || len(st.Pods) != 1 {
		t.Fatalf("stored state: %+v, %v", st, err)
	}
	if rs, err := n.Store().Applied("net1"); rs != nil || err != nil {
		t.Fatalf("applied rule set: %v, %v", rs, err)
	}
}

// TestReplaceDiffs: with a pod, Replace compiles and applies; a second
// Replace of the same state hands the datapath the applied rule set as
// prev (a diff, never clear then rebuild).
func TestReplaceDiffs(t *testing.T) {
	eps := []*datapath.Endpoint{{IP: net.IPNet{IP: net.IPv4(10, 9, 0, 5).To4(), Mask: net.CIDRMask(24, 32)}, PodNamespace: "a", PodName: "p"}}
	enf, opened := &fakeEnforcer{}, 0
	n := testNetwork(t, &eps, enf, &opened)
	for i := range 2 {
		got, err := n.Replace(testState(t))
		if err != nil || got != 1 {
			t.Fatalf("Replace %d: %d, %v", i, got, err)
		}
	}
	if len(enf.applied) != 2 {
		t.Fatalf("%d applies, want 2", len(enf.applied))
	}
	if enf.applied[0][0] != nil || enf.applied[1][0] == nil {
		t.Fatalf("prev of the applies: %v, %v: want nil, then the applied rule set", enf.applied[0][0], enf.applied[1][0])
	}
	applied, err := n.Store().Applied("net1")
	if err != nil || applied == nil {
		t.Fatalf("applied rule set: %v, %v", applied, err)
	}
}
