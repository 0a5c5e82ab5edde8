// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* tc_pod.c: attached at tc ingress (TCX, or clsact) of every pod's host-side
 * veth, so it sees each packet a pod sends before the host stack does.
 *
 * Decides: drop spoofed packets (source IP or MAC not the sender's own);
 * deliver packets for another pod on this node straight into that pod's
 * namespace with bpf_redirect_peer (no host routing, no bridge, no
 * netfilter); hand everything else to the host stack. */

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "include/tern_types.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/parse.h"

char __license[] SEC("license") = "Dual BSD/GPL";

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/* decrement_ttl acts as the router the pod believes it talks to. */
static __always_inline int decrement_ttl(struct __sk_buff *skb, struct iphdr *ip)
{
	__u16 old = *(__u16 *)&ip->ttl; /* ttl and protocol share a 16-bit word */
	__u16 new;

	ip->ttl--;
	new = *(__u16 *)&ip->ttl;
	return bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check),
				   old, new, sizeof(__u16));
}

SEC("tc")
int tern_from_pod(struct __sk_buff *skb)
{
	struct endpoint *src, *dst;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 daddr;

	switch (parse_ipv4(skb, &eth, &ip)) {
	case PARSE_IPV4:
		break;
	case PARSE_NOT_IPV4:
		count(METRIC_PASS_NON_IPV4, skb->len);
		return TC_ACT_OK;
	default:
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}

	/* Anti-spoofing: the source must be the endpoint behind this veth. */
	src = bpf_map_lookup_elem(&tern_endpoints, &ip->saddr);
	if (!src || src->ifindex != skb->ifindex || !mac_equal(eth->h_source, src->pod_mac)) {
		count(METRIC_DROP_SPOOFED, skb->len);
		return TC_ACT_SHOT;
	}

	daddr = ip->daddr;
	dst = bpf_map_lookup_elem(&tern_endpoints, &daddr);
	if (!dst) {
		count(METRIC_PASS_HOST, skb->len);
		return TC_ACT_OK;
	}
	if (ip->ttl <= 1) {
		count(METRIC_PASS_TTL, skb->len);
		return TC_ACT_OK;
	}

	if (decrement_ttl(skb, ip) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	/* The csum helper may have moved the data: store MACs by offset. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), dst->pod_mac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), dst->host_mac, ETH_ALEN, 0) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	count(METRIC_REDIRECT_PEER, skb->len);
	return bpf_redirect_peer(dst->ifindex, 0);
}
