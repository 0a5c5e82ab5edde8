/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Coexistence with the host stack's NAT (services: "kube-proxy"): kube-proxy,
 * hostPort rules and the like translate in netfilter, which only sees what
 * the programs leave to the host stack. Three rules keep their translations
 * whole:
 *
 *  1. A pod's traffic to a Service CIDR goes to the host stack untouched
 *     (no redirect, no SNAT, no policy: the packet still carries the
 *     ClusterIP, so policy waits for the translated packet).
 *  2. What the stack delivers into a pod is decided at tern_to_pod on the
 *     translated packet, with the stack's conntrack entry telling who the
 *     client really was (the source before the stack's SNAT) and, for a
 *     reply, which flow it answers (the tuple before the stack's reverse
 *     NAT).
 *  3. A pod's answers to a flow the stack delivered go back through the
 *     stack (tern_stack_ct), whose conntrack reverses its NAT, instead of
 *     being redirected into a local client or masqueraded by snat_out.
 *
 * Why the stack's conntrack is read at tern_to_pod and a map of our own is
 * kept for rule 3 (rather than bpf_skb_ct_lookup at tern_from_pod):
 *  - at tc egress of the pod's veth the packet still carries the conntrack
 *    entry netfilter attached (skb->_nfct, read with bpf_cast_to_kern_ctx
 *    and CO-RE): its direction and both tuples cost a few loads, no lookup,
 *    and they are the only place the pre-NAT client and the pre-NAT tuple
 *    of a reply are known;
 *  - rule 3 must only hold for flows Tern allowed: the stack confirms its
 *    conntrack entry in POSTROUTING, before tern_to_pod can drop the packet,
 *    so "the stack knows the tuple" is also true of a denied SYN. The
 *    tern_stack_ct entry is written only after policy passed the packet;
 *  - the fast path (pod to pod on the node, SNAT) then pays one hash lookup
 *    in a map of our own, not a conntrack lookup with reference counting
 *    on every packet. */
#ifndef TERN_STACK_H
#define TERN_STACK_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "../include/tern_types.h"
#include "maps.h"
#include "metrics.h"
#include "conntrack.h"
#include "nat.h"
#include "policy.h"

/* Kernel types, as far as they are read here; CO-RE relocates the fields
 * against the running kernel's BTF (names match, layout need not). */
struct sk_buff___tern {
	unsigned long _nfct;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple___tern {
	struct {
		union {
			__be32 ip;
		} u3;
		union {
			__be16 all;
		} u;
	} src;
	struct {
		union {
			__be32 ip;
		} u3;
		union {
			__be16 all;
		} u;
		__u8 protonum;
	} dst;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash___tern {
	struct nf_conntrack_tuple___tern tuple;
} __attribute__((preserve_access_index));

struct nf_conn___tern {
	struct nf_conntrack_tuple_hash___tern tuplehash[2];
} __attribute__((preserve_access_index));

/* Weak: a kernel without it (before 6.3) loads the programs all the same,
 * with the conntrack reads below switched off (stack_kern_skb). */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

/* stack_kern_skb is the kernel's sk_buff behind skb, or NULL when this
 * kernel cannot say (no bpf_cast_to_kern_ctx, or no conntrack: no _nfct
 * field). Both checks are resolved at load time. */
static __always_inline struct sk_buff___tern *stack_kern_skb(struct __sk_buff *skb)
{
	struct sk_buff___tern *kskb;

	if (!bpf_cast_to_kern_ctx)
		return NULL;
	kskb = bpf_cast_to_kern_ctx(skb);
	if (!bpf_core_field_exists(kskb->_nfct))
		return NULL;
	return kskb;
}

/* enum ip_conntrack_info (include/uapi/linux/netfilter/nf_conntrack_common.h) */
#define STACK_CT_ESTABLISHED 0
#define STACK_CT_RELATED 1
#define STACK_CT_NEW 2
#define STACK_CT_ESTABLISHED_REPLY 3
#define STACK_CT_RELATED_REPLY 4
#define STACK_CT_INFO_MASK 7UL

/* stack_ct: what the packet's host conntrack entry says. */
struct stack_ct {
	__u8 tracked; /* the packet carries a conntrack entry (not related, not untracked) */
	__u8 reply;   /* it travels in the entry's reply direction */
	__be32 orig_src; /* original direction: the client before any SNAT */
	/* reply direction: the flow as the answering end sent it, before the
	 * stack's reverse NAT (src = the answering end, dst = us) */
	__be32 rsrc, rdst;
	__be16 rsport, rdport;
	__u8 rproto; /* the flow's protocol (an ICMP error's is the flow it is about) */
};

/* stack_ct_of reads the host conntrack entry netfilter attached to skb. It
 * is there at tc egress (the stack's POSTROUTING ran), never at tc ingress
 * of a pod's veth, nor in BPF_PROG_TEST_RUN. */
static __always_inline void stack_ct_of(struct __sk_buff *skb, struct stack_ct *ct)
{
	struct sk_buff___tern *kskb = stack_kern_skb(skb);
	struct nf_conn___tern *c;
	unsigned long nfct;
	__u32 info;

	ct->tracked = 0;
	if (!kskb)
		return;
	nfct = kskb->_nfct;
	info = nfct & STACK_CT_INFO_MASK;
	c = (struct nf_conn___tern *)(nfct & ~STACK_CT_INFO_MASK);
	if (!c || (info != STACK_CT_ESTABLISHED && info != STACK_CT_NEW &&
		   info != STACK_CT_ESTABLISHED_REPLY && info != STACK_CT_RELATED_REPLY))
		return; /* untracked, or an ICMP error travelling the flow's way */
	/* An ICMP error toward the flow's originator carries the flow's own
	 * entry (RELATED_REPLY): it answers that flow like a reply does. */
	ct->reply = info == STACK_CT_ESTABLISHED_REPLY || info == STACK_CT_RELATED_REPLY;
	if (ct->reply) {
		if (bpf_core_read(&ct->rsrc, sizeof(ct->rsrc), &c->tuplehash[1].tuple.src.u3.ip) < 0 ||
		    bpf_core_read(&ct->rdst, sizeof(ct->rdst), &c->tuplehash[1].tuple.dst.u3.ip) < 0 ||
		    bpf_core_read(&ct->rsport, sizeof(ct->rsport), &c->tuplehash[1].tuple.src.u.all) < 0 ||
		    bpf_core_read(&ct->rdport, sizeof(ct->rdport), &c->tuplehash[1].tuple.dst.u.all) < 0 ||
		    bpf_core_read(&ct->rproto, sizeof(ct->rproto), &c->tuplehash[1].tuple.dst.protonum) < 0)
			return;
	} else if (bpf_core_read(&ct->orig_src, sizeof(ct->orig_src),
				 &c->tuplehash[0].tuple.src.u3.ip) < 0) {
		return;
	}
	ct->tracked = 1;
}

/* stack_dnat_of reports whether the packet, in its flow's original
 * direction, was DNATed by the host stack, and reads its original client
 * (orig_src, before any SNAT). 0 without such a conntrack entry. */
static __always_inline int stack_dnat_of(struct __sk_buff *skb, __be32 *orig_src)
{
	struct sk_buff___tern *kskb = stack_kern_skb(skb);
	struct nf_conn___tern *c;
	__be32 orig_dst, rsrc;
	unsigned long nfct;
	__u32 info;

	if (!kskb)
		return 0;
	nfct = kskb->_nfct;
	info = nfct & STACK_CT_INFO_MASK;
	c = (struct nf_conn___tern *)(nfct & ~STACK_CT_INFO_MASK);
	if (!c || (info != STACK_CT_ESTABLISHED && info != STACK_CT_NEW))
		return 0;
	if (bpf_core_read(orig_src, sizeof(*orig_src), &c->tuplehash[0].tuple.src.u3.ip) < 0 ||
	    bpf_core_read(&orig_dst, sizeof(orig_dst), &c->tuplehash[0].tuple.dst.u3.ip) < 0 ||
	    bpf_core_read(&rsrc, sizeof(rsrc), &c->tuplehash[1].tuple.src.u3.ip) < 0)
		return 0;
	return orig_dst != rsrc;
}

/* to_service_cidr reports whether daddr is in a Service CIDR. */
static __always_inline int to_service_cidr(__be32 daddr)
{
	struct lpm_v4_key key = { .prefixlen = 32, .addr = daddr };

	return bpf_map_lookup_elem(&tern_service_cidrs, &key) != NULL;
}

/* flow_ports are the ports a flow is keyed by (policy.h's convention: ICMP
 * echo's identifier in both, 0 for protocols without ports). */
static __always_inline void flow_ports(const struct l4 *l4, __be16 *sport, __be16 *dport)
{
	*sport = *dport = 0;
	switch (l4->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		*sport = l4->sport;
		*dport = l4->dport;
		break;
	case IPPROTO_ICMP:
		if (l4->icmp_type == ICMP_ECHO || l4->icmp_type == ICMP_ECHOREPLY)
			*sport = *dport = l4->icmp_id;
		break;
	}
}

/* stack_error_owned reports whether an ICMP error (unreachable, time
 * exceeded, parameter problem) a pod sends is about a flow the host stack
 * delivered into it: the packet it quotes belongs to a tern_stack_ct flow.
 * Such an error goes back through the stack too, which translates the
 * quoted packet back (a client connected to a ClusterIP then learns of it,
 * e.g. UDP port unreachable). No refresh: an error is not activity. */
static __always_inline int stack_error_owned(struct __sk_buff *skb, const struct l4 *l4)
{
	__u32 in_ip = l4->off + ICMP_ERROR_HDR;
	struct policy_ct_key key;
	struct policy_ct_entry *e;
	__be16 sport, dport;
	struct iphdr inner;
	__u32 in_l4;
	__u8 hdr[8];

	if (bpf_skb_load_bytes(skb, in_ip, &inner, sizeof(inner)) < 0)
		return 0;
	if (inner.version != 4 || inner.ihl < 5 || (inner.frag_off & bpf_htons(0x1fff)))
		return 0;
	in_l4 = in_ip + ((__u32)inner.ihl & 0xf) * 4;
	if (bpf_skb_load_bytes(skb, in_l4, hdr, sizeof(hdr)) < 0)
		return 0;
	switch (inner.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP:
		__builtin_memcpy(&sport, &hdr[0], sizeof(sport));
		__builtin_memcpy(&dport, &hdr[2], sizeof(dport));
		break;
	default:
		return 0;
	}
	policy_ct_key_of(&key, inner.saddr, inner.daddr, sport, dport, inner.protocol);
	e = bpf_map_lookup_elem(&tern_stack_ct, &key);
	return e && !policy_ct_expired(e, bpf_ktime_get_coarse_ns(), inner.protocol);
}

/* stack_mark_no_stack marks the policy conntrack entry of key (the same
 * key as tern_stack_ct's) POLICY_CT_F_NO_STACK: stack_owned found no flow
 * of the host stack under it. Once per flow (and again after its entry was
 * replaced): policy_check reports the mark, and its callers skip
 * stack_owned for the flow's later packets. */
static __always_inline void stack_mark_no_stack(__u8 proto, const struct policy_ct_key *key)
{
	struct policy_ct_entry *pe = policy_ct_lookup(proto, key);

	/* A plain store, as policy_check's flag updates: a flag another CPU
	 * set at the same moment may be lost, and is set again. */
	if (pe && !(pe->flags & POLICY_CT_F_NO_STACK))
		pe->flags |= POLICY_CT_F_NO_STACK;
}

/* stack_owned reports whether the packet saddr -> daddr (a pod's, at
 * tern_from_pod) answers a flow the host stack delivered into the pod, and
 * refreshes that flow. Its cost: parsing the L4 header and one hash lookup;
 * on no flow, the mark that spares the flow's later packets both (above). */
static __always_inline int stack_owned(struct __sk_buff *skb, __be32 saddr, __be32 daddr, __u8 proto,
				       __u8 ihl, __be16 frag_off)
{
	struct policy_ct_key key;
	struct policy_ct_entry *e;
	__be16 sport, dport;
	struct l4 l4 = {};
	__u64 now;
	int hi;

	if (parse_l4(skb, proto, ihl, frag_off, &l4) != L4_OK || l4.nonfirst)
		return 0; /* decided like any packet (non-first fragments: no ports) */
	if (proto == IPPROTO_ICMP && (l4.icmp_type == ICMP_DEST_UNREACH ||
				      l4.icmp_type == ICMP_TIME_EXCEEDED ||
				      l4.icmp_type == ICMP_PARAMETERPROB))
		return stack_error_owned(skb, &l4);
	flow_ports(&l4, &sport, &dport);
	hi = policy_ct_key_of(&key, saddr, daddr, sport, dport, proto);
	e = bpf_map_lookup_elem(&tern_stack_ct, &key);
	now = e ? bpf_ktime_get_coarse_ns() : 0;
	if (!e || policy_ct_expired(e, now, proto)) {
		stack_mark_no_stack(proto, &key);
		return 0;
	}
	{
		int reply = !(e->flags & POLICY_CT_F_ORIG_HI) != !hi;
		__u16 add = policy_tcp_flags(&l4, reply) | (reply ? POLICY_CT_F_SEEN_REPLY : 0);

		if (now > e->last_seen + CT_REFRESH_NS)
			e->last_seen = now;
		if ((e->flags | add) != e->flags)
			e->flags |= add;
	}
	return 1;
}

/* stack_note_delivered records a flow the host stack delivered into a pod
 * (the packet saddr -> daddr, in the flow's original direction, allowed by
 * policy), when the pod's answers would otherwise not go back through the
 * stack: answers to a pod of this node would be redirected into it, answers
 * to a destination that is masqueraded would go through snat_out. Answers to
 * anything else go to the stack anyway. */
static __always_inline void stack_note_delivered(struct __sk_buff *skb, __be32 saddr, __be32 daddr,
						 __u8 proto, __u8 ihl, __be16 frag_off)
{
	struct policy_ct_entry ne = {};
	struct policy_ct_key key;
	struct policy_ct_entry *e;
	__be16 sport, dport;
	struct l4 l4 = {};
	__u64 now;
	int hi;

	if (!bpf_map_lookup_elem(&tern_endpoints, &saddr) && nomasq(saddr))
		return;
	if (parse_l4(skb, proto, ihl, frag_off, &l4) != L4_OK || l4.nonfirst)
		return;
	flow_ports(&l4, &sport, &dport);
	hi = policy_ct_key_of(&key, saddr, daddr, sport, dport, proto);
	now = bpf_ktime_get_coarse_ns();
	e = bpf_map_lookup_elem(&tern_stack_ct, &key);
	if (e && !policy_ct_expired(e, now, proto) && !(l4.proto == IPPROTO_TCP && (l4.tcp_flags & TCP_FLAG_SYN))) {
		if (now > e->last_seen + CT_REFRESH_NS)
			e->last_seen = now;
	} else {
		ne.last_seen = now;
		ne.flags = (hi ? POLICY_CT_F_ORIG_HI : 0) | policy_tcp_flags(&l4, 0);
		/* Failing (no free LRU node), the answers take the fast
		 * path: the flow breaks as it did without this, nothing
		 * opens. */
		if (bpf_map_update_elem(&tern_stack_ct, &key, &ne, BPF_ANY) < 0)
			return;
	}
	/* A mark of the flow's policy entry (stack_mark_no_stack: a packet
	 * of the same tuple checked while the stack had no such flow, e.g.
	 * its entry was evicted, or checked in the instant before it was
	 * written) would send the answers past the stack. Cleared after the
	 * write, on every packet the stack delivers: its slow path pays one
	 * more lookup, the fast path none. */
	e = policy_ct_lookup(proto, &key);
	if (e && (e->flags & POLICY_CT_F_NO_STACK))
		e->flags &= ~POLICY_CT_F_NO_STACK;
}

/* stack_reply_tracked reports whether a reply the host stack reverse-
 * translated belongs to a flow policy allowed: the flow was tracked under
 * its translated tuple (ct's reply tuple) when its first packet was decided
 * on the far side of the stack's NAT. */
static __always_inline int stack_reply_tracked(const struct stack_ct *ct)
{
	__u8 proto = ct->rproto;
	struct policy_ct_key key;
	struct policy_ct_entry *e;
	__u64 now;

	/* ICMP echo: conntrack keeps the identifier in the source and the
	 * type in the destination; policy.h keys it by the identifier twice. */
	policy_ct_key_of(&key, ct->rsrc, ct->rdst, ct->rsport,
			 proto == IPPROTO_ICMP ? ct->rsport : ct->rdport, proto);
	e = policy_ct_lookup(proto, &key);
	if (!e)
		return 0;
	now = bpf_ktime_get_coarse_ns();
	if (policy_ct_expired(e, now, proto))
		return 0;
	if (now > e->last_seen + CT_REFRESH_NS)
		e->last_seen = now;
	return 1;
}

#endif /* TERN_STACK_H */
