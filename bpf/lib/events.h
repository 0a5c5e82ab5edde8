/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Datapath events: drops, NetworkPolicy decisions and (off by default)
 * forwarding traces, written to the tern_events ring buffer for `ternctl
 * monitor`.
 *
 * Drops and traces are sent from count() (metrics.h), the one place every
 * outcome is counted, so a new drop path has its event without a second
 * edit: a metric in EVENT_DROP_MASK is a drop, any other one a trace.
 * Policy denials are sent by policy.h with the identities that decided
 * them, instead of the plain drop of their metric.
 *
 * Cost: what a packet pays with its kind of event off is one lookup of
 * tern_event_config (an array: inlined by the JIT) and a flag test. With it
 * on, a token from a per-CPU bucket on the coarse clock
 * (tern_event_limiter; rate and burst from tern_event_config), then, for
 * the events within the rate, the packet's headers and a
 * bpf_ringbuf_output. Both are functions of their own (not inlined: one
 * copy for every call site). Figures: BenchmarkEvents, README. */
#ifndef TERN_EVENTS_H
#define TERN_EVENTS_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/tern_types.h"
#include "maps.h"

#define EVENT_DEFAULT_RATE 1000 /* events per second per CPU */
#define EVENT_DEFAULT_BURST 100
#define EVENT_NSEC_PER_SEC 1000000000ULL

#define EVENT_BIT(m) (1ULL << (m))
/* The drop reasons of enum metric. A new drop reason goes here too
 * (TestEventDropMask holds this to the "drop_" names in Go). */
#define EVENT_DROP_MASK                                                               \
	(EVENT_BIT(METRIC_DROP_TRUNCATED) | EVENT_BIT(METRIC_DROP_SPOOFED) |           \
	 EVENT_BIT(METRIC_DROP_REDIRECT) | EVENT_BIT(METRIC_DROP_NAT_NO_PORT) |        \
	 EVENT_BIT(METRIC_DROP_NAT_MAP_FULL) | EVENT_BIT(METRIC_DROP_NAT_UNSUPPORTED) | \
	 EVENT_BIT(METRIC_DROP_POLICY_INGRESS) | EVENT_BIT(METRIC_DROP_POLICY_EGRESS) | \
	 EVENT_BIT(METRIC_DROP_NON_IPV4) | EVENT_BIT(METRIC_DROP_ARP_SPOOFED) |         \
	 EVENT_BIT(METRIC_DROP_LOOPBACK) | EVENT_BIT(METRIC_DROP_REV_TTL) |             \
	 EVENT_BIT(METRIC_DROP_NAT_NO_ROUTE) | EVENT_BIT(METRIC_DROP_NAT_TOO_BIG) |     \
	 EVENT_BIT(METRIC_DROP_NAT_ICMP) | EVENT_BIT(METRIC_DROP_SVC_NO_DNAT) |         \
	 EVENT_BIT(METRIC_DROP_TUNNEL_FORGED) | EVENT_BIT(METRIC_DROP_TUNNEL_NO_POD) |       \
	 EVENT_BIT(METRIC_DROP_POLICY_RST) | EVENT_BIT(METRIC_DROP_POLICY_CT_QUOTA) |  \
	 EVENT_BIT(METRIC_DROP_LB_NO_LOCAL) | EVENT_BIT(METRIC_DROP_LB))
/* Drops that policy.h reports as EVENT_POLICY denials. */
#define EVENT_POLICY_DROP_MASK \
	(EVENT_BIT(METRIC_DROP_POLICY_INGRESS) | EVENT_BIT(METRIC_DROP_POLICY_EGRESS))

/* For Go: which metrics are drops (read from BTF, never by programs). */
const volatile __u64 tern_btf_event_drop_mask = EVENT_DROP_MASK;

static __always_inline const struct event_config *event_config(void)
{
	__u32 key = 0;

	return bpf_map_lookup_elem(&tern_event_config, &key);
}

/* event_admit takes a token from this CPU's bucket, or counts the event as
 * suppressed. */
static __always_inline int event_admit(struct event_limiter *l, const struct event_config *cfg)
{
	__u64 rate = cfg->rate ? cfg->rate : EVENT_DEFAULT_RATE;
	__u64 burst = cfg->burst ? cfg->burst : EVENT_DEFAULT_BURST;
	__u64 cost = EVENT_NSEC_PER_SEC / rate;
	/* The coarse clock (as of the last tick): it refills the bucket a
	 * few milliseconds' worth at a time, which the burst absorbs, and
	 * costs a fraction of bpf_ktime_get_ns, which matters under a flood
	 * of drops where nearly every event is suppressed. */
	__u64 now = bpf_ktime_get_coarse_ns();
	__u64 credit = l->credit_ns + (now - l->last_ns); /* a fresh bucket starts full */

	if (credit > cost * burst)
		credit = cost * burst;
	l->last_ns = now;
	if (credit < cost) {
		l->credit_ns = credit;
		l->suppressed++;
		return 0;
	}
	l->credit_ns = credit - cost;
	return 1;
}

/* event_fill_packet copies the packet's addresses, protocol and ports into
 * ev, as far as the packet has them (a drop may be of a truncated one). */
