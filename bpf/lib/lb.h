/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Tern's own Service load balancer (network config services: "ebpf"),
 * called from tern_from_pod for pods whose endpoint has ENDPOINT_F_LB:
 *
 *  - lb_from_pod, first thing after anti-spoofing: a packet to a frontend
 *    (tern_lb_svc: ClusterIP, NodePort on a node address, external or
 *    load-balancer IP; port; protocol) is DNATed to its backend before
 *    policy, so the sender's egress rules and the receiver's ingress rules
 *    see the backend pod, and the backend sees the client's own address;
 *  - lb_reply, after policy: a backend's answer (its tern_lb_ct reply
 *    entry) gets the frontend back as its source (tern_lb_rev);
 *  - a pod reaching itself through its Service (hairpin) is also SNATed to
 *    the service-loopback address (lb_loopback_ip), else its own kernel
 *    would take the packet for a martian of its own; both directions are
 *    delivered straight back into the pod, undecided by policy (a pod can
 *    never be denied itself);
 *  - a frontend without backends answers the client with ICMP port
 *    unreachable, as kube-proxy's REJECT rule does (the client's connect()
 *    fails at once with ECONNREFUSED); with traffic policy Local and no
 *    backend here it drops (kube-proxy's DROP).
 *
 * Backend choice: the first packet of a flow picks slot (flow hash mod
 * count) of the frontend's slots, or the client's affinity backend, and
 * the flow is pinned to it in tern_lb_ct: later packets never look at the
 * slots again, so changing the slots (the plugin moves the last backend
 * into a removed one's slot) never moves an established flow. Maglev was
 * not used: its value is that independent balancers agree on a flow's
 * backend without shared state, but here every flow is balanced once, on
 * its client's node, and pinned; and its lookup table (a prime >= 100x
 * the backends, per Service) would take 10,000 Services x 16,381 slots of
 * map space, where the slots here take one entry per backend. */
#ifndef TERN_LB_H
#define TERN_LB_H

#include <linux/bpf.h>
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
#include "forward.h"
#include "fib.h"
#include "policy.h"
#include "lb_select.h"

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif

/* lb_from_pod's "go on": not a tc verdict (those are >= -1). */
#define LB_CONTINUE -2
/* lb_from_uplink's "a remote backend's answer, allowed: translate it back
 * (lb_reply) and deliver it". The caller makes that call, not
 * lb_from_uplink: the verifier bounds a chain of frames to 512 bytes. */
#define LB_UPLINK_REPLY -3
/* lb_uplink_frontend's "the backend is on another node": see lib/lb_remote.h. */
#define LB_UPLINK_REMOTE -4

/* The service-loopback address a pod reaching itself through its Service
 * sees as the client (network order; set before load from the network
 * config's serviceLoopbackIP, default 169.254.42.1). */
volatile const __be32 lb_loopback_ip = bpf_htonl(0xa9fe2a01);

/* lb_rewrite replaces an address (at addr_off) and its port (at port_off)
 * with their checksums. SCTP's CRC32c covers no pseudo header (an address
 * change needs no update) but covers the ports, and cannot be updated
 * incrementally: a port change of SCTP fails. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, __u8 proto, __u32 l4_off,
				      __u32 addr_off, __be32 from_addr, __be32 to_addr,
				      __u32 port_off, __be16 from_port, __be16 to_port)
{
	if (proto == IPPROTO_SCTP) {
		if (from_port != to_port)
			return -1;
		if (from_addr == to_addr)
			return 0;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, from_addr, to_addr, sizeof(to_addr)) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, addr_off, &to_addr, sizeof(to_addr), 0) < 0 ? -1 : 0;
	}
	return nat_rewrite(skb, proto, addr_off, from_addr, to_addr, port_off, from_port, to_port,
			   l4_off + l4_csum_off(proto));
}

/* lb_ct_touch refreshes an entry as ct_touch does a NAT entry. */
static __always_inline void lb_ct_touch(struct lb_ct_entry *e, __u64 now, __u16 flags)
{
	if (now > e->last_seen + CT_REFRESH_NS)
		e->last_seen = now;
	if ((e->flags | flags) != e->flags)
		e->flags |= flags;
}

static __always_inline __u16 lb_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* lb_icmp_error: the ICMP port unreachable lb_reject builds: 20 + 8 + 20 +
 * 8 bytes. */
struct lb_icmp_error {
	struct iphdr ip;
	__u8 type, code;
	__be16 csum;
	__u32 unused;
	struct iphdr orig;
	__u8 l4[8];
};

/* lb_scratch: working storage of lb_from_pod, in a per-CPU map: on the
 * stack it would take tern_from_pod and this call together over the 512
 * bytes a BPF program has. */
struct lb_scratch {
	struct nat_tuple ck;     /* the flow as the client sends it */
	struct nat_tuple rk;     /* its answers as the backend sends them */
	struct lb_ct_entry ne;   /* a new tern_lb_ct entry */
	struct lb_affinity na;   /* a new tern_lb_affinity entry */
	__u8 icmp[56];           /* struct lb_icmp_error */
	__u64 fib[8];            /* struct bpf_fib_lookup */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_scratch);
	__uint(pinning, LIBBPF_PIN_BY_NAME); /* as every map: the loader pins them all */
} tern_lb_scratch SEC(".maps");

