/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* NetworkPolicy: the per-packet decision over the compiled rule set, and the
 * conntrack that makes only the first packet of a flow pay for it.
 *
 * The decision is exactly compile.Simulator's (policy/compile: ruleset.go's
 * package doc is the specification, simulate.go the executable one, and a
 * differential test holds this file to both and to policy/reference):
 *   - egress is decided when the source is a local pod isolated for egress,
 *     with the destination as the remote end; ingress when the destination
 *     is a local pod isolated for ingress, with the source as the remote;
 *   - the remote class is tern_ipcache's longest-prefix match (world when
 *     none); ingress from POLICY_CLASS_HOST is allowed outright (egress to
 *     the host is allowed by entries the compiler writes);
 *   - otherwise four tern_policy lookups with the full 96 bits:
 *     (proto, class, port), (proto, any, port), (any, class), (any, any).
 * That is at most 2 hash + 2 x (1 + 4) LPM lookups, whatever the number of
 * rules: no loop over rules.
 *
 * Stateful: a flow whose first packet passes gets a conntrack entry
 * (tern_policy_ct for TCP, tern_policy_ct_other for the rest, so that a
 * spray of UDP flows cannot evict TCP connections), and every later packet
 * of it, either way, passes on that entry alone. Every flow through
 * policy_check is tracked, whether its ends have policy state or not: a
 * policy applied later, even the node's first, does not cut the connections
 * a pod already has (as the iptables datapath's ESTABLISHED rule does not);
 * without the entry, a mid-flow packet would be decided as a new flow.
 * A TCP RST ends an entry only when its sequence number is plausible
 * (policy_rst_plausible): a forged one is dropped. A local pod opens at
 * most policy_ct_pod_flows new entries per map and minute
 * (policy_ct_charge): one pod's spray cannot cycle the whole LRU. */
#ifndef TERN_POLICY_H
#define TERN_POLICY_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/tern_types.h"
#include "maps.h"
#include "metrics.h"
#include "conntrack.h"
#include "events.h"

/* Prefix length of a lookup key: every bit of the 96 after prefixlen. */
#define POLICY_LOOKUP_PREFIXLEN 96

#define IP_MF 0x2000 /* more fragments (host order) */

#define ICMP_ERROR_HDR 8 /* type, code, checksum, unused/MTU: then the offending IP header */

enum policy_result {
	POLICY_PASS = 0,
	POLICY_DROP_EGRESS,
	POLICY_DROP_INGRESS,
	POLICY_DROP_TRUNCATED,
	POLICY_DROP_RST, /* an RST out of its tracked flow's window */
	POLICY_DROP_CT_QUOTA, /* a new flow beyond its pod's share (policy_ct_charge) */
};

/* policy_class_of returns the remote class of addr: its longest-prefix
 * entry in tern_ipcache, world without one. */
static __always_inline __u32 policy_class_of(__be32 addr)
{
	struct lpm_v4_key key = { .prefixlen = 32, .addr = addr };
	__u32 *cls = bpf_map_lookup_elem(&tern_ipcache, &key);

	return cls ? *cls : POLICY_CLASS_WORLD;
}

static __always_inline int policy_entry_allows(const struct policy_key *key)
{
	struct policy_value *v = bpf_map_lookup_elem(&tern_policy, key);

	return v && v->verdict == POLICY_VERDICT_ALLOW;
}

/* policy_allows decides one direction for the local identity local_id,
 * with remote the address of the other end. dport is the destination port
 * (network order; 0 for protocols without ports, whose entries never have
 * port bits). */
static __always_inline int policy_allows(__u8 dir, __u32 local_id, __be32 remote, __u8 proto,
					 __be16 dport)
{
	__u32 cls = policy_class_of(remote);
	const __u32 any = POLICY_CLASS_ANY;
	struct policy_key key = {};

	if (dir == POLICY_DIR_INGRESS && cls == POLICY_CLASS_HOST)
		return 1; /* the node reaches its pods whatever their policy */

	key.prefixlen = POLICY_LOOKUP_PREFIXLEN;
	key.dir = dir;
	key.proto = proto;
	__builtin_memcpy(key.local_id, &local_id, sizeof(key.local_id));
	__builtin_memcpy(key.remote_class, &cls, sizeof(key.remote_class));
	key.dport = dport;
	if (policy_entry_allows(&key))
		return 1;
	__builtin_memcpy(key.remote_class, &any, sizeof(key.remote_class));
	if (policy_entry_allows(&key))
		return 1;
	/* Any-protocol entries have no port bits: the port in the key is
	 * beyond their prefix and does not matter. */
	key.proto = POLICY_PROTO_ANY;
	__builtin_memcpy(key.remote_class, &cls, sizeof(key.remote_class));
	if (policy_entry_allows(&key))
		return 1;
	__builtin_memcpy(key.remote_class, &any, sizeof(key.remote_class));
	return policy_entry_allows(&key);
}

/* policy_event sends the EVENT_POLICY of a decision in direction dir on a
 * packet from saddr to daddr: the local end is the sender for egress, the
 * receiver for ingress. Denials are on by default, allows off
 * (tern_event_config). */
static __always_inline void policy_event(struct __sk_buff *skb, __u8 dir, __u8 verdict,
					 __be32 saddr, __be32 daddr)
{
	const struct event_config *cfg = event_config();
	__be32 local = dir == POLICY_DIR_EGRESS ? saddr : daddr;
	__be32 remote = dir == POLICY_DIR_EGRESS ? daddr : saddr;
	struct ep_policy *ep;
	__u32 local_id = 0;

	if (!cfg)
		return;
	if (verdict == EVENT_VERDICT_DENY ? (cfg->flags & EVENT_F_NO_POLICY_DENY)
					  : !(cfg->flags & EVENT_F_POLICY_ALLOW))
		return;
	if (!event_take_token())
		return; /* over the rate: spare the lookups (a flood of denials) */
	ep = bpf_map_lookup_elem(&tern_ep_policy, &local);
	if (ep)
		local_id = ep->local_id;
	event_write(skb, EVENT_HEAD(EVENT_POLICY, dir, verdict), 0, local_id,
		    policy_class_of(remote));
}

/* policy_ct_key_of fills the flow key of a packet from saddr:sport to
 * daddr:dport and returns whether the sender is the key's hi end. */
static __always_inline int policy_ct_key_of(struct policy_ct_key *key, __be32 saddr, __be32 daddr,
					    __be16 sport, __be16 dport, __u8 proto)
{
	int hi = saddr > daddr || (saddr == daddr && sport > dport);

	key->lo_addr = hi ? daddr : saddr;
	key->hi_addr = hi ? saddr : daddr;
	key->lo_port = hi ? dport : sport;
	key->hi_port = hi ? sport : dport;
	key->proto = proto;
	key->pad[0] = key->pad[1] = key->pad[2] = 0;
	return hi;
}

/* policy_ct_lookup and policy_ct_update pick the map of proto: TCP flows
 * have their own. (Two calls, not a map pointer chosen at run time, so
 * that each call site has one map for the verifier.) */
static __always_inline struct policy_ct_entry *policy_ct_lookup(__u8 proto,
								const struct policy_ct_key *key)
{
	if (proto == IPPROTO_TCP)
		return bpf_map_lookup_elem(&tern_policy_ct, key);
	return bpf_map_lookup_elem(&tern_policy_ct_other, key);
}

static __always_inline long policy_ct_update(__u8 proto, const struct policy_ct_key *key,
					     const struct policy_ct_entry *e)
{
	if (proto == IPPROTO_TCP)
		return bpf_map_update_elem(&tern_policy_ct, key, e, BPF_ANY);
	return bpf_map_update_elem(&tern_policy_ct_other, key, e, BPF_ANY);
}

/* A TCP RST is plausible within this many 64 KiB units (1 MiB) of the last
 * sequence number seen from its sender (from a sender that never sent
 * anything: its ACK, of the peer's last sequence number): about
 * what netfilter's window tracking allows for a connection with an unscaled
 * window of a few hundred KiB, and a 1 in 2,048 chance for a blind guess. */
#define POLICY_CT_RST_WINDOW 16

static __always_inline int policy_seq_near(__u32 seq, __u16 seq_hi)
{
	__s16 d = (__s16)((__u16)(seq >> 16) - seq_hi);

	return d >= -POLICY_CT_RST_WINDOW && d <= POLICY_CT_RST_WINDOW;
}

/* policy_rst_plausible reports whether an RST sent in direction reply of
 * the tracked flow e is within the window of what the flow has shown: its
 * sequence number near the sender's last one or, from a sender that never
 * sent anything (the answer to a SYN), its acknowledgment near the peer's
 * last one, or no ACK at all (see below). An entry that knows neither (written by an older
 * version) accepts it, as before. */
static __always_inline int policy_rst_plausible(const struct policy_ct_entry *e, const struct l4 *l4,
						int reply)
{
	__u16 own = reply ? POLICY_CT_F_SEQ_REPLY : POLICY_CT_F_SEQ_ORIG;
	__u16 peer = reply ? POLICY_CT_F_SEQ_ORIG : POLICY_CT_F_SEQ_REPLY;
	__u16 flags = e->flags;

	if (!(flags & (own | peer)))
		return 1;
	if (flags & own)
		return policy_seq_near(l4->tcp_seq, e->seq_hi[reply ? 1 : 0]);
	/* The sender never sent anything. An RST without ACK answers a
	 * segment that carried one (RFC 9293 3.10.7.1: its sequence number
	 * is that segment's acknowledgment, which the entry does not keep),
	 * e.g. a Service backend refusing a flow moved to it mid-stream:
	 * accepted, it ends a flow its sender never took part in. With an
	 * ACK it must acknowledge near the peer's last sequence number. */
	if (!(l4->tcp_flags & TCP_FLAG_ACK))
		return 1;
	return (flags & peer) && policy_seq_near(l4->tcp_ack, e->seq_hi[reply ? 0 : 1]);
}

/* policy_ct_pod_flows: how many new flows of each kind (TCP; the rest) a
 * local pod may open per POLICY_CT_QUOTA_PERIOD_NS, set before load from
 * the network config's policyFlowsPerPod; 0 (the default): no limit. With
 * a limit of half a conntrack map, a pod spraying flows recycles at most
 * half the entries of the others' idle flows per minute (the LRU evicts
 * what was not used since); but a limit is also a ceiling on a busy pod's
 * legitimate connection rate (65,536 a minute is 1,092 a second: a load
 * generator or a proxy exceeds it), so it is the operator's choice. */
volatile const __u32 policy_ct_pod_flows = 0;

#define POLICY_CT_QUOTA_PERIOD_NS (60 * NSEC_PER_SEC)

/* policy_ct_charge counts a new flow between saddr and daddr against its
 * local pod's share (the sender's when it is a local pod, else the
 * receiver's) and reports whether it was within it. Called once per new
 * flow, never for a tracked one. */
static __always_inline int policy_ct_charge(__be32 saddr, __be32 daddr, __u8 proto, __u64 now)
{
	const __u32 limit = policy_ct_pod_flows;
	struct policy_ct_quota *q;
	__u32 pod = saddr;

	if (!limit)
		return 1;
	if (!bpf_map_lookup_elem(&tern_endpoints, &pod)) {
		pod = daddr;
		if (!bpf_map_lookup_elem(&tern_endpoints, &pod))
			return 1; /* no local pod: nobody's share */
	}
	q = bpf_map_lookup_elem(&tern_policy_ct_quota, &pod);
	if (!q) {
		struct policy_ct_quota nq = { .period_start = now };

		if (proto == IPPROTO_TCP)
			nq.tcp = 1;
		else
			nq.other = 1;
		/* Failing (a race with another CPU's first flow) loses a count. */
		bpf_map_update_elem(&tern_policy_ct_quota, &pod, &nq, BPF_NOEXIST);
		return 1;
	}
	if (now > q->period_start + POLICY_CT_QUOTA_PERIOD_NS) {
		/* Plain stores: racing CPUs both start the period. */
		q->period_start = now;
		q->tcp = 0;
		q->other = 0;
	}
	if (proto == IPPROTO_TCP) {
		if (q->tcp >= limit)
			return 0;
		__sync_fetch_and_add(&q->tcp, 1);
	} else {
		if (q->other >= limit)
			return 0;
		__sync_fetch_and_add(&q->other, 1);
	}
	return 1;
}

/* policy_ct_timeout_ns is how long a flow with flags may stay idle. The
 * timeouts are the NAT's (conntrack.h), set together before load. */
static __always_inline __u64 policy_ct_timeout_ns(__u8 proto, __u16 flags)
{
	const __u16 fins = POLICY_CT_F_FIN_ORIG | POLICY_CT_F_FIN_REPLY;
	__u32 s;

	switch (proto) {
	case IPPROTO_TCP:
		if ((flags & POLICY_CT_F_RST) || (flags & fins) == fins)
			s = ct_timeout_tcp_close; /* closed: only stragglers left */
		else if (!(flags & POLICY_CT_F_SEEN_REPLY))
			s = ct_timeout_tcp_syn;
		else
			s = ct_timeout_tcp;
		break;
	case IPPROTO_ICMP:
		s = ct_timeout_icmp;
		break;
	default:
		s = ct_timeout_udp; /* UDP, SCTP (heartbeats every 30 s) and the rest */
	}
	return (__u64)s * NSEC_PER_SEC;
}

static __always_inline int policy_ct_expired(const struct policy_ct_entry *e, __u64 now, __u8 proto)
{
	return now > e->last_seen && now - e->last_seen > policy_ct_timeout_ns(proto, e->flags);
}

/* policy_tcp_flags maps a packet's FIN/RST to the flags of its direction. */
static __always_inline __u16 policy_tcp_flags(const struct l4 *l4, int reply)
{
	__u16 f = 0;

	if (l4->proto != IPPROTO_TCP)
		return 0;
	if (l4->tcp_flags & TCP_FLAG_FIN)
		f |= reply ? POLICY_CT_F_FIN_REPLY : POLICY_CT_F_FIN_ORIG;
	if (l4->tcp_flags & TCP_FLAG_RST)
		f |= POLICY_CT_F_RST;
	return f;
}

/* policy_icmp_related reports whether an ICMP error (destination
 * unreachable, incl. fragmentation needed, time exceeded, parameter
 * problem) sent to daddr is about a tracked flow: the offending packet it
 * quotes belongs to a flow that passed, and was sent by daddr. Such errors
 * pass like replies (what the iptables datapath's RELATED does), so path
 * MTU discovery works for isolated pods.
 *
 * The quoted source must be the error's destination, as netfilter's
 * conntrack requires (nf_conntrack_inet_error): an error goes back to
 * whoever sent the offending packet. Without that, anyone could reach an
 * isolated pod, or an egress-isolated pod anyone, with an "error" quoting
 * some other tracked flow, and a payload of its choice after the quote. */
static __always_inline int policy_icmp_related(struct __sk_buff *skb, const struct l4 *l4,
					       __be32 daddr, __u64 now)
{
	__u32 in_ip = l4->off + ICMP_ERROR_HDR;
	struct policy_ct_key key;
	struct policy_ct_entry *e;
	__be16 sport, dport;
	struct iphdr inner;
	__u32 in_l4;
	__u8 hdr[8];

	if (l4->icmp_type != ICMP_DEST_UNREACH && l4->icmp_type != ICMP_TIME_EXCEEDED &&
	    l4->icmp_type != ICMP_PARAMETERPROB)
		return 0;
	if (bpf_skb_load_bytes(skb, in_ip, &inner, sizeof(inner)) < 0)
		return 0;
	if (inner.version != 4 || inner.ihl < 5 || (inner.frag_off & bpf_htons(0x1fff)))
		return 0; /* not IPv4, or a later fragment: no ports to find the flow by */
	if (inner.saddr != daddr)
		return 0; /* an error about someone else's packet: forged */
	in_l4 = in_ip + ((__u32)inner.ihl & 0xf) * 4; /* 4 bits: bounded for the verifier */
	if (bpf_skb_load_bytes(skb, in_l4, hdr, sizeof(hdr)) < 0)
		return 0; /* RFC 792 quotes 8 bytes of it: always there when genuine */

	switch (inner.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		__builtin_memcpy(&sport, &hdr[0], sizeof(sport));
		__builtin_memcpy(&dport, &hdr[2], sizeof(dport));
		break;
	case IPPROTO_ICMP:
		if (hdr[0] != ICMP_ECHO && hdr[0] != ICMP_ECHOREPLY)
			return 0;
		__builtin_memcpy(&sport, &hdr[4], sizeof(sport)); /* the identifier, both ways */
		dport = sport;
		break;
	default:
		return 0;
	}
	policy_ct_key_of(&key, inner.saddr, inner.daddr, sport, dport, inner.protocol);
	e = policy_ct_lookup(inner.protocol, &key);
	return e && !policy_ct_expired(e, now, inner.protocol);
}

/* policy_decide is the stateless decision for the first packet of a flow.
 * src and dst are the ends' policy state (zero when none). */
static __always_inline enum policy_result policy_decide(const struct ep_policy *src,
							const struct ep_policy *dst,
							__be32 saddr, __be32 daddr, __u8 proto,
							__be16 dport)
{
	/* A pod reaching itself (through its own Service: the host stack
	 * hairpins it back) cannot be blocked by its own policy. */
	if (saddr == daddr)
		return POLICY_PASS;
	if ((src->flags & EP_POLICY_F_EGRESS) &&
	    !policy_allows(POLICY_DIR_EGRESS, src->local_id, daddr, proto, dport))
		return POLICY_DROP_EGRESS;
	if ((dst->flags & EP_POLICY_F_INGRESS) &&
	    !policy_allows(POLICY_DIR_INGRESS, dst->local_id, saddr, proto, dport))
		return POLICY_DROP_INGRESS;
	return POLICY_PASS;
}

/* policy_ends_of copies the policy state of the packet's ends: src of peer
 * (the sender, see policy_check), dst of daddr; zero when an end has none
 * (0 is never an identity). Copies: the maps may change under us, a
 * decision needs one view. Only the decision of a new flow (and of a
 * fragment without its first) reads them: a packet of a tracked flow
 * passes on its conntrack entry alone, whatever its ends' policy state, so
 * it does not pay for these two lookups. */
static __always_inline void policy_ends_of(struct ep_policy *src, struct ep_policy *dst,
					   __be32 peer, __be32 daddr)
{
	struct ep_policy *ep;

	ep = bpf_map_lookup_elem(&tern_ep_policy, &peer);
	if (ep)
		*src = *ep;
	ep = bpf_map_lookup_elem(&tern_ep_policy, &daddr);
	if (ep)
		*dst = *ep;
}

/* policy_check decides an IPv4 packet from saddr to daddr whose header the
 * caller has parsed (ihl, frag_off and id as in the header). peer is the
 * address that stands for the sender in the decision: saddr, except for a
 * packet the host stack source-NATed (lib/stack.h), where it is the
 * original client's. The flow is tracked under the packet's own tuple.
 * no_stack (NULL: not asked; else the caller's 0) is set when the packet
 * passed on a live entry marked POLICY_CT_F_NO_STACK: the caller need not
 * ask stack_owned about it. */
static __always_inline enum policy_result policy_check(struct __sk_buff *skb, __be32 saddr,
						       __be32 daddr, __be32 peer, __u8 proto,
						       __u8 ihl, __be16 frag_off, __be16 id,
						       int *no_stack)
{
	struct ep_policy src = {}, dst = {};
	struct policy_frag_key fkey = {};
	struct policy_ct_entry *e;
	struct policy_ct_key key;
	__be16 sport = 0, dport = 0, pport = 0;
	struct l4 l4 = {};
	enum policy_result r;
	int hi, reply;
	__u64 now;

	if (parse_l4(skb, proto, ihl, frag_off, &l4) != L4_OK)
		return POLICY_DROP_TRUNCATED;

	fkey.saddr = saddr;
	fkey.daddr = daddr;
	fkey.id = id;
	fkey.proto = proto;
	if (l4.nonfirst) {
		/* No L4 header. The datagram's first fragment passed (and
		 * left its ports) or nothing of it may: an isolated end
		 * cannot have the rest. */
		if (bpf_map_lookup_elem(&tern_policy_frag, &fkey))
			return POLICY_PASS;
		policy_ends_of(&src, &dst, peer, daddr);
		if (src.flags & EP_POLICY_F_EGRESS)
			return POLICY_DROP_EGRESS;
		if (dst.flags & EP_POLICY_F_INGRESS)
			return POLICY_DROP_INGRESS;
		return POLICY_PASS;
	}

	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		sport = l4.sport;
		dport = l4.dport;
		pport = l4.dport;
		break;
	case IPPROTO_ICMP:
		if (l4.icmp_type == ICMP_ECHO || l4.icmp_type == ICMP_ECHOREPLY)
			sport = dport = l4.icmp_id; /* request and reply: one flow */
		break;
	}

	/* The coarse clock (CLOCK_MONOTONIC as of the last tick): timeouts
	 * are seconds, and it costs a fraction of bpf_ktime_get_ns, which
	 * reads the clock source (~25 ns per tracked packet under KVM). */
	now = bpf_ktime_get_coarse_ns();
	hi = policy_ct_key_of(&key, saddr, daddr, sport, dport, proto);
	e = policy_ct_lookup(proto, &key);
	if (e && !policy_ct_expired(e, now, proto)) {
		__u16 flags = e->flags;

		reply = !(flags & POLICY_CT_F_ORIG_HI) != !hi;
		/* A SYN on a closed connection's tuple opens a new one, which
		 * the policy in force now decides. */
		if (!(proto == IPPROTO_TCP &&
		      (l4.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN &&
		      (flags & (POLICY_CT_F_FIN_ORIG | POLICY_CT_F_FIN_REPLY | POLICY_CT_F_RST)))) {
			__u16 add = policy_tcp_flags(&l4, reply) | (reply ? POLICY_CT_F_SEEN_REPLY : 0);

			if (proto == IPPROTO_TCP) {
				__u16 seqf = reply ? POLICY_CT_F_SEQ_REPLY : POLICY_CT_F_SEQ_ORIG;
				__u16 hi16 = l4.tcp_seq >> 16;

				/* A forged RST would end the entry, and the
				 * flow's next packets would be decided anew:
				 * cut by a policy applied since. */
				if ((l4.tcp_flags & TCP_FLAG_RST) && !policy_rst_plausible(e, &l4, reply))
					return POLICY_DROP_RST;
				/* Written when the upper half moves: once
				 * per 64 KiB sent, not per packet. */
				if (!(l4.tcp_flags & TCP_FLAG_RST) &&
				    (!(flags & seqf) || e->seq_hi[reply ? 1 : 0] != hi16)) {
					e->seq_hi[reply ? 1 : 0] = hi16;
					add |= seqf;
				}
			}
			/* Plain stores: a lost race costs a second of
			 * lifetime or a flag the next packet sets again;
			 * writing only on change keeps the cache line shared. */
			if (now > e->last_seen + CT_REFRESH_NS)
				e->last_seen = now;
			if ((flags | add) != flags)
				e->flags = flags | add;
			if (no_stack && (flags & POLICY_CT_F_NO_STACK))
				*no_stack = 1;
			goto pass;
		}
	}

	if (proto == IPPROTO_ICMP && policy_icmp_related(skb, &l4, daddr, now))
		goto pass; /* tracked as part of its flow: no entry of its own */

	policy_ends_of(&src, &dst, peer, daddr);
	r = policy_decide(&src, &dst, peer, daddr, proto, pport);
	if (r != POLICY_PASS)
		return r;
	if (src.flags & EP_POLICY_F_EGRESS)
		policy_event(skb, POLICY_DIR_EGRESS, EVENT_VERDICT_ALLOW, saddr, daddr);
	if (dst.flags & EP_POLICY_F_INGRESS)
		policy_event(skb, POLICY_DIR_INGRESS, EVENT_VERDICT_ALLOW, saddr, daddr);

	if (!policy_ct_charge(saddr, daddr, proto, now))
		return POLICY_DROP_CT_QUOTA;
	{
		struct policy_ct_entry ne = {
			.last_seen = now,
			.flags = (hi ? POLICY_CT_F_ORIG_HI : 0) | policy_tcp_flags(&l4, 0),
		};

		if (proto == IPPROTO_TCP && !(l4.tcp_flags & TCP_FLAG_RST)) {
			ne.seq_hi[0] = l4.tcp_seq >> 16;
			ne.flags |= POLICY_CT_F_SEQ_ORIG;
		}
		/* BPF_ANY replaces an expired or closed entry of the tuple.
		 * Failing (no free LRU node) costs only a check of the next
		 * packet: it passes, it was allowed. */
		if (policy_ct_update(proto, &key, &ne) < 0)
			goto pass;
	}

pass:
	if (frag_off & bpf_htons(IP_MF)) {
		struct policy_frag_ports ports = { .sport = sport, .dport = dport };

		/* The later fragments pass on this. Failing, they are
		 * decided on their own (dropped when an end is isolated). */
		if (bpf_map_update_elem(&tern_policy_frag, &fkey, &ports, BPF_ANY) < 0)
			return POLICY_PASS;
	}
	return POLICY_PASS;
}

/* policy_pass_flow enforces policy on a packet, peer standing for the
 * sender (see policy_check, also for no_stack): it returns 1 when the
 * packet may go on, 0 when it must be dropped (counted by reason). */
static __always_inline int policy_pass_flow(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					    __be32 peer, __u8 proto, __u8 ihl, __be16 frag_off,
					    __be16 id, int *no_stack)
{
	switch (policy_check(skb, saddr, daddr, peer, proto, ihl, frag_off, id, no_stack)) {
	case POLICY_PASS:
		return 1;
	case POLICY_DROP_EGRESS:
		count(METRIC_DROP_POLICY_EGRESS, skb->len);
		policy_event(skb, POLICY_DIR_EGRESS, EVENT_VERDICT_DENY, saddr, daddr);
		return 0;
	case POLICY_DROP_INGRESS:
		count(METRIC_DROP_POLICY_INGRESS, skb->len);
		policy_event(skb, POLICY_DIR_INGRESS, EVENT_VERDICT_DENY, saddr, daddr);
		return 0;
	case POLICY_DROP_RST:
		count(METRIC_DROP_POLICY_RST, skb->len);
		return 0;
	case POLICY_DROP_CT_QUOTA:
		count(METRIC_DROP_POLICY_CT_QUOTA, skb->len);
		return 0;
	default:
		count(METRIC_DROP_TRUNCATED, skb->len);
		return 0;
	}
}

/* policy_pass_as is policy_pass_flow without the conntrack's hint. */
static __always_inline int policy_pass_as(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
					  __be32 peer, __u8 proto, __u8 ihl, __be16 frag_off,
					  __be16 id)
{
	return policy_pass_flow(skb, saddr, daddr, peer, proto, ihl, frag_off, id, NULL);
}

/* policy_pass enforces policy on a packet as its sender sent it. */
static __always_inline int policy_pass(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __u8 proto,
				       __u8 ihl, __be16 frag_off, __be16 id)
{
	return policy_pass_as(skb, saddr, daddr, saddr, proto, ihl, frag_off, id);
}

#endif /* TERN_POLICY_H */
