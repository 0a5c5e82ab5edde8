package ebpf

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// Host processes reaching Services (services "ebpf"): bpf/sock_lb.c's
// socket programs, attached to the cgroup v2 directory
// Config.HostServicesCgroup (the cgroup2 root in production), translate
// the node's own connect()s and datagrams to ClusterIPs and node ports.
// They translate only sockets of the node's network namespace, whose
// cookie tern_sock_config holds: pods' sockets, attached below the same
// root, are balanced by tern_from_pod.

// soNetnsCookie is SO_NETNS_COOKIE (Linux 5.14; asm-generic/socket.h),
// which golang.org/x/sys does not define.
const soNetnsCookie = 71

// NetnsCookie returns the cookie of the calling thread's network namespace,
// the value bpf_get_netns_cookie returns for its sockets.
func NetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket for the netns cookie: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, soNetnsCookie)
	if err != nil {
		return 0, fmt.Errorf("SO_NETNS_COOKIE: %w", err)
	}
	return c, nil
}

// ensureHostServices writes the node's netns cookie and attaches the socket
// programs. The cookie goes first: attached programs with a cookie of 0
// translate nothing.
func (d *Datapath) ensureHostServices() error {
	if !d.cfg.LoadBalancer || d.cfg.HostServicesCgroup == "" {
		return nil
	}
	cookie, err := NetnsCookie()
	if err != nil {
		return err
	}
	if err := d.writeSockConfig(ternbpf.TernSockSockConfig{NetnsCookie: cookie}); err != nil {
		return err
	}
	if err := d.loader.AttachCgroup(d.objs, d.cfg.HostServicesCgroup); err != nil {
		return fmt.Errorf("host services: %w", err)
	}
	return nil
}

func (d *Datapath) writeSockConfig(want ternbpf.TernSockSockConfig) error {
	m, err := d.objs.Map(ternbpf.TernSockMapTernSockConfig)
	if err != nil {
		return err
	}
	var cur ternbpf.TernSockSockConfig
	if err := m.Lookup(uint32(0), &cur); err == nil && cur == want {
		return nil
	}
	if err := m.Put(uint32(0), want); err != nil {
		return fmt.Errorf("write %s: %w", ternbpf.TernSockMapTernSockConfig, err)
	}
	return nil
}

// releaseHostServices detaches the socket programs and clears the cookie:
// the node's last endpoint is gone (network teardown).
func (d *Datapath) releaseHostServices() error {
	var errs []error
	if err := d.loader.DetachCgroup(); err != nil {
		errs = append(errs, err)
	}
	if _, err := d.objs.Map(ternbpf.TernSockMapTernSockConfig); err == nil {
		if err := d.writeSockConfig(ternbpf.TernSockSockConfig{}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
