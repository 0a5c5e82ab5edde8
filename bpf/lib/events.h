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
	 EVENT_BIT(METRIC_DROP_NAT_ICMP) | EVENT_BIT(METRIC_DROP_SVC_NO_DNAT) |          \
	 EVENT_BIT(METRIC_DROP_POLICY_RST) | EVENT_BIT(METRIC_DROP_POLICY_CT_QUOTA))
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
	struct iphdr ip;
	__u8 l4[8];
	__u32 off;

	ev->ifindex = skb->ifindex;
	ev->len = skb->len;
	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &ev->eth_proto,
			       sizeof(ev->eth_proto)) < 0 ||
	    ev->eth_proto != bpf_htons(ETH_P_IP))
		return;
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip, sizeof(ip)) < 0 || ip.version != 4)
		return;
	ev->saddr = ip.saddr;
	ev->daddr = ip.daddr;
	ev->proto = ip.protocol;
	if (ip.ihl < 5 || (ip.frag_off & bpf_htons(0x1fff)))
		return; /* malformed, or a later fragment: no ports */
	off = sizeof(struct ethhdr) + ((__u32)ip.ihl & 0xf) * 4;
	if (bpf_skb_load_bytes(skb, off, l4, sizeof(l4)) < 0)
		return;
	switch (ip.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		__builtin_memcpy(&ev->sport, &l4[0], sizeof(ev->sport));
		__builtin_memcpy(&ev->dport, &l4[2], sizeof(ev->dport));
		break;
	case IPPROTO_ICMP:
		if (l4[0] == 8 || l4[0] == 0) { /* echo request, echo reply */
			__builtin_memcpy(&ev->sport, &l4[4], sizeof(ev->sport));
			ev->dport = ev->sport;
		}
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

/* event_write completes ev from the packet and writes it to the ring
 * buffer, counting it as sent or lost. Call it after event_take_token. */
static __attribute__((noinline)) int event_write(struct __sk_buff *skb, struct event *ev)
{
	struct event_limiter *l;
	__u32 key = 0;

	l = bpf_map_lookup_elem(&tern_event_limiter, &key);
	if (!l || !ev)
		return 0;
	event_fill_packet(skb, ev);
	ev->ts_ns = bpf_ktime_get_ns();
	if (bpf_ringbuf_output(&tern_events, ev, sizeof(*ev), 0) < 0)
		l->lost++;
	else
		l->sent++;
	return 0;
}

/* event_send sends ev, when this CPU's rate allows. */
static __always_inline void event_send(struct __sk_buff *skb, struct event *ev)
{
	if (event_take_token())
		event_write(skb, ev);
}

/* event_metric sends the event of a counted outcome m: a drop, unless
 * switched off, or a trace, when switched on. */
static __always_inline void event_metric(struct __sk_buff *skb, enum metric m)
{
	const struct event_config *cfg;
	struct event ev = {};

	if (EVENT_POLICY_DROP_MASK & EVENT_BIT(m))
		return; /* policy.h sends these, with the identities */
	cfg = event_config();
	if (!cfg)
		return;
	if (EVENT_DROP_MASK & EVENT_BIT(m)) {
		if (cfg->flags & EVENT_F_NO_DROP)
			return;
		ev.type = EVENT_DROP;
	} else {
		if (!(cfg->flags & EVENT_F_TRACE))
			return;
		ev.type = EVENT_TRACE;
	}
	ev.reason = m;
	event_send(skb, &ev);
}

#endif /* TERN_EVENTS_H */