static __always_inline struct lb_scratch *lb_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&tern_lb_scratch, &zero);
}

/* lb_no_frontends reports that tern_lb_svc is known to be empty
 * (tern_lb_empty, maps.h): no packet can be a frontend's, so the frontend
 * lookup (L4 parse and a hash miss per packet) can be skipped with the
 * verdict it would give. */
static __always_inline int lb_no_frontends(void)
{
	__u32 zero = 0;
	__u32 *empty = bpf_map_lookup_elem(&tern_lb_empty, &zero);

	return empty && *empty;
}

/* lb_reject turns the client's packet into ICMP port unreachable from the
 * frontend, quoting the packet's IPv4 header and first 8 bytes of L4 (RFC
 * 792), and sends it back into the pod. */
static __always_inline int lb_reject(struct __sk_buff *skb, const struct endpoint *src, __u32 l4_off,
				     struct lb_scratch *s)
{
	struct lb_icmp_error *m = (struct lb_icmp_error *)s->icmp;
	__s64 sum;

	_Static_assert(sizeof(*m) == sizeof(s->icmp), "ICMP error: 20 + 8 + 20 + 8 bytes, no padding");
	if (l4_off != ETH_HLEN + sizeof(struct iphdr) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &m->orig, sizeof(m->orig)) < 0 ||
	    bpf_skb_load_bytes(skb, l4_off, m->l4, sizeof(m->l4)) < 0)
		goto drop;
	__builtin_memset(&m->ip, 0, sizeof(m->ip));
	m->ip.version = 4;
	m->ip.ihl = 5;
	m->ip.tos = 0xc0; /* internetwork control, as the kernel's ICMP errors */
	m->ip.tot_len = bpf_htons(sizeof(*m));
	m->ip.ttl = 64;
	m->ip.protocol = IPPROTO_ICMP;
	m->ip.saddr = m->orig.daddr;
	m->ip.daddr = m->orig.saddr;
	m->type = ICMP_DEST_UNREACH;
	m->code = 3; /* port unreachable */
	m->csum = 0;
	m->unused = 0;
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&m->ip, sizeof(m->ip), 0);
	if (sum < 0)
		goto drop;
	m->ip.check = lb_csum_fold(sum);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&m->type, sizeof(*m) - sizeof(m->ip), 0);
	if (sum < 0)
		goto drop;
	m->csum = lb_csum_fold(sum);
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(*m), 0) < 0 ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, m, sizeof(*m), 0) < 0 ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), src->pod_mac, ETH_ALEN, 0) < 0 ||
	    bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), src->host_mac, ETH_ALEN, 0) < 0)
		goto drop;
	count(METRIC_LB_REJECT, skb->len);
	return bpf_redirect_peer(src->ifindex, 0);
drop:
	count(METRIC_DROP_LB, skb->len);
	return TC_ACT_SHOT;
}

/* lb_pick_hash chooses the backend of a new flow (lib/lb_select.h) with
 * the flow hash its caller computed (XDP has no skb hash); lb_pick hashes
 * the skb's flow. */
static __always_inline int lb_pick_hash(__u32 hash, const struct lb_svc *svc, __be32 client,
					__u64 now, struct lb_backend *b, struct lb_scratch *s)
{
	return lb_select(svc, client, now, hash, b, &s->na);
}