static __always_inline void event_fill_packet(struct __sk_buff *skb, struct event *ev)
{
	/* Read straight into the event (in the ring buffer), not through
	 * copies on the stack: see event_write. */
	__u8 vihl, icmp_type;
	__be16 frag_off;
	__u32 off;

	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &ev->eth_proto,
			       sizeof(ev->eth_proto)) < 0 ||
	    ev->eth_proto != bpf_htons(ETH_P_IP))
		return;
	off = sizeof(struct ethhdr);
	if (bpf_skb_load_bytes(skb, off, &vihl, 1) < 0 || (vihl >> 4) != 4 ||
	    bpf_skb_load_bytes(skb, off + offsetof(struct iphdr, frag_off), &frag_off, sizeof(frag_off)) < 0 ||
	    bpf_skb_load_bytes(skb, off + offsetof(struct iphdr, protocol), &ev->proto, 1) < 0 ||
	    bpf_skb_load_bytes(skb, off + offsetof(struct iphdr, saddr), &ev->saddr, 4) < 0 ||
	    bpf_skb_load_bytes(skb, off + offsetof(struct iphdr, daddr), &ev->daddr, 4) < 0)
		return;
	if ((vihl & 0xf) < 5 || (frag_off & bpf_htons(0x1fff)))
		return; /* malformed, or a later fragment: no ports */
	off += ((__u32)vihl & 0xf) * 4;
	switch (ev->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		if (bpf_skb_load_bytes(skb, off, &ev->sport, 2) < 0 ||
		    bpf_skb_load_bytes(skb, off + 2, &ev->dport, 2) < 0)
			ev->sport = ev->dport = 0;
		break;
	case IPPROTO_ICMP:
		if (bpf_skb_load_bytes(skb, off, &icmp_type, 1) == 0 &&
		    (icmp_type == 8 || icmp_type == 0) && /* echo request, echo reply */
		    bpf_skb_load_bytes(skb, off + 4, &ev->sport, 2) == 0)
			ev->dport = ev->sport;
		break;
	}
}

/* event_take_token reports whether this CPU may send an event now (the
 * token bucket of tern_event_limiter), counting it as suppressed if not.
 * A function of its own, like event_write: one copy for all call sites. */
static __attribute__((noinline)) int event_take_token(void)
{
	const struct event_config *cfg = event_config();
	struct event_limiter *l;
	__u32 key = 0;

	l = bpf_map_lookup_elem(&tern_event_limiter, &key);
	if (!cfg || !l)
		return 0;
	return event_admit(l, cfg);
}

/* The layout of an event in BTF, for Go (bpf2go -type event): programs
 * write events in place in the ring buffer, so no function names the type
 * otherwise. Never read. */
const volatile struct event tern_btf_event_layout;

/* EVENT_HEAD packs an event's kind, direction and verdict for event_write. */
#define EVENT_HEAD(type, dir, verdict) \
	((__u32)(type) | (__u32)(dir) << 8 | (__u32)(verdict) << 16)

/* event_write writes an event of head (EVENT_HEAD), reason, and the
 * identities of a policy decision, completed from the packet, to the ring
 * buffer, counting it as sent or lost. Call it after event_take_token. The
 * event is built in place in the ring buffer: no struct event sits on any
 * stack, whose frames (tern_from_pod's plus its deepest chain of callees)
 * the verifier bounds to 512 bytes. */
static __attribute__((noinline)) int event_write(struct __sk_buff *skb, __u32 head, __u32 reason,
						 __u32 local_id, __u32 remote_class)
{
	struct event_limiter *l;
	struct event *ev;
	__u32 key = 0;

	l = bpf_map_lookup_elem(&tern_event_limiter, &key);
	if (!l)
		return 0;
	ev = bpf_ringbuf_reserve(&tern_events, sizeof(*ev), 0);
	if (!ev) {
		l->lost++;
		return 0;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->type = head & 0xff;
	ev->dir = (head >> 8) & 0xff;
	ev->verdict = (head >> 16) & 0xff;
	ev->reason = reason;
	ev->local_id = local_id;
	ev->remote_class = remote_class;
	event_fill_packet(skb, ev);
	ev->ts_ns = bpf_ktime_get_ns();
	bpf_ringbuf_submit(ev, 0);
	l->sent++;
	return 0;
}

/* event_metric sends the event of a counted outcome m: a drop, unless
 * switched off, or a trace, when switched on, when this CPU's rate
 * allows. */
static __always_inline void event_metric(struct __sk_buff *skb, enum metric m)
{
	const struct event_config *cfg;
	__u8 type;

	if (EVENT_POLICY_DROP_MASK & EVENT_BIT(m))
		return; /* policy.h sends these, with the identities */
	cfg = event_config();
	if (!cfg)
		return;
	if (EVENT_DROP_MASK & EVENT_BIT(m)) {
		if (cfg->flags & EVENT_F_NO_DROP)
			return;
		type = EVENT_DROP;
	} else {
		if (!(cfg->flags & EVENT_F_TRACE))
			return;
		type = EVENT_TRACE;
	}
	if (event_take_token())
		event_write(skb, EVENT_HEAD(type, 0, 0), m, 0, 0);
}

#endif /* TERN_EVENTS_H */
