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

static __always_inline __u32 mix32(__u32 h)
{
	/* murmur3's finaliser: every input bit affects every output bit */
	h ^= h >> 16;
	h *= 0x85ebca6bu;
	h ^= h >> 13;
	h *= 0xc2b2ae35u;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 nat_hash(const struct nat_tuple *t)
{
	__u32 h = mix32(((__u32)t->sport << 16 | t->dport) ^ t->proto);

	h = mix32(h ^ t->daddr);
	return mix32(h ^ t->saddr);
}

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
 * Candidates come from a hash of the tuple: a flow whose forward entry was
 * evicted finds its own reverse entry again at the same port. */
static __always_inline enum nat_alloc nat_alloc_port(const struct nat_tuple *orig, __be32 node_ip,
						     __u64 now, __be16 *port)
{
	struct nat_entry rv = {
		.last_seen = now,
		.addr = orig->saddr,
		.port = orig->sport,
	};
	__u32 range = nat_port_max - nat_port_min + 1;
	__u32 h = nat_hash(orig);
	struct nat_tuple rk;
	int full = 0;

	if (nat_port_max < nat_port_min || nat_port_max > 65535)
		return NAT_ALLOC_NO_PORT; /* misconfigured: the loader validates this */

	nat_rev_key(&rk, orig, node_ip, 0);
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
		if (!ct_expired(f->last_seen, now, orig->proto, f->flags)) {
			/* Fast path. A fresh forward entry still owns its port:
			 * a port is only reclaimed once both halves are idle. */
			if (syn && (f->flags & (NAT_F_FIN_POD | NAT_F_FIN_REMOTE | NAT_F_RST))) {
				/* The tuple is reused by a new connection. */
				f->flags = 0;
				r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
				if (r && nat_owned_by(r, orig))
					r->flags = 0;
			}
			ct_touch(f, now, close_flags);
			if (close_flags) {
				/* Rare (FIN/RST): keep the reverse half's view of
				 * the connection state in step. */
				r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
				if (r && nat_owned_by(r, orig))
					r->flags |= close_flags;
			}
			*port = f->port;
			return SNAT_TRANSLATE;
		}
		/* Idle past its timeout: keep the port if nobody took it. The
		 * CAS orders us against an allocator reclaiming it. */
		r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
		if (r && nat_owned_by(r, orig)) {
			__u64 seen = r->last_seen;

			if (__sync_val_compare_and_swap(&r->last_seen, seen, now) == seen &&
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

#endif /* TERN_NAT_H */