static __always_inline int lb_pick(struct __sk_buff *skb, const struct lb_svc *svc, __be32 client,
				   __u64 now, struct lb_backend *b, struct lb_scratch *s)
{
	return lb_pick_hash(bpf_get_hash_recalc(skb), svc, client, now, b, s);
}

/* lb_hairpin_reply: a pod's answer to the service-loopback address is its
 * answer to itself through its Service: source back to the frontend,
 * destination back to the pod, delivered into it. */
static __always_inline int lb_hairpin_reply(struct __sk_buff *skb, const struct endpoint *src,
					    __be32 saddr, __u8 proto, __u8 ttl, const struct l4 *l4)
{
	struct nat_tuple rk = {
		.saddr = saddr, .daddr = lb_loopback_ip,
		.sport = l4->sport, .dport = l4->dport, .proto = proto,
	};
	struct lb_ct_entry *e = bpf_map_lookup_elem(&tern_lb_ct, &rk);
	struct lb_backend *fe;

	if (!e || !(e->flags & LB_CT_F_HAIRPIN) || e->addr != saddr)
		goto drop;
	fe = bpf_map_lookup_elem(&tern_lb_rev, &e->rev_id);
	if (!fe)
		goto drop;
	lb_ct_touch(e, bpf_ktime_get_ns(), 0);
	if (lb_rewrite(skb, proto, l4->off, IP_SADDR_OFF, saddr, fe->addr, l4->off, l4->sport, fe->port) < 0 ||
	    lb_rewrite(skb, proto, l4->off, IP_DADDR_OFF, lb_loopback_ip, e->addr, l4->off + 2,
		       l4->dport, e->port) < 0)
		goto drop;
	return deliver_to_endpoint(skb, src, ttl, METRIC_LB_HAIRPIN);
drop:
	count(METRIC_DROP_LB, skb->len);
	return TC_ACT_SHOT;
}

/* lb_pkt: the IPv4 header fields the entry points below need (BPF calls
 * take at most five arguments). */
struct lb_pkt {
	__be32 saddr;
	__be32 daddr;
	__be16 frag_off;
	__be16 id;
	__u8 proto;
	__u8 ihl;
	__u8 ttl;
	__u8 pad;
	/* What lb_from_pod learnt of the packet for lb_reply (enum
	 * lb_pkt_reply; 0: nothing, lb_reply looks the packet up), and the
	 * frontend an answer leaves from. */
	__be32 fe_addr;
	__be16 fe_port;
	__u8 reply;
	__u8 pad2;
	/* An answer's L4 header as lb_reply_found saw it (valid with
	 * LB_PKT_REPLY*): lb_reply rewrites it without parsing it again. */
	__u16 l4_off;
	__be16 sport;
	__be16 dport;
	__u16 pad3;
};

/* lb_pkt.reply. lb_from_pod looks the packet up in tern_lb_ct once, as
 * sent: a forward entry is a Service request, a reply entry a backend's
 * answer; lb_reply, after policy, uses what it found instead of a second
 * lookup of the same tuple. */
enum lb_pkt_reply {
	LB_PKT_LOOKUP = 0,       /* unknown (lb_reply's other callers): look up */
	LB_PKT_NOT_REPLY = 1,    /* no answer of a Service flow */
	LB_PKT_REPLY = 2,        /* an answer: from fe_addr:fe_port */
	LB_PKT_REPLY_EXTERNAL = 3, /* ... to a client outside the node */
};

/* The entry points below are global functions: the verifier checks each
 * once, on its own, instead of once per path of tern_from_pod that reaches
 * it (which multiplied the states of policy and SNAT beyond its limit). */

/* lb_reply_found records in p the frontend of a backend's answer whose
 * reply entry e was found (a hairpin's goes to lb_hairpin_reply instead),
 * and the answer's L4 header l4, and refreshes e. Returns -1 when e gives no way back: a hairpin entry,
 * or an older object's entry (without LB_CT_F_FRONTEND) whose frontend is
 * gone from tern_lb_rev. */
