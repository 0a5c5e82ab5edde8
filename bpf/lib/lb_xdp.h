/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* NodePort acceleration (network config nodePortAcceleration): the XDP
 * program on the uplink (xdp_uplink.c) translates a packet from outside
 * the node to a NodePort / external / load-balancer IP frontend whose
 * backend runs on this node, before the kernel allocates an skb for it,
 * and passes it on with LB_XDP_MARK in the XDP metadata in front of the
 * frame. tern_from_uplink, next in line at tc ingress, sees the mark and
 * skips the Service lookup: it decides the backend's ingress policy on the
 * translated packet and delivers it (lb_xdp_translated below), exactly as
 * its own translation (lb_uplink_frontend) would have.
 *
 * Both use one flow table: XDP pins a new flow in tern_lb_ct with the
 * entries lb_uplink_frontend writes (forward, and the reply entry the
 * backend's answer is reverse-translated by), so a flow's packets that
 * XDP leaves to tc (none normally; all of them when XDP is detached
 * mid-flow) reach the same backend, and the answers go back the same way. */
#ifndef TERN_LB_XDP_H
#define TERN_LB_XDP_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "../include/tern_types.h"
#include "maps.h"
#include "metrics.h"
#include "verdict.h"
#include "forward.h"
#include "policy.h"
#include "lb.h"

/* LB_XDP_MARK: the metadata word of a frame xdp_uplink.c translated. Only
 * an XDP program of the receiving interface can put metadata in front of a
 * frame, so a sender cannot forge it. */
#define LB_XDP_MARK 0x7e4e0d47

/* lb_xdp_translated: a frame translated by the XDP program (LB_XDP_MARK)
 * gets the backend's ingress policy, decided on the client's address, and
 * is delivered into the backend. LB_CONTINUE: not such a frame. */
__noinline int lb_xdp_translated(struct __sk_buff *skb, struct lb_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *meta = (void *)(long)skb->data_meta;
	struct endpoint *ep;

	if (!p)
		return TC_ACT_SHOT;
	if (meta + sizeof(__u32) > data || *(__u32 *)meta != LB_XDP_MARK)
		return LB_CONTINUE;
	ep = bpf_map_lookup_elem(&tern_endpoints, &p->daddr);
	if (!ep)
		return LB_CONTINUE; /* the backend left meanwhile: the stack refuses it */
	if (!policy_pass(skb, p->saddr, p->daddr, p->proto, p->ihl, p->frag_off, p->id))
		return TC_ACT_SHOT;
	return deliver_to_endpoint(skb, ep, p->ttl, METRIC_REDIRECT_PEER);
}

#endif /* TERN_LB_XDP_H */
