/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef TERN_METRICS_H
#define TERN_METRICS_H

#include "maps.h"
#include "events.h"

/* count_metric adds one packet of len bytes to the per-CPU counter m. */
static __always_inline void count_metric(enum metric m, __u32 len)
{
	__u32 key = m;
	struct metric_value *v = bpf_map_lookup_elem(&tern_metrics, &key);

	if (!v)
		return; /* cannot happen for an in-range array index */
	v->packets++;
	v->bytes += len;
}

/* count counts the packet under m and sends its event (events.h): a drop,
 * or a trace when traces are on. Every outcome is counted here, so every
 * one has its event. A macro so that call sites stay count(m, skb->len):
 * it takes the packet from the caller's `skb`. Where no `skb` is in scope
 * (a per-flow count in a helper, a timer), `skb` is tern_no_packet below,
 * of another type, and the event is left out at compile time. */
static const unsigned long skb __attribute__((unused)) = 0; /* tern_no_packet: shadowed by every real skb */

#define count(m, len)                                                                         \
	do {                                                                                  \
		count_metric((m), (len));                                                     \
		__builtin_choose_expr(__builtin_types_compatible_p(__typeof__(skb), struct __sk_buff *), \
				      event_metric((struct __sk_buff *)(skb), (m)), (void)0);          \
	} while (0)

#endif /* TERN_METRICS_H */
