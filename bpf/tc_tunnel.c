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
 * delivered with bpf_redirect_peer (a remote Service backend's answer is
 * first translated back, services "ebpf", lib/lb.h; or handed to the host
 * stack when its DNAT was the stack's, kube-proxy, lib/xnode.h); addressed
 * to this node's own IP, it goes to the host stack, unless it is a remote
 * backend's answer to a flow from outside the node that the load balancer
 * SNATed to this node (translated back and sent out, lib/lb_remote.h).
 * All else is dropped: non-IPv4, no tunnel key or an outer source that is
 * not the owner (a forged VXLAN packet: lib/remote.h), and other
 * destinations (the tunnel must not become a way into the node's other
 * networks). */

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
#include "lib/csum.h"
#include "lib/conntrack.h"
#include "lib/nat.h"
#include "lib/forward.h"
#include "lib/policy.h"
#include "lib/stack.h"
#include "lib/remote.h"
#include "lib/lb.h"
#include "lib/xnode.h"
#include "lib/lb_remote.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* tunnel_owner_checked is tunnel_from_owner out of line: its tunnel key
 * stays out of tern_from_tunnel's frame, under the load balancer's calls. */
static __noinline int tunnel_owner_checked(struct __sk_buff *skb, __be32 saddr)
{
	return tunnel_from_owner(skb, saddr);
}

SEC("tc")
int tern_from_tunnel(struct __sk_buff *skb)
{
	struct node_config *cfg;
	struct endpoint *ep;
	struct ethhdr *eth;
	struct iphdr *iph;
	struct lb_pkt lp = {};
	int ret;

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
	lp.saddr = iph->saddr;
	lp.daddr = iph->daddr;
	lp.frag_off = iph->frag_off;
	lp.id = iph->id;
	lp.ttl = iph->ttl;
	lp.proto = iph->protocol;
	lp.ihl = iph->ihl;

	if (!tunnel_owner_checked(skb, lp.saddr)) {
		count(METRIC_DROP_TUNNEL_FORGED, skb->len);
		return TC_ACT_SHOT;
	}
	ep = bpf_map_lookup_elem(&tern_endpoints, &lp.daddr);
	if (!ep) {
		/* A pod of another node answering (or talking to) this node
		 * itself: the host stack delivers it. The inner frame is
		 * addressed to the sender's gateway MAC, not this device's,
		 * which would make the stack drop it as another host's. */
		cfg = node_config();
		if (!cfg || !cfg->node_ip || lp.daddr != cfg->node_ip)
			goto no_pod;
		/* A remote backend's answer to a flow from outside the node
		 * that the load balancer SNATed to this node. */
		ret = lb_remote_reply(skb, &lp);
		if (ret != LB_CONTINUE)
			return ret;
		if (bpf_skb_change_type(skb, 0 /* PACKET_HOST */) == 0) {
			count(METRIC_TUNNEL_TO_HOST, skb->len);
			return TERN_PASS;
		}
no_pod:
		count(METRIC_DROP_TUNNEL_NO_POD, skb->len);
		return TC_ACT_SHOT;
	}
	/* A remote backend's answer to a Service flow of Tern's load
	 * balancer: translated back, as tern_from_uplink does. */
	if (ep->flags & ENDPOINT_F_LB) {
		ret = lb_from_uplink(skb, ep, &lp);
		if (ret == LB_UPLINK_REPLY) {
			ret = lb_reply(skb, ep, &lp);
			if (ret != LB_CONTINUE)
				return ret;
			return deliver_to_endpoint(skb, ep, lp.ttl, METRIC_REDIRECT_PEER);
		}
		if (ret != LB_CONTINUE)
			return ret;
	}
	return xnode_deliver(skb, ep, &lp, 1);
}
