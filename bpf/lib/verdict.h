/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The verdict for "not stopped here". */
#ifndef TERN_VERDICT_H
#define TERN_VERDICT_H

#include <linux/pkt_cls.h>

/* TERN_PASS lets a packet go on: to the next program on the hook, and to
 * the stack when there is none. It is TC_ACT_UNSPEC, which TCX calls
 * TCX_NEXT, and which a direct-action cls_bpf filter in clsact returns to
 * let the next filter run (and, after the last, the stack). TC_ACT_OK
 * instead ends the chain: a program attached after Tern (a monitor, another
 * policy engine, the node's own tc rules, or on TCX the clsact filters that
 * run after the TCX chain) would never see what Tern passes. Drops
 * (TC_ACT_SHOT) and redirects stay final. */
#define TERN_PASS TC_ACT_UNSPEC

/* TERN_TC_INDEX_DECIDED, a bit of skb->tc_index (a field no other user of
 * this kernel's tc reads: its classifier and qdisc, tcindex and dsmark, are
 * gone): set on a packet for another node's pod that a Tern program sends
 * out of the uplink itself (remote_forward, lib/remote.h), having decided
 * everything tern_to_uplink would (it answers for the stack's packets):
 * tern_to_uplink passes it at once and takes the bit off, so it goes no
 * further. */
#define TERN_TC_INDEX_DECIDED 0x8000

#endif /* TERN_VERDICT_H */
