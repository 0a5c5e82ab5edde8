// Package datapath defines what the CNI plugin asks of a datapath. Two
// implementations live below it: ebpf (tc programs and pinned maps) and
// iptables (a Linux bridge and iptables chains).
//
// Every method runs in the network namespace of the node (the namespace the
// plugin was started in), never inside the pod's namespace.
package datapath

import (
	"net"
)

// Endpoint is one pod interface as the datapath sees it.
type Endpoint struct {
	ContainerID string
	IfName      string // interface name inside the pod (CNI_IFNAME)

	HostVeth    string // host-side veth name
	HostIfindex int
	HostMAC     net.HardwareAddr
	PodMAC      net.HardwareAddr

	IP      net.IPNet // pod address (IPv4) with the prefix of its pool
	Gateway net.IP    // gateway the pod routes through

	PodNamespace string // K8S_POD_NAMESPACE, may be empty
	PodName      string // K8S_POD_NAME, may be empty

	// Shaped: the pod has bandwidth limits (runtimeConfig.bandwidth, the
	// bandwidth plugin chained after Tern shapes it on the host veth). The
	// eBPF datapath then sends its traffic through the host stack and that
	// veth's qdiscs instead of its fast path; the iptables datapath does
	// anyway.
	Shaped bool
}

// Datapath wires the host side of pod interfaces.
type Datapath interface {
	// EnsureNode prepares node-wide state (programs and maps, or bridge and
	// chains). It is idempotent and safe to call from concurrent plugin
	// processes.
	EnsureNode() error
	// AddEndpoint connects a new host-side veth to the datapath.
	AddEndpoint(ep *Endpoint) error
	// DelEndpoint removes every trace of the endpoint. Missing pieces are
	// not an error: DEL must be idempotent.
	DelEndpoint(ep *Endpoint) error
	// CheckEndpoint reports the first piece of the endpoint's wiring that is
	// missing or wrong.
	CheckEndpoint(ep *Endpoint) error
	// ReleaseNode removes node-wide state that only exists for endpoints,
	// when the last endpoint of the network has gone (remaining == 0).
	ReleaseNode(remaining int) error
	// Status reports whether ADD can be served.
	Status() error
}

// Remote is a pod CIDR of another node as a datapath's fast path needs it
// (package routing computes them from the cluster's nodes).
type Remote struct {
	CIDR   net.IPNet // the other node's pod CIDR
	NodeIP net.IP    // that node's InternalIP (IPv4)
	// TunnelIfindex is this node's VXLAN device in VXLAN mode: packets for
	// CIDR are encapsulated to NodeIP through it. 0: native routing.
	TunnelIfindex int
}

// RemoteTable is implemented by datapaths with a table of other nodes' pod
// CIDRs (the eBPF datapath's tern_remote map). The iptables datapath has
// none: kernel routes alone carry its cross-node traffic.
type RemoteTable interface {
	// SyncRemotes makes the table hold exactly remotes, by difference:
	// new and changed entries first, stale ones last.
	SyncRemotes(remotes []Remote) error
	// AttachTunnel attaches the decapsulation program to the node's
	// VXLAN device, before any entry points at it.
	AttachTunnel(ifname string, ifindex int) error
	// DetachTunnel removes it (missing is not an error).
	DetachTunnel(ifname string) error
}
