package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/ternlabs/tern/ipam"
)

// builtinIPAM reports whether addresses come from Tern's own store.
func (c *NetConf) builtinIPAM() bool { return c.pool != nil }

func (c *NetConf) ipamStore() (*ipam.Store, error) {
	return ipam.NewStore(filepath.Join(c.StateDir, "ipam", c.Name), c.pool)
}

// ipamAdd allocates the pod's address: from the built-in store, or by
// delegating to the plugin named in ipam.type (found via CNI_PATH). The
// delegation calls invoke directly, as plugins/pkg/ipam's ExecAdd, ExecDel
// and ExecCheck do: that package imports plugins/pkg/ip, whose
// dependencies' package init (knftables, go-iptables) every exec of the
// plugin would pay.
func (c *NetConf) ipamAdd(containerID, ifname string, stdin []byte) (*current.Result, error) {
	if !c.builtinIPAM() {
		r, err := invoke.DelegateAdd(context.TODO(), c.IPAM.Type, stdin, nil)
		if err != nil {
			return nil, fmt.Errorf("delegate ADD to IPAM plugin %s: %w", c.IPAM.Type, err)
		}
		res, err := current.NewResultFromResult(r)
		if err != nil {
			return nil, fmt.Errorf("convert result of IPAM plugin %s: %w", c.IPAM.Type, err)
		}
		return res, nil
	}
	store, err := c.ipamStore()
	if err != nil {
		return nil, err
	}
	ip, err := store.Allocate(containerID, ifname)
	if err != nil {
		if errors.Is(err, ipam.ErrExhausted) {
			return nil, types.NewError(types.ErrTryAgainLater, "IP pool exhausted", err.Error())
		}
		return nil, err
	}
	return &current.Result{IPs: []*current.IPConfig{c.pool.Result(ip)}, Routes: c.pool.Routes}, nil
}

// ipamDel releases the pod's address; releasing nothing is not an error.
func (c *NetConf) ipamDel(containerID, ifname string, stdin []byte) error {
	if c.chained() {
		return nil // the plugin before Tern owns the address
	}
	if !c.builtinIPAM() {
		if err := invoke.DelegateDel(context.TODO(), c.IPAM.Type, stdin, nil); err != nil {
			return fmt.Errorf("delegate DEL to IPAM plugin %s: %w", c.IPAM.Type, err)
		}
		return nil
	}
	store, err := c.ipamStore()
	if err != nil {
		return err
	}
	return store.Release(containerID, ifname)
}

// ipamCheck verifies the pod still holds ip.
func (c *NetConf) ipamCheck(containerID, ifname string, stdin []byte, ip net.IP) error {
	if c.chained() {
		return nil // the plugin before Tern owns the address
	}
	if !c.builtinIPAM() {
		if err := invoke.DelegateCheck(context.TODO(), c.IPAM.Type, stdin, nil); err != nil {
			return fmt.Errorf("IPAM plugin %s CHECK: %w", c.IPAM.Type, err)
		}
		return nil
	}
	store, err := c.ipamStore()
	if err != nil {
		return err
	}
	ips, err := store.Lookup(containerID, ifname)
	if err != nil {
		return err
	}
	for _, held := range ips {
		if held.Equal(ip) {
			return nil
		}
	}
	return fmt.Errorf("IP %s is not allocated to %s/%s in the IPAM store", ip, containerID, ifname)
}

// ipamStatus reports whether an ADD could get an address.
func (c *NetConf) ipamStatus(stdin []byte) error {
	if c.chained() {
		return nil // the plugin before Tern owns the address
	}
	if !c.builtinIPAM() {
		if err := invoke.DelegateStatus(context.TODO(), c.IPAM.Type, stdin, nil); err != nil {
			return fmt.Errorf("IPAM plugin %s STATUS: %w", c.IPAM.Type, err)
		}
		return nil
	}
	store, err := c.ipamStore()
	if err != nil {
		return err
	}
	free, err := store.Free()
	if err != nil {
		return err
	}
	if free == 0 {
		return fmt.Errorf("no free IP left in %s", &c.pool.Subnet)
	}
	return nil
}

// ipamGC releases addresses of attachments not in valid.
func (c *NetConf) ipamGC(stdin []byte, valid map[attachmentKey]bool) error {
	if c.chained() {
		return nil // the plugin before Tern owns the address
	}
	if !c.builtinIPAM() {
		if err := invoke.DelegateGC(context.TODO(), c.IPAM.Type, stdin, nil); err != nil {
			return fmt.Errorf("IPAM plugin %s GC: %w", c.IPAM.Type, err)
		}
		return nil
	}
	store, err := c.ipamStore()
	if err != nil {
		return err
	}
	allocs, err := store.List()
	if err != nil {
		return err
	}
	var errs []error
	for _, a := range allocs {
		if !valid[attachmentKey{a.ContainerID, a.IfName}] {
			if err := store.Release(a.ContainerID, a.IfName); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

type attachmentKey struct{ containerID, ifname string }
