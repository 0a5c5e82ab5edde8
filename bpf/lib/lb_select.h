/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* lb_select: the backend choice of Tern's Service load balancer, shared by
 * the tc programs (lib/lb.h: a pod's new flow) and the socket programs
 * (sock_lb.c: a host process's connect or sendmsg), so both read the same
 * frontends, slots and affinity entries and choose alike. It needs no
 * packet: the caller brings the hash (tc: the flow hash; sockets: a hash of
 * the socket cookie). */
#ifndef TERN_LB_SELECT_H
#define TERN_LB_SELECT_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "../include/tern_types.h"
#include "maps.h"

#ifndef NSEC_PER_SEC
#define NSEC_PER_SEC 1000000000ULL
#endif

/* lb_select chooses the backend of a new flow of svc: the client's
 * affinity backend while it is fresh and still in its slot, else slot
 * (hash mod count). na is scratch for a new affinity entry (it does not fit
 * the callers' stacks). Returns 0 with *b set, -1 when the frontend has no
 * backend. */
static __always_inline int lb_select(const struct lb_svc *svc, __be32 client, __u64 now, __u32 hash,
				     struct lb_backend *b, struct lb_affinity *na)
{
	struct lb_affinity_key ak = { .client = client, .id = svc->id };
	struct lb_slot_key sk = { .id = svc->id };
	struct lb_affinity *a = NULL;
	struct lb_backend *slot;

	if (svc->count == 0)
		return -1;
	if (svc->affinity_timeout) {
		a = bpf_map_lookup_elem(&tern_lb_affinity, &ak);
		/* (a stamp up to a tick ahead of now: written with the fine
		 * clock, read with the coarse one) */
		if (a && (now <= a->last_seen ||
			  now - a->last_seen <= (__u64)svc->affinity_timeout * NSEC_PER_SEC)) {
			/* Still a backend of the frontend? Scanning the slots
			 * would cost a loop; affinity is to the backend, so a
			 * backend that left is detected by its address not
			 * being in any slot: we check the slot it was in when
			 * chosen (kept in pad), a move re-balances. */
			sk.slot = a->pad;
			slot = bpf_map_lookup_elem(&tern_lb_backends, &sk);
			if (sk.slot < svc->count && slot && slot->addr == a->addr && slot->port == a->port) {
				a->last_seen = now;
				*b = *slot;
				return 0;
			}
		}
	}
	sk.slot = hash % svc->count;
	slot = bpf_map_lookup_elem(&tern_lb_backends, &sk);
	if (!slot)
		return -1;
	*b = *slot;
	if (svc->affinity_timeout) {
		__builtin_memset(na, 0, sizeof(*na));
		na->last_seen = now;
		na->addr = slot->addr;
		na->port = slot->port;
		na->pad = (__u16)sk.slot;
		bpf_map_update_elem(&tern_lb_affinity, &ak, na, BPF_ANY);
	}
	return 0;
}

#endif
