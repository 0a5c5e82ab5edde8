package cni

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/ternlabs/tern/datapath"
)

// Collect removes the attachments for which gone returns true, as CNI GC
// does for attachments missing from cni.dev/valid-attachments: datapath
// state, veth, record, and IP. gone gets each recorded endpoint and how
// long ago its record was written, so a caller whose view of the cluster
// lags (ternd's informer cache) can spare attachments younger than the lag.
// stdin is the network configuration delegated IPAM plugins get. It
// returns the endpoints it removed.
func (c *NetConf) Collect(stdin []byte, gone func(ep *datapath.Endpoint, age time.Duration) bool) ([]*datapath.Endpoint, error) {
	recs := newRecords(c.StateDir, c.Name)
	all, err := recs.list()
	if err != nil {
		return nil, err
	}
	var (
		removed []*datapath.Endpoint
		errs    []error
	)
	for _, r := range all {
		age := time.Duration(0)
		if fi, err := os.Stat(recs.path(r.ContainerID, r.IfName)); err == nil {
			age = time.Since(fi.ModTime())
		}
		ep := r.endpoint()
		if !gone(ep, age) {
			continue
		}
		if err := c.teardown(r.ContainerID, r.IfName); err != nil {
			errs = append(errs, fmt.Errorf("collect %s/%s: %w", r.ContainerID, r.IfName, err))
			continue
		}
		if err := c.ipamDel(r.ContainerID, r.IfName, stdin); err != nil {
			errs = append(errs, fmt.Errorf("collect %s/%s: %w", r.ContainerID, r.IfName, err))
		}
		removed = append(removed, ep)
	}
	return removed, errors.Join(errs...)
}

// CheckDatapath reports whether the datapath is loaded or loadable and its
// uplink exists (what STATUS checks, without IPAM).
func (c *NetConf) CheckDatapath() error { return c.datapathStatus() }
