package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/plugins/pkg/netlinksafe"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/datapath/iptables"
	"github.com/ternlabs/tern/loader"
)

// CmdGC removes every attachment of this network that is not listed in
// cni.dev/valid-attachments: records, veths, datapath entries and IPs.
func CmdGC(args *skel.CmdArgs) error {
	return cniError(cmdGC(args))
}

func cmdGC(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	var gc struct {
		Valid []types.GCAttachment `json:"cni.dev/valid-attachments"`
	}
	if err := json.Unmarshal(args.StdinData, &gc); err != nil {
		return types.NewError(types.ErrDecodingFailure, "decode cni.dev/valid-attachments", err.Error())
	}
	valid := map[attachmentKey]bool{}
	for _, a := range gc.Valid {
		valid[attachmentKey{a.ContainerID, a.IfName}] = true
	}

	recs := newRecords(conf.StateDir, conf.Name)
	all, err := recs.list()
	if err != nil {
		return err
	}
	var errs []error
	var kept []*datapath.Endpoint
	for _, r := range all {
		if valid[attachmentKey{r.ContainerID, r.IfName}] {
			kept = append(kept, r.endpoint())
			continue
		}
		if err := conf.teardown(r.ContainerID, r.IfName); err != nil {
			errs = append(errs, fmt.Errorf("collect %s/%s: %w", r.ContainerID, r.IfName, err))
		}
	}
	if err := removeStrayVeths(conf.Name, valid); err != nil {
		errs = append(errs, err)
	}
	if err := conf.sweepDatapath(kept); err != nil {
		errs = append(errs, err)
	}
	if err := conf.ipamGC(args.StdinData, valid); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeStrayVeths deletes host veths this network created (recognised by
// their alias) whose attachment is not valid, even without a record.
func removeStrayVeths(network string, valid map[attachmentKey]bool) error {
	links, err := netlinksafe.LinkList()
	if err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	prefix := "tern:" + network + ":"
	var errs []error
	for _, lk := range links {
		alias := lk.Attrs().Alias
		if lk.Type() != "veth" || !strings.HasPrefix(alias, prefix) {
			continue
		}
		// Interface names cannot hold ':', container IDs might: split at the last.
		rest := strings.TrimPrefix(alias, prefix)
		i := strings.LastIndex(rest, ":")
		if i < 0 || valid[attachmentKey{rest[:i], rest[i+1:]}] {
			continue
		}
		if err := deleteHostVeth(lk.Attrs().Name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// sweepDatapath removes datapath entries no kept attachment owns.
func (c *NetConf) sweepDatapath(kept []*datapath.Endpoint) error {
	if c.Datapath == DatapathIPTables {
		// Every attachment on record under the records lock, not only
		// the kept ones: an ADD running meanwhile has its chain in place
		// before its record, and sweeping that chain would let its pod's
		// frames pass unchecked.
		recs := newRecords(c.StateDir, c.Name)
		lock, err := loader.Lock(recs.lockPath())
		if err != nil {
			return err
		}
		defer lock.Unlock()
		all, err := recs.list()
		if err != nil {
			return err
		}
		veths := make([]string, 0, len(all))
		for _, r := range all {
			veths = append(veths, r.HostVeth)
		}
		return iptables.SweepAntispoof(c.Name, veths)
	}
	if c.Datapath != DatapathEBPF {
		return nil
	}
	dp, err := c.newDatapath(nil, nil)
	if err != nil {
		return err
	}
	defer closeDatapath(dp)
	sw, ok := dp.(interface {
		Sweep([]*datapath.Endpoint) error
	})
	if !ok {
		return nil
	}
	lock, err := loader.Lock(newRecords(c.StateDir, c.Name).lockPath())
	if err != nil {
		return err
	}
	defer lock.Unlock()
	return sw.Sweep(kept)
}