static __always_inline int lb_reply_found(struct lb_ct_entry *e, const struct l4 *l4, struct lb_pkt *p)
{
	struct lb_backend *fe;

	if (e->flags & LB_CT_F_HAIRPIN)
		return -1;
	if (e->flags & LB_CT_F_FRONTEND) {
		/* A frontend's removal purges its entries (datapath/ebpf's
		 * purgeLBFlows), so the entry's frontend is still current. */
		p->fe_addr = e->addr;
		p->fe_port = e->port;
	} else {
		fe = bpf_map_lookup_elem(&tern_lb_rev, &e->rev_id);
		if (!fe)
			return -1; /* the frontend is gone: the client has no flow to match it either */
		p->fe_addr = fe->addr;
		p->fe_port = fe->port;
	}
	p->reply = (e->flags & LB_CT_F_EXTERNAL) ? LB_PKT_REPLY_EXTERNAL : LB_PKT_REPLY;
	p->l4_off = l4->off;
	p->sport = l4->sport;
	p->dport = l4->dport;
	lb_ct_touch(e, bpf_ktime_get_coarse_ns(), tcp_close_flags(l4, NAT_F_FIN_REMOTE));
	return 0;
}

/* lb_from_pod translates a packet src sent to a Service frontend. It
 * returns LB_CONTINUE with *daddr set to the backend (or unchanged: not a
 * frontend), or a tc verdict when it decided itself (hairpin, reject,
 * drop). */
