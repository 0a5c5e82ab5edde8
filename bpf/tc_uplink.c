// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* tc_uplink.c: attached at tc ingress (TCX, or clsact) of the node's uplink,
 * the interface masqueraded pod traffic leaves by. One attachment per node,
 * shared by all pods.
 *
 * Decides: a reply to a masqueraded flow (addressed to the node IP and a NAT
 * port the pod program handed out), or an ICMP error about one, is
 * translated back to the pod's address and delivered into the pod with
 * bpf_redirect_peer. Traffic routed straight to a pod's own address is
 * remembered so the pod's answers are not masqueraded, and goes on through
 * the host stack. A packet from a pod of another node (native routing,
 * lib/remote.h) for a pod of this one meets that pod's ingress policy and is
 * delivered with bpf_redirect_peer (unless it answers a flow the host stack
 * DNATed to it: then it goes to the stack, lib/xnode.h); one whose source
 * is a pod CIDR of a VXLAN node arrives unencapsulated only if forged, and
 * is dropped. A remote backend's answer to a Service flow from outside the
 * node that Tern's load balancer SNATed to the node address is translated
 * back and sent out (lib/lb_remote.h).
 * Everything else (the node's own traffic) passes untouched.
 *
 * tern_to_uplink, at tc egress of the same interface, decides the egress
 * policy of a local pod whose packet the host stack DNATed to an address
 * off the node (kube-proxy: a Service whose backend runs elsewhere):
 * tern_from_pod left it undecided, as it still carried the ClusterIP. When
 * the backend is another node's pod, the flow is recorded in tern_stack_ct
 * so that its answer goes to the stack (lib/xnode.h). In VXLAN mode the same
 * program runs at tc egress of the VXLAN device. */

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
#include "lib/lb_xdp.h"
#include "lib/shaped.h"
#include "lib/xnode.h"
#include "lib/lb_remote.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Return value of the helpers below when the packet is not theirs: no tc
 * verdict (TERN_PASS is -1). */
#define NOT_OURS -2

/* rev_ttl_expires reports (and counts) a packet for a pod whose TTL would
 * expire on the hop into it. It is checked before the translation, which
 * must not happen then: handed to the stack rewritten, the packet would
 * make the stack send "time exceeded" quoting the pod's address to the
 * outside; handed over untranslated, the stack would deliver it to the
 * node's own port (a TCP reset for the remote). Dropped, the remote sees
 * what a lost packet looks like. */
static __always_inline int rev_ttl_expires(struct __sk_buff *skb, __u8 ttl)
{
	if (ttl > 1)
		return 0;
	count(METRIC_DROP_REV_TTL, skb->len);
	return 1;
}

/* rev_snat_icmp_error translates an ICMP error (destination unreachable,
 * incl. fragmentation needed, time exceeded, parameter problem) sent to the
 * node IP about a masqueraded packet: outer destination, and the embedded
 * header's source address and port, back to the pod's, so the pod's socket
 * learns of it (path MTU discovery depends on this). The embedded header's
 * IPv4 checksum is updated with its address, which keeps the ICMP checksum
 * over it unchanged; the embedded port change is folded into the ICMP
 * checksum. The embedded TCP/UDP checksum is left alone: it is often
 * truncated away, and no receiver checks it. */
static __always_inline int rev_snat_icmp_error(struct __sk_buff *skb, __u8 ttl, __u32 icmp_off,
					       __be32 node_ip)
{
	__u32 in_ip = icmp_off + 8; /* ICMP error header is 8 bytes */
	__u32 in_l4 = in_ip + sizeof(struct iphdr);
	struct nat_tuple rk = {};
	struct endpoint *ep;
	struct nat_entry *r;
	struct iphdr inner;
	__be16 port, pod_port;
	__be32 pod_addr;
	__u32 port_off;
	__u8 l4[8];

	if (bpf_skb_load_bytes(skb, in_ip, &inner, sizeof(inner)) < 0 ||
	    bpf_skb_load_bytes(skb, in_l4, l4, sizeof(l4)) < 0)
		return NOT_OURS;
	/* Only a plain embedded header (no options, first fragment) from us. */
	if (inner.version != 4 || inner.ihl != 5 || inner.saddr != node_ip ||
	    (inner.frag_off & bpf_htons(0x1fff)))
		return NOT_OURS;

	rk.saddr = inner.daddr;
	rk.daddr = node_ip;
	rk.proto = inner.protocol;
	switch (inner.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		__builtin_memcpy(&rk.sport, &l4[2], sizeof(rk.sport)); /* remote port */
		__builtin_memcpy(&port, &l4[0], sizeof(port));         /* NAT port */
		port_off = in_l4;
		break;
	case IPPROTO_ICMP:
		if (l4[0] != ICMP_ECHO)
			return NOT_OURS;
		__builtin_memcpy(&port, &l4[4], sizeof(port)); /* NAT echo id */
		port_off = in_l4 + ICMP_ID_OFF;
		break;
	default:
		return NOT_OURS;
	}
	rk.dport = port;

	/* No refresh: an error is not activity of the flow. */
	r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
	if (!r)
		return NOT_OURS;
	pod_addr = r->addr;
	pod_port = r->port;
	ep = bpf_map_lookup_elem(&tern_endpoints, &pod_addr);
	if (!ep)
		return NOT_OURS;
	if (rev_ttl_expires(skb, ttl))
		return TC_ACT_SHOT;

	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, node_ip, pod_addr, sizeof(pod_addr)) < 0 ||
	    bpf_skb_store_bytes(skb, IP_DADDR_OFF, &pod_addr, sizeof(pod_addr), 0) < 0 ||
	    bpf_l3_csum_replace(skb, in_ip + offsetof(struct iphdr, check), node_ip, pod_addr,
				sizeof(pod_addr)) < 0 ||
	    bpf_skb_store_bytes(skb, in_ip + offsetof(struct iphdr, saddr), &pod_addr,
				sizeof(pod_addr), 0) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_off + ICMP_CSUM_OFF, port, pod_port, sizeof(pod_port)) < 0 ||
	    bpf_skb_store_bytes(skb, port_off, &pod_port, sizeof(pod_port), 0) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	return deliver_to_endpoint(skb, ep, ttl, METRIC_REV_SNAT);
}

