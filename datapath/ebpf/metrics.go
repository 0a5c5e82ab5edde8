package ebpf

import (
	"fmt"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// metricTable names and describes each value of the C enum metric
// (bpf/include/tern_types.h), indexed by it: the name is the enumerator
// lower-cased without the METRIC_ prefix, the description what ternctl
// (get counters, monitor, explain) says it counts. The one place a metric
// added to the enum needs a line: TestMetricNames keeps the names in step
// with the C header and fails on a missing description.
var metricTable = [...]struct{ name, description string }{
	ternbpf.TernMetricMETRIC_REDIRECT_PEER:        {"redirect_peer", "delivered into a pod of this node by bpf_redirect_peer"},
	ternbpf.TernMetricMETRIC_PASS_HOST:            {"pass_host", "from a pod, handed to the host stack (node, other nodes, not masqueraded)"},
	ternbpf.TernMetricMETRIC_PASS_NON_IPV4:        {"pass_non_ipv4", "ARP from a pod with its own MAC and IP, left to the stack"},
	ternbpf.TernMetricMETRIC_PASS_TTL:             {"pass_ttl", "TTL would expire: left to the stack to send ICMP"},
	ternbpf.TernMetricMETRIC_DROP_TRUNCATED:       {"drop_truncated", "dropped: frame too short for the headers it claims"},
	ternbpf.TernMetricMETRIC_DROP_SPOOFED:         {"drop_spoofed", "dropped: source IP or MAC is not the sending pod's"},
	ternbpf.TernMetricMETRIC_DROP_REDIRECT:        {"drop_redirect", "dropped: a helper on the forwarding path failed"},
	ternbpf.TernMetricMETRIC_SNAT:                 {"snat", "masqueraded to the node IP and sent out of the uplink"},
	ternbpf.TernMetricMETRIC_REV_SNAT:             {"rev_snat", "reply of a masqueraded flow, translated back and delivered to the pod"},
	ternbpf.TernMetricMETRIC_PASS_UPLINK:          {"pass_uplink", "uplink ingress: not for a pod, left to the host stack"},
	ternbpf.TernMetricMETRIC_DROP_NAT_NO_PORT:     {"drop_nat_no_port", "dropped: masquerade needed, every probed NAT port was taken"},
	ternbpf.TernMetricMETRIC_DROP_NAT_MAP_FULL:    {"drop_nat_map_full", "dropped: masquerade needed, a NAT map refused the entry"},
	ternbpf.TernMetricMETRIC_DROP_NAT_UNSUPPORTED: {"drop_nat_unsupported", "dropped: masquerade needed for a protocol or fragment NAT cannot handle"},
	ternbpf.TernMetricMETRIC_DROP_POLICY_INGRESS:  {"drop_policy_ingress", "dropped: NetworkPolicy, the destination pod's ingress rules deny the flow"},
	ternbpf.TernMetricMETRIC_DROP_POLICY_EGRESS:   {"drop_policy_egress", "dropped: NetworkPolicy, the source pod's egress rules deny the flow"},
	ternbpf.TernMetricMETRIC_PASS_TO_POD:          {"pass_to_pod", "host veth egress: delivered to the pod by the host stack, policy passed"},
	ternbpf.TernMetricMETRIC_DROP_NON_IPV4:        {"drop_non_ipv4", "dropped: neither IPv4 nor ARP (IPv6, VLAN-tagged, other ethertypes)"},
	ternbpf.TernMetricMETRIC_DROP_ARP_SPOOFED:     {"drop_arp_spoofed", "dropped: ARP whose sender MAC or IP is not the sending pod's"},
	ternbpf.TernMetricMETRIC_DROP_LOOPBACK:        {"drop_loopback", "dropped: from a pod to 127.0.0.0/8 (reachable only through route_localnet)"},
	ternbpf.TernMetricMETRIC_DROP_REV_TTL:         {"drop_rev_ttl", "dropped: reply of a masqueraded flow whose TTL expires on the hop into the pod"},
	ternbpf.TernMetricMETRIC_DROP_NAT_NO_ROUTE:    {"drop_nat_no_route", "dropped: masquerade needed, but no route out of the uplink"},
	ternbpf.TernMetricMETRIC_DROP_NAT_TOO_BIG:     {"drop_nat_too_big", "dropped: masquerade needed, larger than the uplink MTU and DF clear"},
	ternbpf.TernMetricMETRIC_DROP_NAT_ICMP:        {"drop_nat_icmp", "dropped: ICMP from a pod that masquerade cannot translate"},
	ternbpf.TernMetricMETRIC_NAT_REV_LOST:         {"nat_rev_lost", "a flow's reverse NAT entry was gone or another flow's: re-allocated (should stay 0)"},
	ternbpf.TernMetricMETRIC_NAT_GC:               {"nat_gc", "expired NAT entries removed by the garbage collector (packets = entries)"},
	ternbpf.TernMetricMETRIC_PASS_SERVICE:         {"pass_service", "to a Service CIDR: left to the host stack (kube-proxy) undecided"},
	ternbpf.TernMetricMETRIC_PASS_STACK_REPLY:     {"pass_stack_reply", "answer of a flow the host stack delivered into a pod: back through the stack"},
	ternbpf.TernMetricMETRIC_DROP_SVC_NO_DNAT:     {"drop_svc_no_dnat", "dropped: uplink egress, a pod's packet to a Service CIDR nothing translated"},
	ternbpf.TernMetricMETRIC_REMOTE_NATIVE:        {"remote_native", "to a pod of another node: FIB lookup and bpf_redirect_neigh out of the uplink (native routing)"},
	ternbpf.TernMetricMETRIC_REMOTE_VXLAN:         {"remote_vxlan", "to a pod of another node: VXLAN tunnel key set, redirected to the VXLAN device"},
	ternbpf.TernMetricMETRIC_FROM_REMOTE:          {"from_remote", "from a pod of another node, delivered into a pod of this node by bpf_redirect_peer"},
	ternbpf.TernMetricMETRIC_DROP_TUNNEL_FORGED:   {"drop_tunnel_forged", "dropped: VXLAN packet whose outer source is not the node owning its inner source (or pod traffic of a VXLAN node arriving unencapsulated)"},
	ternbpf.TernMetricMETRIC_DROP_TUNNEL_NO_POD:   {"drop_tunnel_no_pod", "dropped: decapsulated VXLAN packet neither for a pod of this node nor for the node itself"},
	ternbpf.TernMetricMETRIC_TUNNEL_TO_HOST:       {"tunnel_to_host", "VXLAN: from another node's pod to this node's own address, handed to the host stack"},
	ternbpf.TernMetricMETRIC_LB_DNAT:              {"lb_dnat", "services \"ebpf\": a pod's packet to a Service translated to its backend"},
	ternbpf.TernMetricMETRIC_LB_REV_NAT:           {"lb_rev_nat", "services \"ebpf\": a backend's answer translated back to the Service address"},
	ternbpf.TernMetricMETRIC_LB_HAIRPIN:           {"lb_hairpin", "services \"ebpf\": a pod reaching itself through its Service (service-loopback address)"},
	ternbpf.TernMetricMETRIC_LB_REJECT:            {"lb_reject", "services \"ebpf\": a Service without endpoints answered with ICMP port unreachable"},
	ternbpf.TernMetricMETRIC_DROP_LB_NO_LOCAL:     {"drop_lb_no_local", "dropped: services \"ebpf\", traffic policy Local and no backend on this node"},
	ternbpf.TernMetricMETRIC_DROP_LB:              {"drop_lb", "dropped: services \"ebpf\", translation failed (helper error, map full, unknown hairpin answer)"},
	ternbpf.TernMetricMETRIC_DROP_POLICY_RST:      {"drop_policy_rst", "dropped: TCP RST of a tracked flow with a sequence number out of window (forged)"},
	ternbpf.TernMetricMETRIC_DROP_POLICY_CT_QUOTA: {"drop_policy_ct_quota", "dropped: new flow of a pod that opened its share of conntrack entries this minute"},
	ternbpf.TernMetricMETRIC_PASS_SHAPED:          {"pass_shaped", "to or from a pod with bandwidth limits: through the host stack and its veth's qdiscs"},
	ternbpf.TernMetricMETRIC_LB_XDP_DNAT:          {"lb_xdp_dnat", "services \"ebpf\", nodePortAcceleration: a packet from outside to a NodePort / external IP translated at the uplink's XDP"},
	ternbpf.TernMetricMETRIC_REMOTE_STACK_REPLY:   {"remote_stack_reply", "from another node's pod: an answer to a flow the host stack translated (kube-proxy DNAT to a backend off the node), handed to the stack"},
	ternbpf.TernMetricMETRIC_LB_SNAT_REMOTE:       {"lb_snat_remote", "services \"ebpf\": from outside the node to a backend on another node, SNATed to the node address"},
}

// MetricName is the name of a metric (e.g. "redirect_peer").
func MetricName(m ternbpf.TernMetric) string {
	if int(m) < len(metricTable) && metricTable[m].name != "" {
		return metricTable[m].name
	}
	return fmt.Sprintf("metric_%d", m)
}

// metricDescriptions are metricTable's descriptions by metric name.
var metricDescriptions = func() map[string]string {
	d := make(map[string]string, len(metricTable))
	for _, m := range metricTable {
		d[m.name] = m.description
	}
	return d
}()

// MetricDescription says what the metric named name counts; ok is false
// when no metric has that name.
func MetricDescription(name string) (description string, ok bool) {
	description, ok = metricDescriptions[name]
	return description, ok
}

// ReadMetrics sums the per-CPU metrics array into totals by name.
func ReadMetrics(m *cilium.Map) (map[string]ternbpf.TernMetricValue, error) {
	out := map[string]ternbpf.TernMetricValue{}
	for i := ternbpf.TernMetric(0); i < ternbpf.TernMetricMETRIC_MAX; i++ {
		var perCPU []ternbpf.TernMetricValue
		if err := m.Lookup(uint32(i), &perCPU); err != nil {
			return nil, fmt.Errorf("read metric %d: %w", i, err)
		}
		var sum ternbpf.TernMetricValue
		for _, v := range perCPU {
			sum.Packets += v.Packets
			sum.Bytes += v.Bytes
		}
		out[MetricName(i)] = sum
	}
	return out, nil
}
