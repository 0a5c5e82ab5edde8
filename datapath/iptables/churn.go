package iptables

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/policy/compile"
)

// forgetChurned deletes the kernel conntrack entries of every address whose
// pod identity changed between prev and next (compile.ChurnedIPs: a remote
// pod's IP reused by a pod with other labels), after next's chains are in
// place: TERN-FWD accepts ESTABLISHED before any policy chain, so an entry
// left behind would carry the old pod's allowance over to the new one. The
// flows' next packets start new entries and meet the policy chains of the
// identity the address has now.
func forgetChurned(prev, next *compile.RuleSet) error {
	var errs []error
	for _, ip := range compile.ChurnedIPs(prev, next) {
		for _, f := range []netlink.ConntrackFilterType{netlink.ConntrackOrigSrcIP, netlink.ConntrackOrigDstIP} {
			filter := &netlink.ConntrackFilter{}
			if err := filter.AddIP(f, ip); err != nil {
				errs = append(errs, err)
				continue
			}
			if _, err := netlinksafe.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, filter); err != nil {
				errs = append(errs, fmt.Errorf("forget the flows of %s: %w", ip, err))
			}
		}
	}
	return errors.Join(errs...)
}
