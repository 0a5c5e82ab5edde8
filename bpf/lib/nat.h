/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Source NAT (masquerade) of pod traffic to the node IP: the decision, the
 * port allocator and both map directions. Packet rewriting is in csum.h. */
#ifndef TERN_NAT_H
#define TERN_NAT_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/tern_types.h"
#include "maps.h"
#include "metrics.h"
#include "conntrack.h"

/* NAT source ports, set before load. The range must not overlap the ports
 * the node's own sockets pick (net.ipv4.ip_local_port_range, default
 * 32768-60999), or a reply to a host connection could match a NAT entry;
 * the plugin also adds it to net.ipv4.ip_local_reserved_ports. */
volatile const __u32 nat_port_min = 61000;
volatile const __u32 nat_port_max = 65535;

/* Candidate ports tried per new flow: bounds the work of one packet. */
#define NAT_PROBES 16
/* Odd step between candidates (2^32 / golden ratio): successive candidates
 * spread over the range, and alternate for a range of 2. */
#define NAT_PROBE_STEP 0x9e3779b9u

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

static __always_inline struct node_config *node_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&tern_config, &zero);
}

/* nomasq reports whether daddr is a destination pods reach with their own
 * address (cluster CIDR, nonMasqueradeCIDRs). */
static __always_inline int nomasq(__be32 daddr)
{
	struct lpm_v4_key key = { .prefixlen = 32, .addr = daddr };

	return bpf_map_lookup_elem(&tern_nomasq, &key) != NULL;
}

#define SIP_ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIP_ROUND                                                            \
	do {                                                                 \
		v0 += v1; v1 = SIP_ROTL(v1, 13); v1 ^= v0; v0 = SIP_ROTL(v0, 32); \
		v2 += v3; v3 = SIP_ROTL(v3, 16); v3 ^= v2;                   \
		v0 += v3; v3 = SIP_ROTL(v3, 21); v3 ^= v0;                   \
		v2 += v1; v1 = SIP_ROTL(v1, 17); v1 ^= v2; v2 = SIP_ROTL(v2, 32); \
	} while (0)

/* siphash16 is SipHash-2-4 (Aumasson, Bernstein) of a 16-byte message
 * m0, m1 (its two little-endian 64-bit words) under key k. */
