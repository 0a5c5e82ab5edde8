package policy

import (
	"net"
	"net/netip"

	corev1 "k8s.io/api/core/v1"

	"github.com/ternlabs/tern/policy/manifest"
)

// TopologyFromState builds a Topology from the pods of a state: each pod's
// IPv4 addresses (status.podIPs, else status.podIP) are endpoints, local if
// spec.nodeName is node. Host-network pods (their IP is a node's) and pods
// that have finished (Succeeded, Failed) are left out. If two pods claim one
// IP the first in namespace/name order keeps it.
func TopologyFromState(st *manifest.State, node string, hosts []net.IP) *Topology {
	t := &Topology{Endpoints: map[string]Endpoint{}, Hosts: hosts}
	for _, obj := range st.Objects() {
		pod, ok := obj.(*corev1.Pod)
		if !ok || pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		ips := []string{pod.Status.PodIP}
		if len(pod.Status.PodIPs) > 0 {
			ips = ips[:0]
			for _, ip := range pod.Status.PodIPs {
				ips = append(ips, ip.IP)
			}
		}
		for _, s := range ips {
			a, err := netip.ParseAddr(s)
			if err != nil || !a.Is4() {
				continue
			}
			if _, taken := t.Endpoints[a.String()]; taken {
				continue
			}
			t.Endpoints[a.String()] = Endpoint{Namespace: pod.Namespace, Name: pod.Name, Local: pod.Spec.NodeName == node}
		}
	}
	return t
}
