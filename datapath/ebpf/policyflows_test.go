package ebpf

import (
	"testing"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// TestPolicyFlowsPerPodSetting: the per-pod new-flow bound reaches the
// objects that charge it, and is off (0) by default: a busy pod's
// connection rate is not capped unless the operator asks.
func TestPolicyFlowsPerPodSetting(t *testing.T) {
	for _, c := range []struct {
		set, want uint32
	}{{0, 0}, {5000, 5000}} {
		n := DefaultNAT()
		n.PolicyFlowsPerPod = c.set
		specs, err := New(Config{BPFFSDir: "/nonexistent", StateDir: "/nonexistent", NAT: n}).loader.Specs()
		if err != nil {
			t.Fatal(err)
		}
		found := 0
		for _, spec := range specs {
			v, ok := spec.Variables[ternbpf.TernVarPolicyCtPodFlows]
			if !ok {
				continue
			}
			found++
			var got uint32
			if err := v.Get(&got); err != nil {
				t.Fatal(err)
			}
			if got != c.want {
				t.Errorf("policyFlowsPerPod %d: object variable %d, want %d", c.set, got, c.want)
			}
		}
		if found == 0 {
			t.Fatal("no object has policy_ct_pod_flows")
		}
	}
}
