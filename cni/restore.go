package cni

import (
	"fmt"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/policy/store"
)

// restorer is a datapath that can lose its node state under running pods
// (the eBPF datapath's pins) and restore it from the attachment records.
type restorer interface {
	// PolicyLost reports whether the policy state must be applied whole.
	PolicyLost() (bool, error)
	// Restore re-wires the endpoints whose datapath state is missing.
	Restore(eps []*datapath.Endpoint) (int, error)
}

// restoreEndpoints brings the endpoints on record back into the datapath
// when it lost them (see datapath/ebpf's Restore): NetworkPolicy first, the
// whole rule set, then the endpoints, so that no restored pod forwards
// before its policy is in place. ADD calls it with the records lock held,
// before it wires its own pod.
func (c *NetConf) restoreEndpoints(dp datapath.Datapath, others []*datapath.Endpoint) error {
	r, ok := dp.(restorer)
	if !ok || len(others) == 0 {
		return nil
	}
	lost, err := r.PolicyLost()
	if err != nil {
		return err
	}
	if lost {
		n := c.policyNode(enforcer(dp), others)
		n.Reapply = true
		if err := store.New(c.StateDir).Sync(n); err != nil {
			return fmt.Errorf("restore NetworkPolicy after lost pins: %w", err)
		}
	}
	if _, err := r.Restore(others); err != nil {
		return fmt.Errorf("restore endpoints: %w", err)
	}
	return nil
}
