/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Shaped endpoints: pods with bandwidth limits (the bandwidth CNI plugin
 * chained after Tern, README "Chaining"). That plugin shapes with qdiscs on
 * the pod's host veth: a tbf at its egress (the pod's ingress rate) and a
 * clsact ingress filter mirroring to an ifb with a tbf (the pod's egress
 * rate). The fast path bypasses both: bpf_redirect_peer into a pod skips
 * its veth's egress qdisc, and tern_from_pod's redirect (peer or neigh)
 * ends the packet's ingress before the clsact filter runs. So a shaped
 * endpoint's traffic goes through the host stack both ways:
 *
 *  - what it sends: tern_from_pod decides anti-spoofing and policy, then
 *    passes (TERN_PASS: TCX_NEXT), so the clsact filter mirrors it to the
 *    ifb; the ifb hands it back to the veth's ingress past tc, and the
 *    stack routes it. Masquerade is then done at the uplink's tc egress
 *    (shaped_snat, tern_to_uplink), after the stack routed it there;
 *  - what it receives: deliver_to_endpoint passes instead of redirecting
 *    (from another pod, or a reply tern_from_uplink translated back), the
 *    stack routes it to the pod's /32 through its veth, where the tbf
 *    shapes it and tern_to_pod applies its ingress policy. */
#ifndef TERN_SHAPED_H
#define TERN_SHAPED_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/tern_types.h"
#include "maps.h"
#include "metrics.h"
#include "verdict.h"
#include "csum.h"
#include "conntrack.h"
#include "nat.h"
#include "fib.h"
#include "stack.h"

/* endpoint_shaped reports whether ep's traffic must go through the host
 * veth's qdiscs. */
static __always_inline int endpoint_shaped(const struct endpoint *ep)
{
	return ep && (ep->flags & ENDPOINT_F_SHAPED);
}

/* shaped_masq_dest reports whether a shaped endpoint's packet to daddr
 * must be masqueraded (the same test tern_from_pod makes for the others). */
static __always_inline int shaped_masq_dest(const struct endpoint *ep, __be32 daddr)
{
	__u32 a = bpf_ntohl(daddr);

	return (ep->flags & ENDPOINT_F_MASQ) && (a & 0xf0000000) != 0xe0000000 && a != 0xffffffff &&
	       !nomasq(daddr);
}

/* shaped_off_uplink reports (and counts) a packet of a shaped source, at
 * tern_from_pod, that must be masqueraded but that the node routes out of
 * another interface than the uplink: shaped_snat, at the uplink's egress,
 * would never see it, and the stack would send it with the pod's address.
 * snat_out drops the same packets of other pods (METRIC_DROP_NAT_NO_ROUTE).
 * Anything the FIB does not forward (local, unreachable, too big) is the
 * stack's to answer, as in snat_out, and so are answers of flows the stack
 * delivered (NodePort, hostPort: it translates them back). */
static __always_inline int shaped_off_uplink(struct __sk_buff *skb, const struct endpoint *src,
					     __be32 saddr, __be32 daddr, __u8 tos, __u8 proto,
					     __u8 ihl, __be16 frag_off)
{
	struct node_config *cfg = node_config();
	struct bpf_fib_lookup fib;

	if (!cfg || !cfg->node_ip || !cfg->uplink_ifindex || !shaped_masq_dest(src, daddr))
		return 0;
	if (fib_lookup_v4(skb, &fib, saddr, daddr, tos, proto, 0, 0) != BPF_FIB_LKUP_RET_SUCCESS ||
	    fib.ifindex == cfg->uplink_ifindex || stack_owned(skb, saddr, daddr, proto, ihl, frag_off))
		return 0;
	count(METRIC_DROP_NAT_NO_ROUTE, skb->len);
	return 1;
}

/* shaped_snat masquerades, at the uplink's tc egress, a packet a shaped
 * endpoint ep (source saddr) sent to daddr, which the stack routed out of
 * the uplink with the pod's address: the translation snat_out does at
 * tern_from_pod for other pods, on the same NAT maps, so tern_from_uplink
 * translates the replies back (and, the endpoint being shaped, passes them
 * to the stack). The stack already decremented the TTL, checked the MTU
 * and chose the route. Returns a tc verdict; never lets a packet that
 * needs masquerading leave untranslated. ICMP: echo requests are
 * translated, echo replies of flows opened to the pod's own address pass;
 * ICMP errors are dropped (snat_icmp's translation of errors is
 * tern_from_pod's only). */
static __always_inline int shaped_snat(struct __sk_buff *skb, const struct endpoint *ep, __be32 saddr,
				       __be32 daddr, __u8 proto, __u8 ihl, __be16 frag_off, __be32 node_ip)
{
	struct nat_tuple orig = {};
	struct nat_entry *f;
	struct l4 l4 = {};
	__be16 nat_port;
	__u32 port_off;

	if (!shaped_masq_dest(ep, daddr))
		return TERN_PASS;
	if (parse_l4(skb, proto, ihl, frag_off, &l4) != L4_OK) {
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}
	if (l4.nonfirst)
		goto unsupported; /* no ports to translate by */
	orig.saddr = saddr;
	orig.daddr = daddr;
	orig.proto = proto;
	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		orig.sport = l4.sport;
		orig.dport = l4.dport;
		port_off = l4.off;
		break;
	case IPPROTO_ICMP:
		orig.sport = l4.icmp_id;
		port_off = l4.off + ICMP_ID_OFF;
		if (l4.icmp_type == ICMP_ECHO)
			break;
		if (l4.icmp_type == ICMP_ECHOREPLY) {
			f = bpf_map_lookup_elem(&tern_nat, &orig);
			if (f && (f->flags & NAT_F_INBOUND))
				return TERN_PASS;
		}
		count(METRIC_DROP_NAT_ICMP, skb->len);
		return TC_ACT_SHOT;
	default:
		goto unsupported;
	}
	switch (snat_lookup(&orig, node_ip, tcp_close_flags(&l4, NAT_F_FIN_POD),
			    proto == IPPROTO_TCP && (l4.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN,
			    bpf_ktime_get_ns(), &nat_port)) {
	case SNAT_TRANSLATE:
		break;
	case SNAT_INBOUND:
		return TERN_PASS;
	case SNAT_NO_PORT:
		count(METRIC_DROP_NAT_NO_PORT, skb->len);
		return TC_ACT_SHOT;
	default:
		count(METRIC_DROP_NAT_MAP_FULL, skb->len);
		return TC_ACT_SHOT;
	}
	if (nat_rewrite(skb, proto, IP_SADDR_OFF, saddr, node_ip, port_off, orig.sport, nat_port,
			l4.off + l4_csum_off(proto)) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	count(METRIC_SNAT, skb->len);
	return TERN_PASS;

unsupported:
	count(METRIC_DROP_NAT_UNSUPPORTED, skb->len);
	return TC_ACT_SHOT;
}

#endif /* TERN_SHAPED_H */