__noinline int lb_from_pod(struct __sk_buff *skb, const struct endpoint *src, struct lb_pkt *p)
{
	struct lb_svc_key fk = {};
	struct lb_scratch *s;
	struct lb_ct_entry *e;
	struct lb_backend b;
	struct lb_svc *svc;
	struct l4 l4 = {};
	__u64 now;
	__be32 saddr, *daddr;
	__u8 proto, ttl;

	if (!src || !p)
		return TC_ACT_SHOT;
	if (!(src->flags & ENDPOINT_F_LB))
		return LB_CONTINUE;
	saddr = p->saddr;
	daddr = &p->daddr;
	proto = p->proto;
	ttl = p->ttl;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return LB_CONTINUE;
	if (parse_l4(skb, proto, p->ihl, p->frag_off, &l4) != L4_OK || l4.nonfirst)
		return LB_CONTINUE; /* policy drops the truncated; fragments are not translated */
	if (*daddr == lb_loopback_ip)
		return lb_hairpin_reply(skb, src, saddr, proto, ttl, &l4);

	s = lb_scratch();
	if (!s)
		goto drop;
	__builtin_memset(&s->ck, 0, sizeof(s->ck));
	s->ck.saddr = saddr;
	s->ck.daddr = *daddr;
	s->ck.sport = l4.sport;
	s->ck.dport = l4.dport;
	s->ck.proto = proto;
	e = bpf_map_lookup_elem(&tern_lb_ct, &s->ck);
	if (e && (e->flags & LB_CT_F_REPLY)) {
		/* A backend's answer: lb_reply translates it after policy. */
		if (lb_reply_found(e, &l4, p) < 0)
			p->reply = LB_PKT_NOT_REPLY;
		return LB_CONTINUE;
	}
	/* The coarse clock (as of the last tick), as policy's: timeouts are
	 * seconds, and bpf_ktime_get_ns reads the clock source (~25 ns under
	 * KVM); read only for a flow's entry or a frontend's packet, which
	 * pod-to-pod traffic has neither of. Entries and affinity stamps
	 * written with the fine clock (sock_lb.c, the uplink) may be up to a
	 * tick ahead of it: ct_expired, lb_ct_touch and lb_select allow for
	 * that. */
	now = e ? bpf_ktime_get_coarse_ns() : 0;
	if (e && !ct_expired(e->last_seen, now, proto, NAT_F_SEEN_REPLY | e->flags)) {
		/* An established flow, pinned to its backend. Its frontend
		 * needs no lookup: removing a frontend, or giving its address
		 * another id, purges its flows (datapath/ebpf's
		 * purgeLBFlows) before the id can serve again. */
		b.addr = e->addr;
		b.port = e->port;
		lb_ct_touch(e, now, tcp_close_flags(&l4, NAT_F_FIN_POD));
	} else {
		fk.addr = *daddr;
		fk.port = l4.dport;
		fk.proto = proto;
		svc = bpf_map_lookup_elem(&tern_lb_svc, &fk);
		if (!svc) {
			p->reply = LB_PKT_NOT_REPLY;
			return LB_CONTINUE;
		}
		if (!now)
			now = bpf_ktime_get_coarse_ns();
		if (lb_pick(skb, svc, saddr, now, &b, s) < 0) {
			if (svc->flags & LB_SVC_F_DROP) {
				count(METRIC_DROP_LB_NO_LOCAL, skb->len);
				return TC_ACT_SHOT;
			}
			return lb_reject(skb, src, l4.off, s);
		}
		/* The reply entry first: an answer must never find a forward
		 * entry without its way back. */
		__builtin_memset(&s->rk, 0, sizeof(s->rk));
		s->rk.saddr = b.addr;
		s->rk.daddr = b.addr == saddr ? lb_loopback_ip : saddr;
		s->rk.sport = b.port;
		s->rk.dport = l4.sport;
		s->rk.proto = proto;
		__builtin_memset(&s->ne, 0, sizeof(s->ne));
		s->ne.last_seen = now;
		s->ne.rev_id = svc->id;
		if (b.addr == saddr) { /* the pod behind the loopback address */
			s->ne.addr = saddr;
			s->ne.port = l4.sport;
			s->ne.flags = LB_CT_F_REPLY | LB_CT_F_HAIRPIN;
		} else { /* the client is the key's destination */
			s->ne.addr = fk.addr;
			s->ne.port = fk.port;
			s->ne.flags = LB_CT_F_REPLY | LB_CT_F_FRONTEND;
		}
		if (bpf_map_update_elem(&tern_lb_ct, &s->rk, &s->ne, BPF_ANY) < 0)
			goto drop;
		s->ne.addr = b.addr;
		s->ne.port = b.port;
		s->ne.flags = tcp_close_flags(&l4, NAT_F_FIN_POD);
		if (bpf_map_update_elem(&tern_lb_ct, &s->ck, &s->ne, BPF_ANY) < 0)
			goto drop;
	}
	/* DNATed: not an answer (lb_reply need not look). */
	p->reply = LB_PKT_NOT_REPLY;

	if (lb_rewrite(skb, proto, l4.off, IP_DADDR_OFF, *daddr, b.addr, l4.off + 2, l4.dport, b.port) < 0)
		goto drop;
	if (b.addr == saddr) {
		/* Hairpin: the pod would drop a packet from its own address
		 * arriving from outside; it sees the loopback address. */
		if (lb_rewrite(skb, proto, l4.off, IP_SADDR_OFF, saddr, lb_loopback_ip, l4.off,
			       l4.sport, l4.sport) < 0)
			goto drop;
		return deliver_to_endpoint(skb, src, ttl, METRIC_LB_HAIRPIN);
	}
	*daddr = b.addr;
	count(METRIC_LB_DNAT, skb->len);
	return LB_CONTINUE;
drop:
	count(METRIC_DROP_LB, skb->len);
	return TC_ACT_SHOT;
}

/* lb_reply translates a backend's (src's) answer to a Service flow back to
 * the frontend the client addressed (p->saddr updated) and returns
 * LB_CONTINUE, also when the packet is no such answer; or a tc verdict:
 * TC_ACT_SHOT when the rewrite failed (counted), or the redirect of an
 * answer to a client outside the node (a NodePort or external-IP flow
 * from the uplink), which is sent out with bpf_redirect_neigh: its source
 * is now a node address, which the host stack would drop as a martian
 * coming in from a pod. */
