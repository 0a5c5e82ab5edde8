// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* tc_tunnel.c: attached at tc ingress (TCX, or clsact) of the node's VXLAN
 * device (external/collect_md mode, created by package routing in VXLAN
 * mode). It sees every packet the device decapsulated, with the outer
 * header's addresses in the tunnel key.
 *
 * Decides: a packet whose outer source is the node owning the inner
 * source (tern_remote: a pod CIDR of that node, or the node's own /32),
 * addressed to a pod of this node, meets that pod's ingress policy and is
 * delivered with bpf_redirect_peer; addressed to this node's own IP, it
 * goes to the host stack. All else is dropped: non-IPv4, no tunnel key or
 * an outer source that is not the owner (a forged VXLAN packet:
 * lib/remote.h), and other destinations (the tunnel must not become a way
 * into the node's other networks). */

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "include/tern_types.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/verdict.h"
#include "lib/parse.h"
#include "lib/remote.h"

char __license[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int tern_from_tunnel(struct __sk_buff *skb)
{
	struct node_config *cfg;
	struct endpoint *ep;
	struct ethhdr *eth;
	struct iphdr *iph;
	__be32 saddr, daddr;
	__be16 frag_off, id;
	__u8 ttl, proto, ihl;

	switch (parse_ipv4(skb, &eth, &iph)) {
	case PARSE_IPV4:
		break;
	case PARSE_NOT_IPV4:
		count(METRIC_DROP_NON_IPV4, skb->len);
		return TC_ACT_SHOT;
	default:
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}
	saddr = iph->saddr;
	daddr = iph->daddr;
	frag_off = iph->frag_off;
	id = iph->id;
	ttl = iph->ttl;
	proto = iph->protocol;
	ihl = iph->ihl;

	if (!tunnel_from_owner(skb, saddr)) {
		count(METRIC_DROP_TUNNEL_FORGED, skb->len);
		return TC_ACT_SHOT;
	}
	ep = bpf_map_lookup_elem(&tern_endpoints, &daddr);
	if (!ep) {
		/* A pod of another node answering (or talking to) this node
		 * itself: the host stack delivers it. The inner frame is
		 * addressed to the sender's gateway MAC, not this device's,
		 * which would make the stack drop it as another host's. */
		cfg = node_config();
		if (cfg && cfg->node_ip && daddr == cfg->node_ip &&
		    bpf_skb_change_type(skb, 0 /* PACKET_HOST */) == 0) {
			count(METRIC_TUNNEL_TO_HOST, skb->len);
			return TERN_PASS;
		}
		count(METRIC_DROP_TUNNEL_NO_POD, skb->len);
		return TC_ACT_SHOT;
	}
	return remote_deliver(skb, ep, saddr, daddr, proto, ihl, frag_off, id, ttl);
}
