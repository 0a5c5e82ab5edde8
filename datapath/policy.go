package datapath

import "github.com/ternlabs/tern/policy/compile"

// PolicyEnforcer is a datapath that enforces compiled NetworkPolicy.
type PolicyEnforcer interface {
	// ApplyPolicy moves the datapath's policy state from prev (nil: none
	// applied yet) to next without a moment of open access and without
	// dropping established allowed connections: entries that allow are
	// written before entries that isolate, and old entries are removed
	// last. Endpoints in next that the datapath has not seen yet (a pod
	// being added) get their policy state now, so their first packet is
	// already checked.
	//
	// prev is the rule set the policy store recorded as applied (package
	// policy/store). ReleaseNode(0) must remove the network's policy state
	// along with everything else; the store then forgets prev, so the next
	// ApplyPolicy gets prev == nil. On error the datapath must keep
	// enforcing prev: the store keeps prev as the applied rule set.
	ApplyPolicy(prev, next *compile.RuleSet) error
}
