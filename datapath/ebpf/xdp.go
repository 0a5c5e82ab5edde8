package ebpf

import (
	"errors"
	"fmt"

	cilium "github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/loader"
)

// Acceleration says whether NodePort traffic from outside the node is
// translated at the uplink's XDP (bpf/xdp_uplink.c) before the kernel
// allocates an skb for it, ahead of tern_from_uplink at tc, which handles
// everything XDP leaves alone and is the whole path without XDP.
type Acceleration string

const (
	// AccelerationNone: tc alone (the default).
	AccelerationNone Acceleration = "none"
	// AccelerationXDP: XDP in driver mode, or the node setup fails (a
	// driver without native XDP).
	AccelerationXDP Acceleration = "xdp"
	// AccelerationAuto: XDP where the uplink's driver has native XDP, tc
	// alone where it has not.
	AccelerationAuto Acceleration = "auto"
)

// xdpUnsupported reports whether err is a driver refusing native XDP (the
// only failure "auto" falls back from).
func xdpUnsupported(err error) bool {
	return errors.Is(err, cilium.ErrNotSupported) || errors.Is(err, unix.EOPNOTSUPP) ||
		errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EINVAL)
}

func (d *Datapath) wantXDP() bool {
	return d.cfg.LoadBalancer && (d.cfg.Acceleration == AccelerationXDP || d.cfg.Acceleration == AccelerationAuto)
}

// ensureXDP attaches the XDP program to the uplink when the config asks
// for it (after tc's programs: a frame XDP translated relies on
// tern_from_uplink to deliver it), and takes it off any other interface
// (the uplink changed) or off the uplink when it is not wanted.
func (d *Datapath) ensureXDP(up Uplink) error {
	attached := false
	if d.wantXDP() {
		err := d.loader.CheckAttached(d.objs, up.Name, up.Ifindex, loader.HookUplinkXDP)
		if err != nil {
			_, err = d.loader.Attach(d.objs, up.Name, up.Ifindex, loader.HookUplinkXDP, d.cfg.Attach)
		}
		switch {
		case err == nil:
			attached = true
		case d.cfg.Acceleration == AccelerationAuto && xdpUnsupported(err):
			// No native XDP on this driver: tc alone does it all.
		default:
			return fmt.Errorf("attach XDP to uplink %s (nodePortAcceleration %q): %w", up.Name, d.cfg.Acceleration, err)
		}
	}
	ifnames, err := d.loader.Attachments(loader.HookUplinkXDP)
	if err != nil {
		return err
	}
	for _, ifname := range ifnames {
		if attached && ifname == up.Name {
			continue
		}
		if err := d.loader.Detach(ifname, loader.HookUplinkXDP); err != nil {
			return fmt.Errorf("detach XDP from %s: %w", ifname, err)
		}
	}
	return nil
}

// releaseXDP takes the XDP program off every interface.
func (d *Datapath) releaseXDP() error {
	ifnames, err := d.loader.Attachments(loader.HookUplinkXDP)
	if err != nil {
		return err
	}
	var errs []error
	for _, ifname := range ifnames {
		errs = append(errs, d.loader.Detach(ifname, loader.HookUplinkXDP))
	}
	return errors.Join(errs...)
}

// checkXDP reports an error when XDP is required (nodePortAcceleration
// "xdp") and not attached to the uplink. "auto" may have fallen back.
func (d *Datapath) checkXDP(up Uplink) error {
	if !d.cfg.LoadBalancer || d.cfg.Acceleration != AccelerationXDP {
		return nil
	}
	if err := d.loader.CheckAttached(d.objs, up.Name, up.Ifindex, loader.HookUplinkXDP); err != nil {
		return fmt.Errorf("uplink: %w", err)
	}
	return nil
}