static __always_inline __u64 siphash16(__u64 k0, __u64 k1, __u64 m0, __u64 m1)
{
	__u64 v0 = 0x736f6d6570736575ULL ^ k0;
	__u64 v1 = 0x646f72616e646f6dULL ^ k1;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0;
	__u64 v3 = 0x7465646279746573ULL ^ k1;
	__u64 b = 16ULL << 56;

	v3 ^= m0; SIP_ROUND; SIP_ROUND; v0 ^= m0;
	v3 ^= m1; SIP_ROUND; SIP_ROUND; v0 ^= m1;
	v3 ^= b; SIP_ROUND; SIP_ROUND; v0 ^= b;
	v2 ^= 0xff;
	SIP_ROUND; SIP_ROUND; SIP_ROUND; SIP_ROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

/* nat_hash picks where a flow's NAT port candidates start: SipHash of the
 * 16 bytes of its tuple under the node's secret key (tern_nat_key). Keyed,
 * so that nobody can predict from a tuple which port it will get, or craft
 * flows that land on the ports of another pod's flows. */
static __always_inline __u32 nat_hash(const struct nat_tuple *t)
{
	__u32 zero = 0;
	struct nat_key *k = bpf_map_lookup_elem(&tern_nat_key, &zero);
	__u64 m[2];

	__builtin_memcpy(m, t, sizeof(m));
	if (!k)
		return (__u32)siphash16(0, 0, m[0], m[1]); /* cannot happen: array index 0 */
	return (__u32)siphash16(k->k0, k->k1, m[0], m[1]);
}

/* NAT_GC_DYING in a reverse entry's last_seen: the garbage collector has
 * claimed the entry and is about to delete it (with its forward half). No
 * allocator takes it over or reuses it meanwhile; to ct_expired it is not
 * idle. */
#define NAT_GC_DYING (~0ULL)

/* nat_rev_key is the tuple a reply to orig arrives with once orig left as
 * node_ip:nat_port. */
static __always_inline void nat_rev_key(struct nat_tuple *rk, const struct nat_tuple *orig,
					__be32 node_ip, __be16 nat_port)
{
	rk->saddr = orig->daddr;
	rk->daddr = node_ip;
	rk->sport = orig->dport;
	rk->dport = nat_port;
	rk->proto = orig->proto;
	rk->pad[0] = rk->pad[1] = rk->pad[2] = 0;
}

/* nat_fwd_key is the pod-side tuple of the flow a reverse entry belongs to. */
static __always_inline void nat_fwd_key(struct nat_tuple *fk, const struct nat_tuple *rk,
					const struct nat_entry *r)
{
	fk->saddr = r->addr;
	fk->daddr = rk->saddr;
	fk->sport = r->port;
	fk->dport = rk->sport;
	fk->proto = rk->proto;
	fk->pad[0] = fk->pad[1] = fk->pad[2] = 0;
}

static __always_inline int nat_owned_by(const struct nat_entry *r, const struct nat_tuple *orig)
{
	return r->addr == orig->saddr && r->port == orig->sport;
}

/* nat_fwd_of returns the forward entry of the flow that owns reverse entry
 * r at rk, if it still points at rk's NAT address and port. */
static __always_inline struct nat_entry *nat_fwd_of(const struct nat_tuple *rk,
						    const struct nat_entry *r)
{
	struct nat_tuple fk;
	struct nat_entry *f;

	nat_fwd_key(&fk, rk, r);
	f = bpf_map_lookup_elem(&tern_nat, &fk);
	if (!f || (f->flags & NAT_F_INBOUND) || f->addr != rk->daddr || f->port != rk->dport)
		return NULL;
	return f;
}

enum nat_alloc {
	NAT_ALLOC_NEW = 0, /* a new reverse entry was inserted */
	NAT_ALLOC_REUSED,  /* an entry of this flow, or a reclaimed idle one, was taken */
	NAT_ALLOC_NO_PORT,
	NAT_ALLOC_MAP_FULL,
};

/* nat_alloc_port finds a NAT port for the pod-side tuple orig and claims it
 * by creating (or taking over) the reverse entry
 *   (remote addr, node_ip, remote port, NAT port, proto) -> pod addr, port.
 * That key is the whole of what must be unique, so two pods' flows share a
 * NAT port when they go to different remotes, and the same (remote, NAT
 * port) is never handed to two flows: a new entry is inserted with
 * BPF_NOEXIST, and an idle one is taken over with a compare-and-swap of its
 * last_seen, so of two CPUs racing for a port exactly one wins.
 * Candidates come from a keyed hash of the tuple, and every candidate is
 * looked at before anything is inserted: a flow whose forward entry was
 * lost finds its own reverse entry again, at whichever candidate it is,
 * instead of claiming an earlier one that has become free since. */
static __always_inline enum nat_alloc nat_alloc_port(const struct nat_tuple *orig, __be32 node_ip,
						     __u64 now, __be16 *port)
{
	struct nat_entry rv = {
		.last_seen = now,
		.addr = orig->saddr,
		.port = orig->sport,
	};
	__u32 range = nat_port_max - nat_port_min + 1;
	struct nat_tuple rk;
	int full = 0;
	__u32 h;

	if (nat_port_max < nat_port_min || nat_port_max > 65535)
		return NAT_ALLOC_NO_PORT; /* misconfigured: the loader validates this */

	h = nat_hash(orig);
	nat_rev_key(&rk, orig, node_ip, 0);
	/* Lookups only: is one of the candidates ours already? */
	for (__u32 i = 0; i < NAT_PROBES; i++) {
		struct nat_entry *r;
		__u64 rseen;

		rk.dport = bpf_htons((__u16)(nat_port_min + (h + i * NAT_PROBE_STEP) % range));
		r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
		if (!r || !nat_owned_by(r, orig))
			continue;
		rseen = r->last_seen;
		if (rseen == NAT_GC_DYING)
			break; /* being collected: claim afresh below */
		if (__sync_val_compare_and_swap(&r->last_seen, rseen, now) == rseen && nat_owned_by(r, orig)) {
			*port = rk.dport;
			return NAT_ALLOC_REUSED;
		}
	}
	/* Claim: the first candidate that is free, or held by an idle flow. */
	for (__u32 i = 0; i < NAT_PROBES; i++) {
		__u32 cand = nat_port_min + (h + i * NAT_PROBE_STEP) % range;
		struct nat_entry *r, *f;
		__u64 seen, rseen;
		__u16 flags;
		long err;

		rk.dport = bpf_htons((__u16)cand);
		err = bpf_map_update_elem(&tern_nat_rev, &rk, &rv, BPF_NOEXIST);
		if (err == 0) {
			*port = rk.dport;
			return NAT_ALLOC_NEW;
		}
		if (err != -EEXIST) {
			/* Map full (plain hash) or no free LRU node: another
			 * candidate may still be an idle entry to take over. */
			full = 1;
			continue;
		}
		r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
		if (!r)
			continue; /* removed since: try the next one */
		rseen = r->last_seen;
		if (rseen == NAT_GC_DYING)
			continue;
		if (nat_owned_by(r, orig)) {
			/* Ours already (forward entry evicted or expired). The
			 * CAS, like a takeover's, fails if another allocator
			 * took the port over since we looked. */
			if (__sync_val_compare_and_swap(&r->last_seen, rseen, now) != rseen ||
			    !nat_owned_by(r, orig))
				continue;
			*port = rk.dport;
			return NAT_ALLOC_REUSED;
		}
		seen = rseen;
		flags = r->flags;
		f = nat_fwd_of(&rk, r);
		if (f) {
			if (f->last_seen > seen)
				seen = f->last_seen;
			flags |= f->flags;
		}
		if (!ct_expired(seen, now, orig->proto, flags))
			continue;
		/* Take the idle entry over. The CAS fails if a reply of the old
		 * flow (or another allocator) touched it since we looked. */
		if (__sync_val_compare_and_swap(&r->last_seen, rseen, now) != rseen)
			continue;
		if (f) {
			struct nat_tuple fk;

			/* The old flow must not keep using the port: without a
			 * forward entry its next packet allocates afresh. */
			nat_fwd_key(&fk, &rk, r);
			(void)bpf_map_delete_elem(&tern_nat, &fk); /* -ENOENT: gone already, fine */
		}
		r->addr = orig->saddr;
		r->port = orig->sport;
		r->flags = 0;
		*port = rk.dport;
		return NAT_ALLOC_REUSED;
	}
	return full ? NAT_ALLOC_MAP_FULL : NAT_ALLOC_NO_PORT;
}

enum snat_result {
	SNAT_TRANSLATE = 0, /* rewrite the source to node_ip:*port */
	SNAT_INBOUND,       /* a flow opened from outside: keep the pod's address */
	SNAT_NO_PORT,
	SNAT_MAP_FULL,
};

/* snat_lookup finds or creates the translation of the pod-side tuple orig.
 * close_flags are the FIN/RST flags of this packet (pod direction), syn
 * whether it opens a TCP connection. */
static __always_inline enum snat_result snat_lookup(const struct nat_tuple *orig, __be32 node_ip,
						    __u16 close_flags, int syn, __u64 now, __be16 *port)
{
	struct nat_entry *f = bpf_map_lookup_elem(&tern_nat, orig);
	struct nat_entry fv = {};
	struct nat_tuple rk;
	struct nat_entry *r;
	enum nat_alloc a;

	if (f && (f->flags & NAT_F_INBOUND)) {
		ct_touch(f, now, close_flags);
		return SNAT_INBOUND;
	}
	if (f && f->addr == node_ip) {
		nat_rev_key(&rk, orig, node_ip, f->port);
		r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
		if (!r || !nat_owned_by(r, orig)) {
			/* The port is no longer this flow's: its reverse entry
			 * was removed (DEL, a flush, the collector racing a
			 * packet) or is another flow's. Never send with it: the
			 * replies would go to that other flow. Allocate again. */
			count(METRIC_NAT_REV_LOST, 0);
			goto alloc;
		}
		if (!ct_expired(f->last_seen, now, orig->proto, f->flags) && r->last_seen != NAT_GC_DYING) {
			/* Fast path: a fresh forward entry whose reverse entry
			 * still points back at this flow. */
			if (syn && (f->flags & (NAT_F_FIN_POD | NAT_F_FIN_REMOTE | NAT_F_RST))) {
				/* The tuple is reused by a new connection. */
				f->flags = 0;
				r->flags = 0;
			}
			ct_touch(f, now, close_flags);
			if (close_flags) {
				/* Rare (FIN/RST): keep the reverse half's view of
				 * the connection state in step. */
				r->flags |= close_flags;
			}
			*port = f->port;
			return SNAT_TRANSLATE;
		}
		/* Idle past its timeout: keep the port if nobody took it. The
		 * CAS orders us against an allocator reclaiming it. */
		{
			__u64 seen = r->last_seen;

			if (seen != NAT_GC_DYING &&
			    __sync_val_compare_and_swap(&r->last_seen, seen, now) == seen &&
			    nat_owned_by(r, orig)) {
				if (syn)
					f->flags = r->flags = 0;
				f->last_seen = now;
				f->flags |= close_flags;
				*port = f->port;
				return SNAT_TRANSLATE;
			}
		}
	}

alloc:
	a = nat_alloc_port(orig, node_ip, now, port);
	if (a == NAT_ALLOC_NO_PORT)
		return SNAT_NO_PORT;
	if (a == NAT_ALLOC_MAP_FULL)
		return SNAT_MAP_FULL;
	fv.last_seen = now;
	fv.addr = node_ip;
	fv.port = *port;
	fv.flags = close_flags;
	if (bpf_map_update_elem(&tern_nat, orig, &fv, BPF_ANY) < 0) {
		if (a == NAT_ALLOC_NEW) {
			/* Give the port back rather than leave an entry no
			 * packet of ours will refresh. */
			nat_rev_key(&rk, orig, node_ip, *port);
			(void)bpf_map_delete_elem(&tern_nat_rev, &rk); /* failing, it idles out */
		}
		return SNAT_MAP_FULL;
	}
	return SNAT_TRANSLATE;
}

/* snat_rev_lookup finds the pod a reply tuple (rk, as it arrived on the
 * uplink) belongs to, refreshes the entry and records reply-side TCP state
 * in both halves. */
static __always_inline struct nat_entry *snat_rev_lookup(const struct nat_tuple *rk,
							 __u16 flags, __u64 now)
{
	struct nat_entry *r = bpf_map_lookup_elem(&tern_nat_rev, rk);
	struct nat_entry *f;

	if (!r)
		return NULL;
	flags |= NAT_F_SEEN_REPLY;
	if ((r->flags | flags) != r->flags) {
		/* First reply, or FIN/RST: the forward half decides the
		 * timeout its fast path applies, so tell it. Rare. */
		f = nat_fwd_of(rk, r);
		if (f)
			f->flags |= flags;
	}
	ct_touch(r, now, flags);
	return r;
}

/* snat_note_inbound records that the pod-side tuple orig belongs to a
 * connection opened from outside to the pod's own address (routed pod
 * CIDRs), so the pod's answers keep its address instead of being
 * masqueraded into a flow the remote does not know. */
static __always_inline void snat_note_inbound(const struct nat_tuple *orig, __u16 close_flags, __u64 now)
{
	struct nat_entry *f = bpf_map_lookup_elem(&tern_nat, orig);
	struct nat_entry fv = {
		.last_seen = now,
		.flags = NAT_F_INBOUND | NAT_F_SEEN_REPLY | close_flags,
	};

	if (f) {
		if (f->flags & NAT_F_INBOUND)
			ct_touch(f, now, close_flags);
		return; /* an outbound flow owns the tuple: leave it */
	}
	/* Best effort: failing (map full, or a racing CPU inserted it first)
	 * only means an answer may be masqueraded. */
	(void)bpf_map_update_elem(&tern_nat, orig, &fv, BPF_NOEXIST);
}

/* Garbage collection. The NAT maps are plain hashes: nothing is evicted,
 * so expired pairs must be removed or the maps fill up. A bpf_timer in the
 * pinned map tern_nat_gc_timer runs nat_gc every nat_gc_interval seconds in the
 * kernel, with or without a Tern process on the node; the plugin arms it
 * (and runs one pass) through the program tern_nat_gc whenever it opens
 * the datapath. */

/* Seconds between two passes, set before load. The allocator reclaims an
 * idle port by itself when it needs it, so the collector only has to keep
 * the maps from filling with dead entries: as often as the shortest
 * timeout (TCP close, 10 s). */
volatile const __u32 nat_gc_interval = 10;

#ifndef CLOCK_MONOTONIC
#define CLOCK_MONOTONIC 1
#endif

struct nat_gc_ctx {
	__u64 now;
	__u64 min_timeout; /* ns, the shortest idle timeout of any flow */
	__u32 removed;
};

static __always_inline __u64 ct_min_timeout_ns(void)
{
	__u32 s = ct_timeout_tcp;

	if (ct_timeout_tcp_syn < s)
		s = ct_timeout_tcp_syn;
	if (ct_timeout_tcp_close < s)
		s = ct_timeout_tcp_close;
	if (ct_timeout_udp < s)
		s = ct_timeout_udp;
	if (ct_timeout_icmp < s)
		s = ct_timeout_icmp;
	return (__u64)s * NSEC_PER_SEC;
}

/* nat_gc_rev removes the pair of reverse entry r at rk when both halves
 * are idle past their timeout, the rule the port allocator reclaims by. */
static long nat_gc_rev(void *map, struct nat_tuple *rk, struct nat_entry *r, struct nat_gc_ctx *ctx)
{
	__u64 rseen = r->last_seen, seen;
	struct nat_tuple k = *rk, fk;
	__u16 flags = r->flags;
	struct nat_entry *f;

	if (rseen == NAT_GC_DYING)
		return 0;
	/* Touched within the shortest timeout: live whatever the forward
	 * half says. Spares most pairs of a busy node the lookup below. */
	if (ctx->now <= rseen || ctx->now - rseen <= ctx->min_timeout)
		return 0;
	seen = rseen;
	f = nat_fwd_of(&k, r);
	if (f) {
		if (f->last_seen > seen)
			seen = f->last_seen;
		flags |= f->flags;
	}
	if (!ct_expired(seen, ctx->now, k.proto, flags))
		return 0;
	/* Claim it: fails if an allocator took the port over, or a packet
	 * refreshed it, since we looked. */
	if (__sync_val_compare_and_swap(&r->last_seen, rseen, NAT_GC_DYING) != rseen)
		return 0;
	if (f) {
		nat_fwd_key(&fk, &k, r);
		if (bpf_map_delete_elem(&tern_nat, &fk) == 0)
			ctx->removed++;
	}
	if (bpf_map_delete_elem(&tern_nat_rev, &k) == 0)
		ctx->removed++;
	return 0;
}

/* nat_gc_fwd removes expired forward entries that are no half of a pair:
 * inbound-flow records, and forward entries whose reverse entry is gone or
 * another flow's. Halves of pairs are nat_gc_rev's. */
static long nat_gc_fwd(void *map, struct nat_tuple *fk, struct nat_entry *f, struct nat_gc_ctx *ctx)
{
	struct nat_tuple k = *fk, rk;
	struct nat_entry *r;

	if (!ct_expired(f->last_seen, ctx->now, k.proto, f->flags))
		return 0;
	if (!(f->flags & NAT_F_INBOUND)) {
		nat_rev_key(&rk, &k, f->addr, f->port);
		r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
		if (r && nat_owned_by(r, &k))
			return 0;
	}
	if (bpf_map_delete_elem(&tern_nat, &k) == 0)
		ctx->removed++;
	return 0;
}

/* nat_gc runs one pass over both maps and returns the entries removed. */
static __always_inline __u32 nat_gc(void)
{
	struct nat_gc_ctx ctx = { .now = bpf_ktime_get_ns(), .min_timeout = ct_min_timeout_ns() };
	struct metric_value *v;
	__u32 key = METRIC_NAT_GC;
	__u32 base, removed;

	/* The verifier checks callbacks as loops until their states
	 * converge: a counter starting at a known 0 never would (0, 1, 2, ...
	 * are all different states). Starting it at a value the verifier
	 * cannot know makes every iteration's state the same. */
	base = (__u32)ctx.now;
	ctx.removed = base;
	bpf_for_each_map_elem(&tern_nat_rev, nat_gc_rev, &ctx, 0);
	bpf_for_each_map_elem(&tern_nat, nat_gc_fwd, &ctx, 0);
	removed = ctx.removed - base;
	if (removed) {
		v = bpf_map_lookup_elem(&tern_metrics, &key);
		if (v)
			v->packets += removed;
	}
	return removed;
}

static int nat_gc_tick(void *map, __u32 *key, struct nat_gc_timer *t)
{
	nat_gc();
	bpf_timer_start(&t->timer, (__u64)nat_gc_interval * NSEC_PER_SEC, 0);
	return 0;
}

/* nat_gc_arm (re)arms the collector's timer with this program's callback
 * (a new program version takes it over) and runs one pass now. Returns the
 * entries removed, or a negative error. */
static __always_inline long nat_gc_arm(void)
{
	__u32 zero = 0;
	struct nat_gc_timer *t = bpf_map_lookup_elem(&tern_nat_gc_timer, &zero);
	long err;

	if (!t)
		return -ENOENT;
	err = bpf_timer_init(&t->timer, &tern_nat_gc_timer, CLOCK_MONOTONIC);
	if (err && err != -EBUSY)
		return err;
	err = bpf_timer_set_callback(&t->timer, nat_gc_tick);
	if (err)
		return err;
	err = bpf_timer_start(&t->timer, (__u64)nat_gc_interval * NSEC_PER_SEC, 0);
	if (err)
		return err;
	return nat_gc();
}

#endif /* TERN_NAT_H */
