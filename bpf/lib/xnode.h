/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Traffic of another node's pod for a pod of this node, as tern_from_uplink
 * (native routing) and tern_from_tunnel (VXLAN) receive it.
 *
 * Services "kube-proxy" with a backend on another node: node1's stack
 * DNATs the client pod's ClusterIP packet to the remote backend, which
 * answers the client pod's own address. That answer reaches node1 like any
 * pod-to-pod packet, and redirected into the client it would skip the only
 * thing that can translate it back (node1's conntrack): the client would
 * get it from the backend's address and drop it. So tern_to_uplink (at the
 * uplink's egress, and at the VXLAN device's in VXLAN mode) records such
 * flows in tern_stack_ct as they leave, and their answers go to the stack
 * here (lib/stack.h's stack_owned, the same map tern_from_pod uses for
 * local backends). */
#ifndef TERN_XNODE_H
#define TERN_XNODE_H

#include "stack.h"
#include "remote.h"
#include "lb.h"

/* xnode_stack_reply reports (and counts) an answer to a flow the host
 * stack DNATed to another node's pod (recorded by tern_to_uplink). to_host:
 * the frame is made the host's first (decapsulated frames carry the
 * sender's gateway MAC, which the stack would take for another host's).
 * Out of line: stack_owned's key and L4 header stay out of its callers'
 * frames. */
static __noinline int xnode_stack_reply(struct __sk_buff *skb, const struct lb_pkt *p, int to_host)
{
	if (!p)
		return 0;
	if (!stack_owned(skb, p->saddr, p->daddr, p->proto, p->ihl, p->frag_off))
		return 0;
	if (to_host && bpf_skb_change_type(skb, 0 /* PACKET_HOST */) < 0)
		return 0;
	count(METRIC_REMOTE_STACK_REPLY, skb->len);
	return 1;
}

/* xnode_policy decides p, from another node's pod, with the local pod's
 * ingress policy (the sender's egress was decided on its own node).
 * Returns XNODE_DROP, XNODE_PASS, or XNODE_PASS_NO_STACK when the flow's
 * conntrack entry says the host stack has no part in it
 * (POLICY_CT_F_NO_STACK). Out of line, and not calling xnode_stack_reply
 * itself: the verifier bounds a frame plus its deepest chain of callees to
 * 512 bytes, and policy's locals and stack_owned's would add up. */
#define XNODE_DROP 0
#define XNODE_PASS 1
#define XNODE_PASS_NO_STACK 2
static __noinline int xnode_policy(struct __sk_buff *skb, const struct lb_pkt *p)
{
	int no_stack = 0;

	if (!p)
		return XNODE_DROP;
	if (!policy_pass_flow(skb, p->saddr, p->daddr, p->saddr, p->proto, p->ihl, p->frag_off,
			      p->id, &no_stack))
		return XNODE_DROP;
	return no_stack ? XNODE_PASS_NO_STACK : XNODE_PASS;
}

/* xnode_deliver hands p, from another node's pod, to the local pod ep:
 * policy (xnode_policy); then an answer to a flow the host stack DNATed
 * (xnode_stack_reply) goes to the stack, anything else into the pod with
 * bpf_redirect_peer. Policy comes first so that the flow's conntrack entry
 * can spare most packets the tern_stack_ct lookup. The stack's answers meet
 * the same decision as when the lookup came first: they pass on the entry
 * tern_to_uplink made for their flow (without one, tern_to_pod would have
 * decided them as a new flow too). Returns a tc verdict. */
static __always_inline int xnode_deliver(struct __sk_buff *skb, const struct endpoint *ep,
					 const struct lb_pkt *p, int to_host)
{
	int v = xnode_policy(skb, p);

	if (v == XNODE_DROP)
		return TC_ACT_SHOT;
	if (v != XNODE_PASS_NO_STACK && xnode_stack_reply(skb, p, to_host))
		return TERN_PASS;
	return deliver_to_endpoint(skb, ep, p->ttl, METRIC_FROM_REMOTE);
}

#endif /* TERN_XNODE_H */
