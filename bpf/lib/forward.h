/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Delivery into a pod of this node. */
#ifndef TERN_FORWARD_H
#define TERN_FORWARD_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "../include/tern_types.h"
#include "csum.h"
#include "metrics.h"
#include "verdict.h"
#include "shaped.h"

/* set_macs writes h_dest and h_source (12 bytes at macs) in place, with
 * no helper call; a frame whose Ethernet header is not in the linear part
 * (none the programs parsed) takes bpf_skb_store_bytes. */
static __always_inline int set_macs(struct __sk_buff *skb, const __u8 *macs)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + 2 * ETH_ALEN <= data_end) {
		__builtin_memcpy(data, macs, 2 * ETH_ALEN);
		return 0;
	}
	return bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), macs, 2 * ETH_ALEN, 0) < 0 ? -1 : 0;
}

/* deliver_to_endpoint routes the packet into dst's namespace: TTL minus one,
 * MACs rewritten as the pod's gateway would send them, bpf_redirect_peer
 * into the pod (no host routing, no netfilter). ttl is the packet's current
 * TTL. A packet whose TTL would expire goes to the host stack instead, which
 * answers with ICMP time exceeded; m is counted on success. A shaped
 * endpoint's packet (lib/shaped.h) goes to the host stack too, which
 * routes it through the pod's veth and its qdiscs. */
static __always_inline int deliver_to_endpoint(struct __sk_buff *skb, const struct endpoint *dst,
					       __u8 ttl, enum metric m)
{
	if (endpoint_shaped(dst)) {
		count(METRIC_PASS_SHAPED, skb->len);
		return TERN_PASS;
	}
	if (ttl <= 1) {
		count(METRIC_PASS_TTL, skb->len);
		return TERN_PASS;
	}
	/* Both MACs in one store: struct endpoint keeps pod_mac and host_mac
	 * side by side, in the order of h_dest and h_source (one helper call
	 * less per packet delivered). */
	_Static_assert(offsetof(struct endpoint, host_mac) ==
			       offsetof(struct endpoint, pod_mac) + ETH_ALEN &&
		       offsetof(struct ethhdr, h_source) == offsetof(struct ethhdr, h_dest) + ETH_ALEN,
		       "pod_mac, host_mac as h_dest, h_source");
	if (decrement_ttl_at(skb, ttl) < 0 || set_macs(skb, dst->pod_mac) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	count(m, skb->len);
	return bpf_redirect_peer(dst->ifindex, 0);
}

#endif /* TERN_FORWARD_H */