/* rev_snat translates a reply to a masqueraded flow back to the pod. */
static __always_inline int rev_snat(struct __sk_buff *skb, __be32 saddr, __u8 ttl, __u8 proto,
				    const struct l4 *l4, __be32 node_ip)
{
	struct nat_tuple rk = {};
	struct endpoint *ep;
	struct nat_entry *r;
	__be16 pod_port;
	__be32 pod_addr;
	__u32 port_off;

	rk.saddr = saddr;
	rk.daddr = node_ip;
	rk.proto = proto;
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		rk.sport = l4->sport;
		rk.dport = l4->dport;
		port_off = l4->off + 2; /* destination port */
		break;
	case IPPROTO_ICMP:
		if (l4->icmp_type == ICMP_DEST_UNREACH || l4->icmp_type == ICMP_TIME_EXCEEDED ||
		    l4->icmp_type == ICMP_PARAMETERPROB)
			return rev_snat_icmp_error(skb, ttl, l4->off, node_ip);
		if (l4->icmp_type != ICMP_ECHOREPLY)
			return NOT_OURS;
		rk.dport = l4->icmp_id;
		port_off = l4->off + ICMP_ID_OFF;
		break;
	default:
		return NOT_OURS;
	}

	r = snat_rev_lookup(&rk, tcp_close_flags(l4, NAT_F_FIN_REMOTE), bpf_ktime_get_ns());
	if (!r)
		return NOT_OURS;
	pod_addr = r->addr;
	pod_port = r->port;
	ep = bpf_map_lookup_elem(&tern_endpoints, &pod_addr);
	if (!ep)
		return NOT_OURS; /* pod gone: the stack refuses it */
	if (rev_ttl_expires(skb, ttl))
		return TC_ACT_SHOT;

	if (nat_rewrite(skb, proto, IP_DADDR_OFF, node_ip, pod_addr, port_off, rk.dport, pod_port,
			l4->off + l4_csum_off(proto)) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	return deliver_to_endpoint(skb, ep, ttl, METRIC_REV_SNAT);
}

