// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* tc_pod.c: attached at tc ingress (TCX, or clsact) of every pod's host-side
 * veth, so it sees each packet a pod sends before the host stack does.
 *
 * Decides: drop spoofed packets (source IP or MAC not the sender's own);
 * deliver packets for another pod on this node straight into that pod's
 * namespace with bpf_redirect_peer (no host routing, no bridge, no
 * netfilter); masquerade packets leaving the cluster through the uplink to
 * the node IP and send them out with bpf_redirect_neigh (replies come back
 * through tc_uplink.c); hand everything else to the host stack, which
 * also gets, untouched, traffic to a Service CIDR and the pod's answers to
 * flows the stack delivered into it (kube-proxy's DNAT, lib/stack.h).
 * NetworkPolicy (lib/policy.h), after anti-spoofing: the sender's egress
 * rules, and the receiver's ingress rules when it is a pod of this node
 * (bpf_redirect_peer skips that pod's veth egress, where tern_to_pod runs).
 *
 * tern_to_pod, in this file as the other direction of the same veth, runs at
 * its tc egress: it applies the pod's ingress rules to what the host stack
 * delivers (the node itself, other nodes, the outside, Services after
 * kube-proxy's DNAT), reading the stack's conntrack entry for the client
 * and the flow a reply answers. */

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
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/conntrack.h"
#include "lib/nat.h"
#include "lib/fib.h"
#include "lib/forward.h"
#include "lib/policy.h"
#include "lib/stack.h"

char __license[] SEC("license") = "Dual BSD/GPL";

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/* The IPv4 header fields the off-node path needs, copied out of the packet
 * before any helper invalidates packet pointers. */
struct ip4 {
	__be32 saddr;
	__be32 daddr;
	__be16 frag_off;
	__u8 ttl;
	__u8 proto;
	__u8 ihl;
	__u8 tos;
};

static __always_inline int multicast_or_broadcast(__be32 daddr)
{
	__u32 a = bpf_ntohl(daddr);

	return (a & 0xf0000000) == 0xe0000000 || a == 0xffffffff;
}

/* snat_out masquerades a packet of src to the node IP and sends it out of
 * the uplink the FIB chose. Returns a tc verdict. */
static __always_inline int snat_out(struct __sk_buff *skb, const struct ip4 *ip,
				    const struct node_config *cfg)
{
	struct bpf_fib_lookup fib;
	struct nat_tuple orig = {};
	struct l4 l4 = {};
	__u32 port_off, csum_off;
	__be16 nat_port, from_port;
	__u64 now;
	long rc;

	if (parse_l4(skb, ip->proto, ip->ihl, ip->frag_off, &l4) != L4_OK) {
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}

	rc = fib_lookup_v4(skb, &fib, ip->saddr, ip->daddr, ip->tos, ip->proto, l4.sport, l4.dport);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS || fib.ifindex != cfg->uplink_ifindex) {
		/* Local, unreachable, too big for the egress MTU, or routed
		 * elsewhere than the uplink whose address we would use: the
		 * stack knows best (ICMP errors, its own rules). */
		count(METRIC_PASS_HOST, skb->len);
		return TC_ACT_OK;
	}
	if (ip->ttl <= 1) {
		count(METRIC_PASS_TTL, skb->len);
		return TC_ACT_OK;
	}

	orig.saddr = ip->saddr;
	orig.daddr = ip->daddr;
	orig.proto = ip->proto;
	switch (ip->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		if (l4.nonfirst)
			goto unsupported; /* no ports to translate by */
		orig.sport = l4.sport;
		orig.dport = l4.dport;
		port_off = l4.off; /* source port */
		break;
	case IPPROTO_ICMP:
		if (l4.nonfirst)
			goto unsupported;
		if (l4.icmp_type != ICMP_ECHO) {
			/* Echo replies and errors a pod sends answer traffic
			 * that reached its own address: not masqueraded. */
			count(METRIC_PASS_HOST, skb->len);
			return TC_ACT_OK;
		}
		orig.sport = l4.icmp_id; /* the identifier plays the port */
		port_off = l4.off + ICMP_ID_OFF;
		break;
	default:
		goto unsupported;
	}

	now = bpf_ktime_get_ns();
	switch (snat_lookup(&orig, cfg->node_ip, tcp_close_flags(&l4, NAT_F_FIN_POD),
			    l4.proto == IPPROTO_TCP && (l4.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN,
			    now, &nat_port)) {
	case SNAT_TRANSLATE:
		break;
	case SNAT_INBOUND:
		count(METRIC_PASS_HOST, skb->len);
		return TC_ACT_OK;
	case SNAT_NO_PORT:
		count(METRIC_DROP_NAT_NO_PORT, skb->len);
		return TC_ACT_SHOT;
	default:
		count(METRIC_DROP_NAT_MAP_FULL, skb->len);
		return TC_ACT_SHOT;
	}

	from_port = orig.sport;
	csum_off = l4.off + l4_csum_off(ip->proto);
	if (nat_rewrite(skb, ip->proto, IP_SADDR_OFF, ip->saddr, cfg->node_ip,
			port_off, from_port, nat_port, csum_off) < 0 ||
	    decrement_ttl_at(skb, ip->ttl) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	count(METRIC_SNAT, skb->len);
	return redirect_neigh_v4(&fib);

unsupported:
	/* Sending it on would leak the pod address; the stack would too. */
	count(METRIC_DROP_NAT_UNSUPPORTED, skb->len);
	return TC_ACT_SHOT;
}

SEC("tc")
int tern_from_pod(struct __sk_buff *skb)
{
	struct endpoint *src, *dst;
	struct node_config *cfg;
	struct ethhdr *eth;
	struct iphdr *iph;
	struct ip4 ip;
	__be16 ip_id;

	switch (parse_ipv4(skb, &eth, &iph)) {
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
	src = bpf_map_lookup_elem(&tern_endpoints, &iph->saddr);
	if (!src || src->ifindex != skb->ifindex || !mac_equal(eth->h_source, src->pod_mac)) {
		count(METRIC_DROP_SPOOFED, skb->len);
		return TC_ACT_SHOT;
	}

	ip.saddr = iph->saddr;
	ip.daddr = iph->daddr;
	ip.frag_off = iph->frag_off;
	ip.ttl = iph->ttl;
	ip.proto = iph->protocol;
	ip.ihl = iph->ihl;
	ip.tos = iph->tos;
	ip_id = iph->id;

	/* A Service address (never a pod's): kube-proxy's DNAT in the host
	 * stack decides where it goes, and policy is decided on the
	 * translated packet (tern_to_pod, lib/stack.h). */
	dst = bpf_map_lookup_elem(&tern_endpoints, &ip.daddr);
	if (!dst && to_service_cidr(ip.daddr)) {
		count(METRIC_PASS_SERVICE, skb->len);
		return TC_ACT_OK;
	}

	/* NetworkPolicy, once the source is known to be this pod's own (a
	 * forged source would be policed as the pod it claims to be). */
	if (!policy_pass(skb, ip.saddr, ip.daddr, ip.proto, ip.ihl, ip.frag_off, ip_id))
		return TC_ACT_SHOT;

	if (dst) {
		/* An answer to a flow the stack delivered (e.g. DNATed from a
		 * ClusterIP): only the stack can translate it back. */
		if (stack_owned(skb, ip.saddr, ip.daddr, ip.proto, ip.ihl, ip.frag_off)) {
			count(METRIC_PASS_STACK_REPLY, skb->len);
			return TC_ACT_OK;
		}
		return deliver_to_endpoint(skb, dst, ip.ttl, METRIC_REDIRECT_PEER);
	}

	/* Masquerade what leaves the cluster, when this pod's network asks
	 * for it and the node has an uplink with an address; but not the
	 * answers of flows the stack delivered (NodePort, hostPort): the
	 * stack translates them back to the address the client used. */
	cfg = node_config();
	if (cfg && cfg->node_ip && cfg->uplink_ifindex && (src->flags & ENDPOINT_F_MASQ) &&
	    !multicast_or_broadcast(ip.daddr) && !nomasq(ip.daddr)) {
		if (stack_owned(skb, ip.saddr, ip.daddr, ip.proto, ip.ihl, ip.frag_off)) {
			count(METRIC_PASS_STACK_REPLY, skb->len);
			return TC_ACT_OK;
		}
		return snat_out(skb, &ip, cfg);
	}

	/* The node itself, other nodes' pods, and unmasqueraded traffic: the
	 * host stack routes it (and kube-proxy's rules see it). */
	count(METRIC_PASS_HOST, skb->len);
	return TC_ACT_OK;
}

/* tern_to_pod: attached at tc egress (TCX, or clsact) of every pod's
 * host-side veth: it sees what the host stack sends into the pod (the node
 * itself, other nodes' pods and the outside, routed to the pod's /32).
 * Packets tern_from_pod and tern_from_uplink deliver with bpf_redirect_peer
 * never come here: they were decided before the redirect (replies of
 * masqueraded flows are replies of flows whose egress passed).
 *
 * Decides: the pod's ingress policy (and, for a packet a local pod sent
 * through the host stack, that pod's egress policy); everything else, and
 * replies of allowed flows, pass. It never changes the packet. */
SEC("tc")
int tern_to_pod(struct __sk_buff *skb)
{
	struct ethhdr *eth;
	struct iphdr *iph;
	__be32 saddr, daddr, peer;
	struct stack_ct ct = {};
	__be16 frag_off, id;
	__u8 proto, ihl;

	switch (parse_ipv4(skb, &eth, &iph)) {
	case PARSE_IPV4:
		break;
	case PARSE_NOT_IPV4:
		count(METRIC_PASS_TO_POD, skb->len); /* ARP, IPv6: policy is IPv4 only */
		return TC_ACT_OK;
	default:
		/* Undecidable, and no pod could make sense of it either. */
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}
	saddr = iph->saddr;
	daddr = iph->daddr;
	frag_off = iph->frag_off;
	id = iph->id;
	proto = iph->protocol;
	ihl = iph->ihl;

	/* The host stack's conntrack entry (lib/stack.h): a reply it
	 * reverse-translated passes on the flow it answers; a flow it
	 * delivered is decided on its original client (before the stack's
	 * SNAT, e.g. kube-proxy's masquerade) and the translated destination
	 * (after DNAT: the backend pod). */
	stack_ct_of(skb, &ct);
	if (ct.tracked && ct.reply && ct.rsrc != saddr && stack_reply_tracked(&ct)) {
		count(METRIC_PASS_TO_POD, skb->len);
		return TC_ACT_OK;
	}
	peer = ct.tracked && !ct.reply ? ct.orig_src : saddr;
	if (!policy_pass_as(skb, saddr, daddr, peer, proto, ihl, frag_off, id))
		return TC_ACT_SHOT;
	if (ct.tracked && !ct.reply)
		stack_note_delivered(skb, saddr, daddr, proto, ihl, frag_off);
	count(METRIC_PASS_TO_POD, skb->len);
	return TC_ACT_OK;
}
