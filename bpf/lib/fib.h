/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Routing through the kernel's FIB, so the datapath follows the node's
 * routes (and their changes) without a copy of its own. */
#ifndef TERN_FIB_H
#define TERN_FIB_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif

/* fib_lookup_v4 asks the node's FIB where a packet that arrived on this
 * skb's interface would be forwarded. tot_len stays 0 so the helper checks
 * the skb against the egress MTU (GSO packets pass). BPF_FIB_LOOKUP_SKIP_NEIGH:
 * the neighbour is resolved by bpf_redirect_neigh, which also queues the
 * packet while ARP is pending, instead of failing with NO_NEIGH.
 * Returns BPF_FIB_LKUP_RET_* (< 0 on bad arguments). */
static __always_inline long fib_lookup_v4(struct __sk_buff *skb, struct bpf_fib_lookup *p,
					  __be32 saddr, __be32 daddr, __u8 tos, __u8 proto,
					  __be16 sport, __be16 dport)
{
	__builtin_memset(p, 0, sizeof(*p));
	p->family = AF_INET;
	p->tos = tos;
	p->l4_protocol = proto;
	p->sport = sport; /* ports feed the multipath hash */
	p->dport = dport;
	p->ifindex = skb->ifindex;
	p->ipv4_src = saddr;
	p->ipv4_dst = daddr;
	return bpf_fib_lookup(skb, p, sizeof(*p), BPF_FIB_LOOKUP_SKIP_NEIGH);
}

/* redirect_neigh_via sends the packet out of ifindex to the IPv4 next hop
 * nh_ip. The kernel resolves the neighbour and fills in both MAC addresses. */
static __always_inline long redirect_neigh_via(__u32 ifindex, __be32 nh_ip)
{
	struct bpf_redir_neigh nh = {
		.nh_family = AF_INET,
		.ipv4_nh = nh_ip,
	};

	return bpf_redirect_neigh(ifindex, &nh, sizeof(nh), 0);
}

/* redirect_neigh_v4 sends the packet out of the interface the lookup chose,
 * to its next hop (the gateway, or the destination when on-link: the lookup
 * left it in ipv4_dst). */
static __always_inline long redirect_neigh_v4(const struct bpf_fib_lookup *p)
{
	return redirect_neigh_via(p->ifindex, p->ipv4_dst);
}

#endif /* TERN_FIB_H */