SEC("tc")
int tern_from_uplink(struct __sk_buff *skb)
{
	const struct remote_node *rn;
	struct node_config *cfg;
	struct endpoint *ep;
	struct ethhdr *eth;
	struct iphdr *iph;
	struct l4 l4 = {};
	__be32 saddr, daddr;
	__be16 frag_off, id;
	__u8 ttl, proto, ihl;
	int ret;

	/* Malformed and non-IPv4 frames are the stack's business here. */
	if (parse_ipv4(skb, &eth, &iph) != PARSE_IPV4)
		goto pass;
	saddr = iph->saddr;
	daddr = iph->daddr;
	frag_off = iph->frag_off;
	id = iph->id;
	ttl = iph->ttl;
	proto = iph->protocol;
	ihl = iph->ihl;
	id = iph->id;

	cfg = node_config();
	if (!cfg || !cfg->node_ip)
		goto pass;

	if (daddr == cfg->node_ip) {
		if (parse_l4(skb, proto, ihl, frag_off, &l4) != L4_OK || l4.nonfirst)
			goto pass;
		ret = rev_snat(skb, saddr, ttl, proto, &l4, cfg->node_ip);
		if (ret != NOT_OURS)
			return ret;
	}
	/* A Service frontend of Tern's load balancer (NodePort, external
	 * and load-balancer IPs; lib/lb.h). */
	{
		struct lb_pkt lp = { .saddr = saddr, .daddr = daddr, .frag_off = frag_off,
				     .id = id, .proto = proto, .ihl = ihl, .ttl = ttl };

		/* Translated by the XDP program already (lib/lb_xdp.h)?
		 * Checked even without frontends: a frame XDP translated
		 * just before the last one went keeps its translation. */
		ret = lb_xdp_translated(skb, &lp);
		if (ret == LB_CONTINUE && !lb_no_frontends())
			ret = lb_uplink_frontend(skb, &lp);
		if (ret == LB_UPLINK_REMOTE)
			return lb_to_remote(skb, &lp);
		if (ret != LB_CONTINUE)
			return ret;
		/* A remote backend's answer to such a frontend's flow,
		 * SNATed to this node (lib/lb_remote.h); a VXLAN node's
		 * pods answer through the tunnel (unencapsulated: forged). */
		if (daddr == cfg->node_ip) {
			rn = remote_lookup(saddr);
			if (rn && !rn->tunnel_ifindex) {
				ret = lb_remote_reply(skb, &lp);
				if (ret != LB_CONTINUE)
					return ret;
			}
		}
	}
	if (daddr == cfg->node_ip)
		goto pass;

	ep = bpf_map_lookup_elem(&tern_endpoints, &daddr);
	/* A remote backend's answer to a Service flow of a pod whose network
	 * balances Services itself (lib/lb.h): translated back before it is
	 * delivered as pod-to-pod traffic. */
	if (ep && (ep->flags & ENDPOINT_F_LB)) {
		struct lb_pkt lp = { .saddr = saddr, .daddr = daddr, .frag_off = frag_off,
				     .id = id, .proto = proto, .ihl = ihl, .ttl = ttl };

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
	if (ep) {
		rn = remote_lookup(saddr);
		if (rn) {
			if (rn->tunnel_ifindex) {
				count(METRIC_DROP_TUNNEL_FORGED, skb->len);
				return TC_ACT_SHOT;
			}
			struct lb_pkt rp = { .saddr = saddr, .daddr = daddr, .frag_off = frag_off,
					     .id = id, .proto = proto, .ihl = ihl, .ttl = ttl };

			return xnode_deliver(skb, ep, &rp, 0);
		}
	}

	/* Routed to a pod's own address: remember the flow so the pod's
	 * answers keep that address (see snat_note_inbound). */
	if (ep && (ep->flags & ENDPOINT_F_MASQ) &&
	    (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_ICMP) &&
	    !nomasq(saddr) && parse_l4(skb, proto, ihl, frag_off, &l4) == L4_OK && !l4.nonfirst &&
	    (proto != IPPROTO_ICMP || l4.icmp_type == ICMP_ECHO)) {
		/* An echo request: the pod's echo reply may keep its address. */
		struct nat_tuple orig = {
			.saddr = daddr,
			.daddr = saddr,
			.sport = proto == IPPROTO_ICMP ? l4.icmp_id : l4.dport,
			.dport = proto == IPPROTO_ICMP ? 0 : l4.sport,
			.proto = proto,
		};

		snat_note_inbound(&orig, tcp_close_flags(&l4, NAT_F_FIN_REMOTE), bpf_ktime_get_ns());
	}

pass:
	count(METRIC_PASS_UPLINK, skb->len);
	return TERN_PASS;
}

SEC("tc")
int tern_to_uplink(struct __sk_buff *skb)
{
	struct node_config *cfg;
	struct endpoint *ep;
	struct ethhdr *eth;
	struct iphdr *iph;
	__be32 saddr, daddr, client;
	__be16 frag_off, id;
	__u8 proto, ihl;

	if (skb->tc_index & TERN_TC_INDEX_DECIDED) {
		skb->tc_index &= ~TERN_TC_INDEX_DECIDED;
		return TERN_PASS;
	}
	/* Not IPv4, or not a translated flow of a local pod: not ours. */
	if (parse_ipv4(skb, &eth, &iph) != PARSE_IPV4)
		return TERN_PASS;
	saddr = iph->saddr;
	daddr = iph->daddr;
	frag_off = iph->frag_off;
	id = iph->id;
	proto = iph->protocol;
	ihl = iph->ihl;
	/* A pod's packet still addressed to a ClusterIP: kube-proxy had no
	 * rule for it (no such Service or port, ICMP). Routed on, it would
	 * leave with the pod's address (the stack does not masquerade pods
	 * on this datapath); nothing out there answers a ClusterIP. */
	ep = bpf_map_lookup_elem(&tern_endpoints, &saddr);
	if (ep && to_service_cidr(daddr)) {
		count(METRIC_DROP_SVC_NO_DNAT, skb->len);
		return TC_ACT_SHOT;
	}
	if (stack_dnat_of(skb, &client) && bpf_map_lookup_elem(&tern_endpoints, &client)) {
		/* Decided (and tracked) on the packet as it leaves, with the
		 * client pod's egress rules: the backend's answer, reverse-
		 * translated by the stack, then passes tern_to_pod on this
		 * flow (lib/stack.h). */
		if (!policy_pass_as(skb, saddr, daddr, client, proto, ihl, frag_off, id))
			return TC_ACT_SHOT;
		/* A backend on another node answers the pod's own address (no
		 * masquerade), on the fast path (tern_from_uplink,
		 * tern_from_tunnel): recorded, the answer is handed to the
		 * stack there, whose conntrack translates it back. */
		if (saddr == client && remote_lookup(daddr))
			stack_note_delivered(skb, saddr, daddr, proto, ihl, frag_off);
	}
	/* A pod with bandwidth limits: the stack forwarded it with the pod's
	 * address, masquerade is done here (lib/shaped.h). */
	if (endpoint_shaped(ep)) {
		cfg = node_config();
		if (cfg && cfg->node_ip && skb->ifindex == cfg->uplink_ifindex)
			return shaped_snat(skb, ep, saddr, daddr, proto, ihl, frag_off, cfg->node_ip);
	}
	return TERN_PASS;
}
