// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* xdp_uplink.c: attached at XDP (native) of the node's uplink when the
 * network config asks for NodePort acceleration (services "ebpf",
 * nodePortAcceleration "xdp" or "auto").
 *
 * Decides: a TCP or UDP packet from outside the node to a Service frontend
 * of Tern's load balancer (NodePort on a node address, external or
 * load-balancer IP; tern_lb_svc) whose flow goes to a backend on this node
 * is translated here, before the kernel allocates an skb: destination
 * address and port to the backend's, checksums updated, the flow pinned in
 * tern_lb_ct as lb_uplink_frontend pins it. It is passed on with
 * LB_XDP_MARK in its metadata; tern_from_uplink decides the backend's
 * ingress policy and delivers it (lib/lb_xdp.h).
 *
 * Everything else passes unchanged to tern_from_uplink, which stays the
 * complete implementation: non-IPv4, IP options, fragments, SCTP, no
 * frontend, a frontend without backends (tc drops it, counted), a backend
 * on another node, a TTL about to expire.
 *
 * Why XDP_PASS and not XDP_REDIRECT into the backend's veth: the
 * backend's ingress NetworkPolicy and its flow tracking (lib/policy.h) work
 * on skbs at tc; a redirected frame would reach the pod without them.
 * docs/services.md has the measurements. */

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "include/tern_types.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/lb_xdp.h"

char __license[] SEC("license") = "Dual BSD/GPL";

#define XDP_L4_OFF (ETH_HLEN + sizeof(struct iphdr))

/* xdp_csum_update: the checksum check over a 32-bit and a 16-bit field
 * that changed from (a0, p0) to (a1, p1), by RFC 1624 eqn. 3, in
 * 16-bit words as they lie in the packet (the sum is the same in either
 * byte order). */
static __always_inline __u16 xdp_csum_update(__u16 check, __be32 a0, __be32 a1, __be16 p0, __be16 p1)
{
	__u32 s = (__u16)~check;

	s += (__u16)~(a0 & 0xffff);
	s += (__u16)~(a0 >> 16);
	s += a1 & 0xffff;
	s += a1 >> 16;
	s += (__u16)~p0;
	s += p1;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* xdp_flow_hash spreads new flows over a frontend's backend slots (the skb
 * hash tc uses does not exist yet). Only the first packet of a flow uses
 * it: the flow is pinned from then on. */
