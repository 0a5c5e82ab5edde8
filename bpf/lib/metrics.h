/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef TERN_METRICS_H
#define TERN_METRICS_H

#include "maps.h"

/* count adds one packet of len bytes to the per-CPU counter m. */
static __always_inline void count(enum metric m, __u32 len)
{
	__u32 key = m;
	struct metric_value *v = bpf_map_lookup_elem(&tern_metrics, &key);

	if (!v)
		return; /* cannot happen for an in-range array index */
	v->packets++;
	v->bytes += len;
}

#endif /* TERN_METRICS_H */