__noinline int lb_reply(struct __sk_buff *skb, const struct endpoint *src, struct lb_pkt *p)
{
	struct nat_tuple *rk;
	struct lb_ct_entry *e;
	struct l4 l4 = {};
	__u8 proto;

	struct bpf_fib_lookup *fib;
	struct lb_scratch *s;

	_Static_assert(sizeof(*fib) == sizeof(s->fib), "struct bpf_fib_lookup in lb_scratch");
	if (!p || !src)
		return TC_ACT_SHOT;
	if (p->reply == LB_PKT_NOT_REPLY)
		return LB_CONTINUE;
	if (!(src->flags & ENDPOINT_F_LB))
		return LB_CONTINUE;
	proto = p->proto;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return LB_CONTINUE;
	if (p->reply == LB_PKT_LOOKUP) {
		if (parse_l4(skb, proto, p->ihl, p->frag_off, &l4) != L4_OK || l4.nonfirst)
			return LB_CONTINUE;
		/* The key in the scratch map, not on the stack: this
		 * function's frame adds to tern_from_pod's, and the verifier
		 * bounds the sum. */
		s = lb_scratch();
		if (!s)
			return LB_CONTINUE;
		rk = &s->rk;
		__builtin_memset(rk, 0, sizeof(*rk));
		rk->saddr = p->saddr;
		rk->daddr = p->daddr;
		rk->sport = l4.sport;
		rk->dport = l4.dport;
		rk->proto = proto;
		e = bpf_map_lookup_elem(&tern_lb_ct, rk);
		if (!e || !(e->flags & LB_CT_F_REPLY) || lb_reply_found(e, &l4, p) < 0)
			return LB_CONTINUE;
	}
	if (lb_rewrite(skb, proto, p->l4_off, IP_SADDR_OFF, p->saddr, p->fe_addr, p->l4_off, p->sport,
		       p->fe_port) < 0)
		goto drop;
	p->saddr = p->fe_addr;
	count(METRIC_LB_REV_NAT, skb->len);
	if (p->reply != LB_PKT_REPLY_EXTERNAL)
		return LB_CONTINUE;
	/* To a client outside the node, from a node address. */
	if (p->ttl <= 1) {
		count(METRIC_PASS_TTL, skb->len);
		return TERN_PASS;
	}
	s = lb_scratch();
	if (!s)
		goto drop;
	fib = (struct bpf_fib_lookup *)s->fib;
	if (fib_lookup_v4(skb, fib, p->saddr, p->daddr, 0, proto, p->fe_port, p->dport) !=
	    BPF_FIB_LKUP_RET_SUCCESS ||
	    decrement_ttl_at(skb, p->ttl) < 0)
		goto drop;
	return redirect_neigh_v4(fib);
drop:
	count(METRIC_DROP_LB, skb->len);
	return TC_ACT_SHOT;
}

/* lb_from_uplink: a remote backend's answer to a local client pod, as it
 * arrives on the uplink: decided by policy on the backend's address (its
 * flow was decided so at the client's egress, and is tracked), then
 * translated back to the frontend (lb_reply) and delivered into the
 * client by the caller: LB_UPLINK_REPLY. LB_CONTINUE: not such an
 * answer. */
__noinline int lb_from_uplink(struct __sk_buff *skb, const struct endpoint *ep, struct lb_pkt *p)
{
	struct nat_tuple rk = {};
	struct lb_ct_entry *e;
	struct l4 l4 = {};

	__u8 proto;

	if (!ep || !p)
		return TC_ACT_SHOT;
	proto = p->proto;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return LB_CONTINUE;
	if (parse_l4(skb, proto, p->ihl, p->frag_off, &l4) != L4_OK || l4.nonfirst)
		return LB_CONTINUE;
	rk.saddr = p->saddr;
	rk.daddr = p->daddr;
	rk.sport = l4.sport;
	rk.dport = l4.dport;
	rk.proto = proto;
	e = bpf_map_lookup_elem(&tern_lb_ct, &rk);
	if (!e || !(e->flags & LB_CT_F_REPLY) || (e->flags & LB_CT_F_HAIRPIN))
		return LB_CONTINUE;
	if (!policy_pass(skb, p->saddr, p->daddr, proto, p->ihl, p->frag_off, p->id))
		return TC_ACT_SHOT;
	return LB_UPLINK_REPLY;
}

/* lb_uplink_frontend: a client outside the node reaches a frontend on the
 * uplink (NodePort on the node address, an external or load-balancer IP):
 * DNAT to a backend on this node, the backend's ingress policy decided on
 * the client's own address (no SNAT: the answer leaves from the backend's
 * tern_from_pod, reverse-translated, by bpf_redirect_neigh), delivered
 * into the backend. LB_UPLINK_REMOTE: the flow's backend is on another
 * node (externalTrafficPolicy: Cluster); the caller hands it to
 * lb_to_remote (lib/lb_remote.h: SNAT to the node address), out of this
 * frame for the verifier's 512 bytes. LB_CONTINUE: not a frontend. No
 * backend: dropped (no ICMP error to the outside). */