static __always_inline __u32 xdp_flow_hash(__be32 saddr, __be32 daddr, __be16 sport, __be16 dport, __u8 proto)
{
	__u32 h = saddr * 0x9e3779b1u;

	h ^= daddr + 0x7f4a7c15u + (h << 6) + (h >> 2);
	h ^= ((__u32)sport << 16 | dport) + proto + (h << 6) + (h >> 2);
	/* murmur3's finaliser */
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

/* xdp_lb_flow finds the backend of an outside client's flow to svc (its
 * pinned one, or a new pick pinned now in both directions, as
 * lb_uplink_frontend does). 0: *b set, a backend on this node; -1: no
 * backend, no room, or a backend elsewhere, left to tc. A new flow to a
 * backend elsewhere is not pinned here: what tc keeps for it (SNAT state
 * with externalTrafficPolicy Cluster) is tc's to write. In a frame of its
 * own: the scratch work does not add to the program's. */
static __noinline int xdp_lb_flow(const struct lb_svc *svc, const struct l4 *l4, __be32 saddr,
				  __be32 daddr, struct lb_backend *b)
{
	struct lb_scratch *s;
	struct lb_ct_entry *e;
	__u64 now;

	if (!svc || !l4 || !b)
		return -1;
	s = lb_scratch();
	if (!s)
		return -1;
	now = bpf_ktime_get_ns();
	__builtin_memset(&s->ck, 0, sizeof(s->ck));
	s->ck.saddr = saddr;
	s->ck.daddr = daddr;
	s->ck.sport = l4->sport;
	s->ck.dport = l4->dport;
	s->ck.proto = l4->proto;
	e = bpf_map_lookup_elem(&tern_lb_ct, &s->ck);
	if (e && !(e->flags & LB_CT_F_REPLY) && e->rev_id == svc->id &&
	    !ct_expired(e->last_seen, now, l4->proto, NAT_F_SEEN_REPLY | e->flags)) {
		b->addr = e->addr;
		b->port = e->port;
		if (!bpf_map_lookup_elem(&tern_endpoints, &b->addr))
			return -1;
		lb_ct_touch(e, now, tcp_close_flags(l4, NAT_F_FIN_REMOTE));
		return 0;
	}
	if (lb_pick_hash(xdp_flow_hash(saddr, daddr, l4->sport, l4->dport, l4->proto), svc, saddr,
			 now, b, s) < 0 ||
	    !bpf_map_lookup_elem(&tern_endpoints, &b->addr))
		return -1;
	/* The reply entry first: an answer must never find a forward entry
	 * without its way back. */
	__builtin_memset(&s->rk, 0, sizeof(s->rk));
	s->rk.saddr = b->addr;
	s->rk.daddr = saddr;
	s->rk.sport = b->port;
	s->rk.dport = l4->sport;
	s->rk.proto = l4->proto;
	__builtin_memset(&s->ne, 0, sizeof(s->ne));
	s->ne.last_seen = now;
	s->ne.addr = saddr;
	s->ne.port = l4->sport;
	s->ne.rev_id = svc->id;
	s->ne.flags = LB_CT_F_REPLY | LB_CT_F_EXTERNAL;
	if (bpf_map_update_elem(&tern_lb_ct, &s->rk, &s->ne, BPF_ANY) < 0)
		return -1;
	s->ne.addr = b->addr;
	s->ne.port = b->port;
	s->ne.flags = tcp_close_flags(l4, NAT_F_FIN_REMOTE);
	if (bpf_map_update_elem(&tern_lb_ct, &s->ck, &s->ne, BPF_ANY) < 0)
		return -1;
	return 0;
}

SEC("xdp")
int tern_xdp_uplink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct lb_svc_key fk = {};
	struct lb_backend b = {};
	struct node_config *cfg;
	struct lb_svc *svc;
	struct ethhdr *eth;
	struct iphdr *iph;
	struct l4 l4 = {};
	__be16 *ports;
	__u16 *l4_check;
	__be32 saddr, daddr;
	__u32 *meta;
	__u32 len;

	eth = data;
	iph = data + ETH_HLEN;
	/* The shape XDP translates: IPv4 without options, not a fragment,
	 * TCP or UDP with its ports in the frame. The rest is tc's. */
	if ((void *)(iph + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    iph->version != 4 || iph->ihl != 5 || (iph->frag_off & bpf_htons(0x3fff)) ||
	    (iph->protocol != IPPROTO_TCP && iph->protocol != IPPROTO_UDP) || iph->ttl <= 1)
		return XDP_PASS;
	ports = data + XDP_L4_OFF;
	if (iph->protocol == IPPROTO_TCP) {
		if (data + XDP_L4_OFF + sizeof(struct tcphdr) > data_end)
			return XDP_PASS;
		l4.tcp_flags = ((__u8 *)ports)[13];
	} else if (data + XDP_L4_OFF + sizeof(struct udphdr) > data_end) {
		return XDP_PASS;
	}
	cfg = node_config();
	if (!cfg || !cfg->node_ip)
		return XDP_PASS; /* the node's datapath is not set up */
	len = data_end - data;
	saddr = iph->saddr;
	daddr = iph->daddr;
	l4.off = XDP_L4_OFF;
	l4.proto = iph->protocol;
	l4.sport = ports[0];
	l4.dport = ports[1];

	if (lb_no_frontends())
		return XDP_PASS; /* no Service frontend on the node (tern_lb_empty) */
	fk.addr = daddr;
	fk.port = l4.dport;
	fk.proto = l4.proto;
	svc = bpf_map_lookup_elem(&tern_lb_svc, &fk);
	if (!svc || svc->count == 0)
		return XDP_PASS;
	if (xdp_lb_flow(svc, &l4, saddr, daddr, &b) < 0)
		return XDP_PASS; /* no backend, no room, or a backend elsewhere */

	/* The mark first: without room for it, tc would not know the frame
	 * was translated; untranslated, tc does it all. */
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(__u32)) < 0)
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	meta = (void *)(long)ctx->data_meta;
	iph = data + ETH_HLEN;
	ports = data + XDP_L4_OFF;
	if ((void *)(meta + 1) > data || data + XDP_L4_OFF + sizeof(struct udphdr) > data_end)
		return XDP_PASS; /* cannot happen: checked above */
	*meta = LB_XDP_MARK;

	if (l4.proto == IPPROTO_TCP) {
		if (data + XDP_L4_OFF + sizeof(struct tcphdr) > data_end)
			return XDP_PASS;
		l4_check = data + XDP_L4_OFF + offsetof(struct tcphdr, check);
		*l4_check = xdp_csum_update(*l4_check, daddr, b.addr, l4.dport, b.port);
	} else {
		l4_check = data + XDP_L4_OFF + offsetof(struct udphdr, check);
		/* 0: no UDP checksum; a computed 0 is sent as 0xffff. */
		if (*l4_check) {
			*l4_check = xdp_csum_update(*l4_check, daddr, b.addr, l4.dport, b.port);
			if (!*l4_check)
				*l4_check = 0xffff;
		}
	}
	iph->check = xdp_csum_update(iph->check, daddr, b.addr, 0, 0);
	iph->daddr = b.addr;
	ports[1] = b.port;
	count(METRIC_LB_XDP_DNAT, len);
	return XDP_PASS;
}
