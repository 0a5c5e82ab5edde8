package ebpf

import (
	"fmt"

	cilium "github.com/cilium/ebpf"

	ternbpf "github.com/ternlabs/tern/bpf"
)

// metricNames are the C enum metric names, in enum order, lower-cased and
// without the prefix. TestMetricNames keeps it in step with the C header.
var metricNames = [...]string{
	ternbpf.TernMetricMETRIC_REDIRECT_PEER:        "redirect_peer",
	ternbpf.TernMetricMETRIC_PASS_HOST:            "pass_host",
	ternbpf.TernMetricMETRIC_PASS_NON_IPV4:        "pass_non_ipv4",
	ternbpf.TernMetricMETRIC_PASS_TTL:             "pass_ttl",
	ternbpf.TernMetricMETRIC_DROP_TRUNCATED:       "drop_truncated",
	ternbpf.TernMetricMETRIC_DROP_SPOOFED:         "drop_spoofed",
	ternbpf.TernMetricMETRIC_DROP_REDIRECT:        "drop_redirect",
	ternbpf.TernMetricMETRIC_SNAT:                 "snat",
	ternbpf.TernMetricMETRIC_REV_SNAT:             "rev_snat",
	ternbpf.TernMetricMETRIC_PASS_UPLINK:          "pass_uplink",
	ternbpf.TernMetricMETRIC_DROP_NAT_NO_PORT:     "drop_nat_no_port",
	ternbpf.TernMetricMETRIC_DROP_NAT_MAP_FULL:    "drop_nat_map_full",
	ternbpf.TernMetricMETRIC_DROP_NAT_UNSUPPORTED: "drop_nat_unsupported",
	ternbpf.TernMetricMETRIC_DROP_POLICY_INGRESS:  "drop_policy_ingress",
	ternbpf.TernMetricMETRIC_DROP_POLICY_EGRESS:   "drop_policy_egress",
	ternbpf.TernMetricMETRIC_PASS_TO_POD:          "pass_to_pod",
	ternbpf.TernMetricMETRIC_DROP_NON_IPV4:        "drop_non_ipv4",
	ternbpf.TernMetricMETRIC_DROP_ARP_SPOOFED:     "drop_arp_spoofed",
	ternbpf.TernMetricMETRIC_DROP_LOOPBACK:        "drop_loopback",
	ternbpf.TernMetricMETRIC_DROP_REV_TTL:         "drop_rev_ttl",
	ternbpf.TernMetricMETRIC_DROP_NAT_NO_ROUTE:    "drop_nat_no_route",
	ternbpf.TernMetricMETRIC_DROP_NAT_TOO_BIG:     "drop_nat_too_big",
	ternbpf.TernMetricMETRIC_DROP_NAT_ICMP:        "drop_nat_icmp",
	ternbpf.TernMetricMETRIC_NAT_REV_LOST:         "nat_rev_lost",
	ternbpf.TernMetricMETRIC_NAT_GC:               "nat_gc",
	ternbpf.TernMetricMETRIC_PASS_SERVICE:         "pass_service",
	ternbpf.TernMetricMETRIC_PASS_STACK_REPLY:     "pass_stack_reply",
	ternbpf.TernMetricMETRIC_DROP_SVC_NO_DNAT:     "drop_svc_no_dnat",
	ternbpf.TernMetricMETRIC_REMOTE_NATIVE:        "remote_native",
	ternbpf.TernMetricMETRIC_REMOTE_VXLAN:         "remote_vxlan",
	ternbpf.TernMetricMETRIC_FROM_REMOTE:          "from_remote",
	ternbpf.TernMetricMETRIC_DROP_TUNNEL_FORGED:   "drop_tunnel_forged",
	ternbpf.TernMetricMETRIC_DROP_TUNNEL_NO_POD:   "drop_tunnel_no_pod",
	ternbpf.TernMetricMETRIC_TUNNEL_TO_HOST:       "tunnel_to_host",
	ternbpf.TernMetricMETRIC_LB_DNAT:              "lb_dnat",
	ternbpf.TernMetricMETRIC_LB_REV_NAT:           "lb_rev_nat",
	ternbpf.TernMetricMETRIC_LB_HAIRPIN:           "lb_hairpin",
	ternbpf.TernMetricMETRIC_LB_REJECT:            "lb_reject",
	ternbpf.TernMetricMETRIC_DROP_LB_NO_LOCAL:     "drop_lb_no_local",
	ternbpf.TernMetricMETRIC_DROP_LB:              "drop_lb",
	ternbpf.TernMetricMETRIC_DROP_POLICY_RST:      "drop_policy_rst",
	ternbpf.TernMetricMETRIC_DROP_POLICY_CT_QUOTA: "drop_policy_ct_quota",
	ternbpf.TernMetricMETRIC_PASS_SHAPED:          "pass_shaped",
	ternbpf.TernMetricMETRIC_LB_XDP_DNAT:          "lb_xdp_dnat",
	ternbpf.TernMetricMETRIC_REMOTE_STACK_REPLY:   "remote_stack_reply",
	ternbpf.TernMetricMETRIC_LB_SNAT_REMOTE:       "lb_snat_remote",
}

// MetricName is the name of a metric (e.g. "redirect_peer").
func MetricName(m ternbpf.TernMetric) string {
	if int(m) < len(metricNames) && metricNames[m] != "" {
		return metricNames[m]
	}
	return fmt.Sprintf("metric_%d", m)
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
