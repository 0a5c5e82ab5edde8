/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* services "ebpf": a client outside the node reaches a frontend on the
 * uplink (NodePort, external or load-balancer IP) whose chosen backend runs
 * on another node (externalTrafficPolicy: Cluster; with Local the slots
 * hold only this node's backends).
 *
 * The packet is DNATed to the backend and SNATed to this node's address
 * (cfg->node_ip) and a port of natPortRange, then forwarded to the
 * backend's node like pod traffic (remote_forward: FIB + redirect_neigh, or
 * the VXLAN tunnel). Without the SNAT the backend would answer the client
 * directly, from its own address: the client, which spoke to the
 * frontend, would drop it. The backend's answer therefore comes back here,
 * to node_ip and that port (tern_from_uplink, tern_from_tunnel), and
 * lb_remote_reply translates it back (source: the frontend; destination:
 * the client) and sends it out with bpf_redirect_neigh.
 *
 * State, all in tern_lb_ct (no second conntrack):
 *  - the flow's forward entry (client -> frontend, lb_uplink_frontend's)
 *    keeps the chosen port in snat_port;
 *  - a reply entry keyed by the answer as the backend sends it
 *    (backend:port -> node_ip:snat_port, LB_CT_F_SNAT | LB_CT_F_EXTERNAL)
 *    holds the client's address and port and the frontend id: one lookup
 *    translates the answer back.
 * The port: candidates from the flow hash over natPortRange (the range
 * pod masquerade uses; the plugin reserves it from the node's own sockets),
 * the first whose reply key is free or idle. Pod masquerade never collides:
 * its reverse keys have a destination outside the cluster, these a pod of
 * the cluster.
 *
 * Not translated (dropped, drop_lb): SCTP (its checksum cannot follow a
 * port change), fragments after the first (no ports). ICMP errors about
 * such flows are not translated back. */
#ifndef TERN_LB_REMOTE_H
#define TERN_LB_REMOTE_H

#include "lb.h"
#include "nat.h"
#include "remote.h"

/* Candidate SNAT ports tried per new flow. */
#define LB_SNAT_PROBES 8

/* lb_snat_port finds the SNAT port of the flow whose forward entry is fe
 * (client saddr:sport, pinned to backend b) and claims its reply key rk
 * (filled in, dport = the port). Returns 0, or -1 when every candidate is
 * taken by a live flow (or the map refuses). */
static __always_inline int lb_snat_port(struct __sk_buff *skb, struct lb_ct_entry *fe,
					struct nat_tuple *rk, __be32 saddr, __be16 sport,
					__u64 now, struct lb_ct_entry *ne)
{
	__u32 range = nat_port_max - nat_port_min + 1;
	struct lb_ct_entry *r;
	__u32 h;

	/* Still ours? (the reply entry may have been evicted or taken over
	 * by another flow once idle) */
	if (fe->snat_port) {
		rk->dport = fe->snat_port;
		r = bpf_map_lookup_elem(&tern_lb_ct, rk);
		if (r && (r->flags & LB_CT_F_SNAT) && r->addr == saddr && r->port == sport &&
		    r->rev_id == fe->rev_id) {
			lb_ct_touch(r, now, 0);
			return 0;
		}
	}
	if (nat_port_max < nat_port_min || nat_port_max > 65535)
		return -1; /* misconfigured: the loader validates this */
	h = bpf_get_hash_recalc(skb);
	for (__u32 i = 0; i < LB_SNAT_PROBES; i++) {
		rk->dport = bpf_htons((__u16)(nat_port_min + (h + i * NAT_PROBE_STEP) % range));
		r = bpf_map_lookup_elem(&tern_lb_ct, rk);
		/* An idle entry is taken over (BPF_ANY); two CPUs racing for it
		 * both win, and the later flow keeps the port: the earlier
		 * finds it gone on its next packet and picks another. */
		if (r && !ct_expired(r->last_seen, now, rk->proto, NAT_F_SEEN_REPLY | r->flags))
			continue;
		if (bpf_map_update_elem(&tern_lb_ct, rk, ne, r ? BPF_ANY : BPF_NOEXIST) < 0)
			continue;
		fe->snat_port = rk->dport;
		return 0;
	}
	return -1;
}

/* lb_to_remote DNATs a packet of a client outside the node (p) to its
 * backend on another node, SNATs it to the node address, and forwards it
 * there. lb_uplink_frontend returned LB_UPLINK_REMOTE for it: the scratch's
 * ck is the flow's forward key, whose tern_lb_ct entry holds the backend.
 * Returns a tc verdict. Global, as lb.h's entry points. */
__noinline int lb_to_remote(struct __sk_buff *skb, struct lb_pkt *p)
{
	struct remote_node *rn;
	struct node_config *cfg;
	struct lb_ct_entry *fe;
	struct lb_scratch *s;
	struct l4 l4 = {};
	__be32 node_ip, baddr;
	__be16 bport;
	__u64 now;

	if (!p)
		return TC_ACT_SHOT;
	s = lb_scratch();
	cfg = node_config();
	if (!s || !cfg || !cfg->node_ip || p->proto == IPPROTO_SCTP)
		goto drop;
	if (parse_l4(skb, p->proto, p->ihl, p->frag_off, &l4) != L4_OK || l4.nonfirst ||
	    s->ck.saddr != p->saddr || s->ck.daddr != p->daddr || s->ck.sport != l4.sport ||
	    s->ck.dport != l4.dport || s->ck.proto != p->proto)
		goto drop;
	node_ip = cfg->node_ip;
	fe = bpf_map_lookup_elem(&tern_lb_ct, &s->ck);
	if (!fe)
		goto drop;
	baddr = fe->addr;
	bport = fe->port;
	rn = remote_lookup(baddr);
	if (!rn)
		goto drop;
	now = bpf_ktime_get_ns();
	__builtin_memset(&s->rk, 0, sizeof(s->rk));
	s->rk.saddr = baddr;
	s->rk.daddr = node_ip;
	s->rk.sport = bport;
	s->rk.proto = p->proto;
	__builtin_memset(&s->ne, 0, sizeof(s->ne));
	s->ne.last_seen = now;
	s->ne.addr = p->saddr;
	s->ne.port = l4.sport;
	s->ne.rev_id = fe->rev_id;
	s->ne.flags = LB_CT_F_REPLY | LB_CT_F_EXTERNAL | LB_CT_F_SNAT;
	if (lb_snat_port(skb, fe, &s->rk, p->saddr, l4.sport, now, &s->ne) < 0)
		goto drop;
	if (lb_rewrite(skb, p->proto, l4.off, IP_DADDR_OFF, p->daddr, baddr, l4.off + 2, l4.dport,
		       bport) < 0 ||
	    lb_rewrite(skb, p->proto, l4.off, IP_SADDR_OFF, p->saddr, node_ip, l4.off, l4.sport,
		       s->rk.dport) < 0)
		goto drop;
	count(METRIC_LB_DNAT, skb->len);
	count(METRIC_LB_SNAT_REMOTE, skb->len);
	return remote_forward(skb, rn, node_ip, baddr, 0, p->proto, p->ttl);
drop:
	count(METRIC_DROP_LB, skb->len);
	return TC_ACT_SHOT;
}

/* lb_remote_reply: a remote backend's answer to a flow lb_to_remote sent
 * it (to node_ip and the flow's SNAT port), translated back to the
 * frontend and the client and sent out with bpf_redirect_neigh. Returns
 * LB_CONTINUE when p is no such answer, else a tc verdict. Global, as
 * lb.h's entry points: verified once, on its own. */
__noinline int lb_remote_reply(struct __sk_buff *skb, const struct lb_pkt *p)
{
	struct bpf_fib_lookup *fib;
	struct lb_scratch *s;
	struct lb_ct_entry *e;
	struct lb_backend *fe;
	struct l4 l4 = {};
	__be32 client;
	__be16 cport;
	__u8 proto;

	if (!p)
		return TC_ACT_SHOT;
	proto = p->proto;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return LB_CONTINUE;
	if (parse_l4(skb, proto, p->ihl, p->frag_off, &l4) != L4_OK || l4.nonfirst)
		return LB_CONTINUE;
	s = lb_scratch();
	if (!s)
		return LB_CONTINUE;
	__builtin_memset(&s->rk, 0, sizeof(s->rk));
	s->rk.saddr = p->saddr;
	s->rk.daddr = p->daddr;
	s->rk.sport = l4.sport;
	s->rk.dport = l4.dport;
	s->rk.proto = proto;
	e = bpf_map_lookup_elem(&tern_lb_ct, &s->rk);
	if (!e || !(e->flags & LB_CT_F_SNAT))
		return LB_CONTINUE;
	fe = bpf_map_lookup_elem(&tern_lb_rev, &e->rev_id);
	if (!fe)
		return LB_CONTINUE; /* the frontend is gone: the client has no flow to match it either */
	lb_ct_touch(e, bpf_ktime_get_ns(), tcp_close_flags(&l4, NAT_F_FIN_REMOTE));
	client = e->addr;
	cport = e->port;
	if (lb_rewrite(skb, proto, l4.off, IP_SADDR_OFF, p->saddr, fe->addr, l4.off, l4.sport, fe->port) < 0 ||
	    lb_rewrite(skb, proto, l4.off, IP_DADDR_OFF, p->daddr, client, l4.off + 2, l4.dport, cport) < 0)
		goto drop;
	count(METRIC_LB_REV_NAT, skb->len);
	if (p->ttl <= 1) {
		count(METRIC_PASS_TTL, skb->len);
		return TERN_PASS;
	}
	fib = (struct bpf_fib_lookup *)s->fib;
	if (fib_lookup_v4(skb, fib, fe->addr, client, 0, proto, fe->port, cport) != BPF_FIB_LKUP_RET_SUCCESS ||
	    decrement_ttl_at(skb, p->ttl) < 0)
		goto drop;
	return redirect_neigh_v4(fib);
drop:
	count(METRIC_DROP_LB, skb->len);
	return TC_ACT_SHOT;
}

#endif /* TERN_LB_REMOTE_H */