__noinline int lb_uplink_frontend(struct __sk_buff *skb, struct lb_pkt *p)
{
	struct lb_svc_key fk = {};
	struct lb_scratch *s;
	struct lb_ct_entry *e;
	struct endpoint *ep;
	struct lb_backend b;
	struct lb_svc *svc;
	struct l4 l4 = {};
	__u8 proto;
	__u64 now;

	if (!p)
		return TC_ACT_SHOT;
	proto = p->proto;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return LB_CONTINUE;
	if (parse_l4(skb, proto, p->ihl, p->frag_off, &l4) != L4_OK || l4.nonfirst)
		return LB_CONTINUE;
	fk.addr = p->daddr;
	fk.port = l4.dport;
	fk.proto = proto;
	svc = bpf_map_lookup_elem(&tern_lb_svc, &fk);
	if (!svc)
		return LB_CONTINUE;
	s = lb_scratch();
	if (!s)
		goto drop;
	now = bpf_ktime_get_ns();
	__builtin_memset(&s->ck, 0, sizeof(s->ck));
	s->ck.saddr = p->saddr;
	s->ck.daddr = p->daddr;
	s->ck.sport = l4.sport;
	s->ck.dport = l4.dport;
	s->ck.proto = proto;
	e = bpf_map_lookup_elem(&tern_lb_ct, &s->ck);
	if (e && !(e->flags & LB_CT_F_REPLY) && e->rev_id == svc->id &&
	    !ct_expired(e->last_seen, now, proto, NAT_F_SEEN_REPLY | e->flags)) {
		b.addr = e->addr;
		b.port = e->port;
		lb_ct_touch(e, now, tcp_close_flags(&l4, NAT_F_FIN_REMOTE));
	} else {
		if (lb_pick(skb, svc, p->saddr, now, &b, s) < 0) {
			count((svc->flags & LB_SVC_F_DROP) ? METRIC_DROP_LB_NO_LOCAL : METRIC_DROP_LB, skb->len);
			return TC_ACT_SHOT;
		}
		__builtin_memset(&s->rk, 0, sizeof(s->rk));
		s->rk.saddr = b.addr;
		s->rk.daddr = p->saddr;
		s->rk.sport = b.port;
		s->rk.dport = l4.sport;
		s->rk.proto = proto;
		__builtin_memset(&s->ne, 0, sizeof(s->ne));
		s->ne.last_seen = now;
		s->ne.addr = p->saddr;
		s->ne.port = l4.sport;
		s->ne.rev_id = svc->id;
		s->ne.flags = LB_CT_F_REPLY | LB_CT_F_EXTERNAL;
		/* (a remote backend answers the node address: lb_to_remote
		 * writes that reply entry) */
		if (bpf_map_lookup_elem(&tern_endpoints, &b.addr) &&
		    bpf_map_update_elem(&tern_lb_ct, &s->rk, &s->ne, BPF_ANY) < 0)
			goto drop;
		s->ne.addr = b.addr;
		s->ne.port = b.port;
		s->ne.flags = tcp_close_flags(&l4, NAT_F_FIN_REMOTE);
		if (bpf_map_update_elem(&tern_lb_ct, &s->ck, &s->ne, BPF_ANY) < 0)
			goto drop;
	}
	ep = bpf_map_lookup_elem(&tern_endpoints, &b.addr);
	if (!ep)
		return LB_UPLINK_REMOTE; /* s->ck: the flow, as lb_to_remote finds it */
	if (lb_rewrite(skb, proto, l4.off, IP_DADDR_OFF, p->daddr, b.addr, l4.off + 2, l4.dport, b.port) < 0)
		goto drop;
	if (!policy_pass(skb, p->saddr, b.addr, proto, p->ihl, p->frag_off, p->id))
		return TC_ACT_SHOT;
	count(METRIC_LB_DNAT, skb->len);
	return deliver_to_endpoint(skb, ep, p->ttl, METRIC_REDIRECT_PEER);
drop:
	count(METRIC_DROP_LB, skb->len);
	return TC_ACT_SHOT;
}

#endif /* TERN_LB_H */
