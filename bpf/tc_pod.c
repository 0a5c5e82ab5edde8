// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* tc_pod.c: attached at tc ingress (TCX, or clsact) of every pod's host-side
 * veth, so it sees each packet a pod sends before the host stack does.
 *
 * Decides: drop what is not IPv4 or the pod's own ARP (lib/arp.h), spoofed
 * packets (source IP or MAC not the sender's own) and packets to 127/8;
 * deliver packets for another pod on this node straight into that pod's
 * namespace with bpf_redirect_peer (no host routing, no bridge, no
 * netfilter); masquerade packets leaving the cluster through the uplink to
 * the node IP and send them out with bpf_redirect_neigh (replies come back
 * through tc_uplink.c); hand everything else on (TERN_PASS: to programs
 * attached after this one, then the host stack), which also gets,
 * untouched, traffic to a Service CIDR and the pod's answers to flows the
 * stack delivered into it (kube-proxy's DNAT, lib/stack.h).
 * NetworkPolicy (lib/policy.h), after anti-spoofing: the sender's egress
 * rules, and the receiver's ingress rules when it is a pod of this node
 * (bpf_redirect_peer skips that pod's veth egress, where tern_to_pod runs).
 *
 * tern_to_pod, in this file as the other direction of the same veth, runs at
 * its tc egress: it applies the pod's ingress rules to what the host stack
 * delivers (the node itself, other nodes, the outside, Services after
 * kube-proxy's DNAT), reading the stack's conntrack entry for the client
 * and the flow a reply answers. */

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "include/tern_types.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/verdict.h"
#include "lib/parse.h"
#include "lib/csum.h"
#include "lib/conntrack.h"
#include "lib/nat.h"
#include "lib/fib.h"
#include "lib/forward.h"
#include "lib/policy.h"
#include "lib/arp.h"
#include "lib/stack.h"
#include "lib/remote.h"
#include "lib/lb.h"

char __license[] SEC("license") = "Dual BSD/GPL";

static __always_inline int mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/* The IPv4 header fields the off-node path needs, copied out of the packet
 * before any helper invalidates packet pointers. */
struct ip4 {
	__be32 saddr;
	__be32 daddr;
	__be16 frag_off;
	__u8 ttl;
	__u8 proto;
	__u8 ihl;
	__u8 tos;
};

static __always_inline int multicast_or_broadcast(__be32 daddr)
{
	__u32 a = bpf_ntohl(daddr);

	return (a & 0xf0000000) == 0xe0000000 || a == 0xffffffff;
}

/* lb_pkt_of fills the load balancer's view of the packet (lib/lb.h). */
static __always_inline void lb_pkt_of(struct lb_pkt *lp, const struct ip4 *ip, __be16 id)
{
	lp->saddr = ip->saddr;
	lp->daddr = ip->daddr;
	lp->frag_off = ip->frag_off;
	lp->id = id;
	lp->proto = ip->proto;
	lp->ihl = ip->ihl;
	lp->ttl = ip->ttl;
}

#define IP_DF 0x4000

/* Not a tc verdict (those are >= -1): snat_icmp translated the message. */
#define SNAT_ICMP_SENT -2

/* snat_icmp translates an ICMP message a pod sends to a remote that must be
 * masqueraded, or says it must be dropped (TC_ACT_SHOT) or passed as it is
 * (TERN_PASS). Returns SNAT_ICMP_SENT when it translated: the caller sends it on.
 *   - an error (unreachable, time exceeded, parameter problem) about a
 *     packet of a masqueraded flow that reached the pod: outer source, and
 *     the quoted header's destination address and port, become the node
 *     IP and NAT port the remote knows the flow by. The quoted IPv4
 *     checksum is updated with its address, which keeps the ICMP checksum
 *     over it unchanged; the quoted port change is folded into the ICMP
 *     checksum; the quoted TCP/UDP checksum is left (often truncated away,
 *     no receiver checks it). As in netfilter, the quoted source must be
 *     the error's destination;
 *   - an error about, or an echo reply to, a flow opened from outside to
 *     the pod's own address (routed pod CIDRs, tern_nat NAT_F_INBOUND):
 *     passed, the remote knows the pod's address;
 *   - anything else (errors about no known flow, other types): dropped,
 *     leaving with the pod's address would leak it. */
static __always_inline int snat_icmp(struct __sk_buff *skb, const struct ip4 *ip,
				     const struct l4 *l4, __be32 node_ip)
{
	__u32 in_ip = l4->off + 8; /* ICMP error header is 8 bytes */
	__u32 in_l4 = in_ip + sizeof(struct iphdr);
	struct nat_tuple fk = {}, rk;
	struct nat_entry *f, *r;
	struct iphdr inner;
	__u32 port_off;
	__u8 q[8];

	fk.saddr = ip->saddr;
	fk.daddr = ip->daddr;
	switch (l4->icmp_type) {
	case ICMP_ECHOREPLY:
		fk.sport = l4->icmp_id;
		fk.proto = IPPROTO_ICMP;
		f = bpf_map_lookup_elem(&tern_nat, &fk);
		if (f && (f->flags & NAT_F_INBOUND))
			goto pass;
		goto drop;
	case ICMP_DEST_UNREACH:
	case ICMP_TIME_EXCEEDED:
	case ICMP_PARAMETERPROB:
		break;
	default:
		goto drop;
	}
	if (bpf_skb_load_bytes(skb, in_ip, &inner, sizeof(inner)) < 0 ||
	    bpf_skb_load_bytes(skb, in_l4, q, sizeof(q)) < 0)
		goto drop;
	if (inner.version != 4 || inner.ihl != 5 || (inner.frag_off & bpf_htons(0x1fff)) ||
	    inner.daddr != ip->saddr || inner.saddr != ip->daddr)
		goto drop;
	/* The flow, as the pod sent it, is the quoted packet reversed. */
	fk.proto = inner.protocol;
	switch (inner.protocol) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		__builtin_memcpy(&fk.dport, &q[0], sizeof(fk.dport)); /* remote port */
		__builtin_memcpy(&fk.sport, &q[2], sizeof(fk.sport)); /* pod port */
		port_off = in_l4 + 2;
		break;
	case IPPROTO_ICMP:
		if (q[0] != ICMP_ECHOREPLY)
			goto drop;
		__builtin_memcpy(&fk.sport, &q[4], sizeof(fk.sport)); /* pod echo id */
		port_off = in_l4 + ICMP_ID_OFF;
		break;
	default:
		goto drop;
	}
	f = bpf_map_lookup_elem(&tern_nat, &fk);
	if (!f)
		goto drop;
	if (f->flags & NAT_F_INBOUND)
		goto pass;
	if (f->addr != node_ip)
		goto drop;
	/* The port must still be this flow's (see snat_lookup). */
	nat_rev_key(&rk, &fk, node_ip, f->port);
	r = bpf_map_lookup_elem(&tern_nat_rev, &rk);
	if (!r || !nat_owned_by(r, &fk))
		goto drop;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, ip->saddr, node_ip, sizeof(node_ip)) < 0 ||
	    bpf_skb_store_bytes(skb, IP_SADDR_OFF, &node_ip, sizeof(node_ip), 0) < 0 ||
	    bpf_l3_csum_replace(skb, in_ip + offsetof(struct iphdr, check), ip->saddr, node_ip,
				sizeof(node_ip)) < 0 ||
	    bpf_skb_store_bytes(skb, in_ip + offsetof(struct iphdr, daddr), &node_ip,
				sizeof(node_ip), 0) < 0 ||
	    bpf_l4_csum_replace(skb, l4->off + ICMP_CSUM_OFF, fk.sport, f->port, sizeof(f->port)) < 0 ||
	    bpf_skb_store_bytes(skb, port_off, &f->port, sizeof(f->port), 0) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	return SNAT_ICMP_SENT;

pass:
	count(METRIC_PASS_HOST, skb->len);
	return TERN_PASS;
drop:
	count(METRIC_DROP_NAT_ICMP, skb->len);
	return TC_ACT_SHOT;
}

/* stack_answer reports (and counts) a packet that answers a flow the host
 * stack delivered into the pod (lib/stack.h stack_owned): only the stack
 * can translate it back. no_stack: policy found the flow marked as none
 * of the stack's (POLICY_CT_F_NO_STACK), and the question is skipped. */
static __always_inline int stack_answer(struct __sk_buff *skb, const struct ip4 *ip, int no_stack)
{
	if (no_stack || !stack_owned(skb, ip->saddr, ip->daddr, ip->proto, ip->ihl, ip->frag_off))
		return 0;
	count(METRIC_PASS_STACK_REPLY, skb->len);
	return 1;
}

/* snat_lookup_now is snat_lookup (lib/nat.h) in a frame of its own, at the
 * current time: the port search (SipHash state, candidate ports) would
 * otherwise sit in tern_from_pod's frame, and the verifier bounds a frame
 * plus its deepest chain of callees (the load balancer's, the event
 * writer's) to 512 bytes. flags are the packet's close flags, and SNAT_SYN
 * when it opens a TCP connection. */
#define SNAT_SYN 0x8000
static __noinline int snat_lookup_now(const struct nat_tuple *orig, __be32 node_ip, __u32 flags,
				      __be16 *port)
{
	return snat_lookup(orig, node_ip, flags & ~SNAT_SYN, !!(flags & SNAT_SYN),
			   bpf_ktime_get_ns(), port);
}

/* snat_out masquerades a packet of src to the node IP and sends it out of
 * the uplink the FIB chose. Returns a tc verdict. It never lets a packet
 * that needs masquerading reach the stack untranslated, which would send
 * it out with the pod's address: it passes only what the stack delivers to
 * the node itself or drops with an ICMP error to the pod; everything else
 * it translates or drops and counts. */
static __always_inline int snat_out(struct __sk_buff *skb, const struct ip4 *ip,
				    const struct node_config *cfg)
{
	struct bpf_fib_lookup *fib;
	struct lb_scratch *scratch;
	struct nat_tuple orig = {};
	struct l4 l4 = {};
	__u32 port_off, csum_off;
	__be16 nat_port, from_port;
	long rc;
	int v;

	if (parse_l4(skb, ip->proto, ip->ihl, ip->frag_off, &l4) != L4_OK) {
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}

	/* The FIB parameters live in the per-CPU scratch map, not on the
	 * stack: tern_from_pod's frame plus its deepest callee must stay
	 * within the verifier's 512 bytes. */
	scratch = lb_scratch();
	if (!scratch) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	fib = (struct bpf_fib_lookup *)scratch->fib;
	rc = fib_lookup_v4(skb, fib, ip->saddr, ip->daddr, ip->tos, ip->proto, l4.sport, l4.dport);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		if (fib->ifindex != cfg->uplink_ifindex) {
			/* Routed out of another interface: we have no address
			 * to masquerade to there, and the stack would send it
			 * with the pod's. Destinations that may see pod
			 * addresses belong in nonMasqueradeCIDRs. */
			count(METRIC_DROP_NAT_NO_ROUTE, skb->len);
			return TC_ACT_SHOT;
		}
		break;
	case BPF_FIB_LKUP_RET_NOT_FWDED:   /* local (the node itself), or no route */
	case BPF_FIB_LKUP_RET_FWD_DISABLED: /* the stack does not forward it either */
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		/* The stack delivers it to the node or drops it with an ICMP
		 * error to the pod: nothing leaves. */
		count(METRIC_PASS_HOST, skb->len);
		return TERN_PASS;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		if (ip->frag_off & bpf_htons(IP_DF)) {
			/* The stack drops it and tells the pod the MTU
			 * (ICMP fragmentation needed): path MTU discovery. */
			count(METRIC_PASS_HOST, skb->len);
			return TERN_PASS;
		}
		/* The stack would fragment it and send the fragments with the
		 * pod's address; fragments cannot be masqueraded here. */
		count(METRIC_DROP_NAT_TOO_BIG, skb->len);
		return TC_ACT_SHOT;
	default:
		/* An error (< 0: e.g. a flag this kernel rejects), a route
		 * with tunnel encapsulation, no neighbour: not ours to send,
		 * and the stack would send it untranslated. */
		count(METRIC_DROP_NAT_NO_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	if (ip->ttl <= 1) {
		/* The stack drops it and sends time exceeded to the pod. */
		count(METRIC_PASS_TTL, skb->len);
		return TERN_PASS;
	}

	orig.saddr = ip->saddr;
	orig.daddr = ip->daddr;
	orig.proto = ip->proto;
	switch (ip->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		if (l4.nonfirst)
			goto unsupported; /* no ports to translate by */
		orig.sport = l4.sport;
		orig.dport = l4.dport;
		port_off = l4.off; /* source port */
		break;
	case IPPROTO_ICMP:
		if (l4.nonfirst)
			goto unsupported;
		if (l4.icmp_type != ICMP_ECHO) {
			v = snat_icmp(skb, ip, &l4, cfg->node_ip);
			if (v != SNAT_ICMP_SENT)
				return v;
			goto send;
		}
		orig.sport = l4.icmp_id; /* the identifier plays the port */
		port_off = l4.off + ICMP_ID_OFF;
		break;
	default:
		goto unsupported;
	}

	switch (snat_lookup_now(&orig, cfg->node_ip,
				tcp_close_flags(&l4, NAT_F_FIN_POD) |
				(l4.proto == IPPROTO_TCP &&
				 (l4.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN ? SNAT_SYN : 0),
				&nat_port)) {
	case SNAT_TRANSLATE:
		break;
	case SNAT_INBOUND:
		count(METRIC_PASS_HOST, skb->len);
		return TERN_PASS;
	case SNAT_NO_PORT:
		count(METRIC_DROP_NAT_NO_PORT, skb->len);
		return TC_ACT_SHOT;
	default:
		count(METRIC_DROP_NAT_MAP_FULL, skb->len);
		return TC_ACT_SHOT;
	}

	from_port = orig.sport;
	csum_off = l4.off + l4_csum_off(ip->proto);
	if (nat_rewrite(skb, ip->proto, IP_SADDR_OFF, ip->saddr, cfg->node_ip,
			port_off, from_port, nat_port, csum_off) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
send:
	if (decrement_ttl_at(skb, ip->ttl) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	count(METRIC_SNAT, skb->len);
	return redirect_neigh_v4(fib);

unsupported:
	/* Sending it on would leak the pod address; the stack would too. */
	count(METRIC_DROP_NAT_UNSUPPORTED, skb->len);
	return TC_ACT_SHOT;
}

/* tern_nat_gc is not attached anywhere: the plugin runs it with
 * BPF_PROG_TEST_RUN whenever it opens the datapath. It arms the NAT
 * garbage collector's timer with this version's code and runs one pass.
 * Returns the NAT entries removed, or a negative error. */
SEC("tc")
int tern_nat_gc(struct __sk_buff *skb)
{
	return nat_gc_arm();
}

/* shaped_off_uplink_ip is shaped_off_uplink (lib/shaped.h) in a frame of
 * its own, for the same reason as remote_out. */
static __noinline int shaped_off_uplink_ip(struct __sk_buff *skb, const struct endpoint *src,
					   const struct ip4 *ip)
{
	return shaped_off_uplink(skb, src, ip->saddr, ip->daddr, ip->tos, ip->proto, ip->ihl,
				 ip->frag_off);
}

/* remote_out is remote_forward in a frame of its own: its FIB and tunnel
 * structures would otherwise sit in tern_from_pod's frame, and the
 * verifier bounds a frame plus its deepest callee (the load balancer's) to
 * 512 bytes. */
static __noinline int remote_out(struct __sk_buff *skb, struct remote_node *rn,
				 const struct ip4 *ip)
{
	return remote_forward(skb, rn, ip->saddr, ip->daddr, ip->tos, ip->proto, ip->ttl);
}

SEC("tc")
int tern_from_pod(struct __sk_buff *skb)
{
	struct endpoint *src, *dst;
	struct remote_node *rn;
	struct node_config *cfg;
	struct ethhdr *eth;
	struct iphdr *iph;
	struct lb_pkt lp = {};
	struct ip4 ip;
	__be16 ip_id;
	int no_stack = 0; /* policy: no flow of the host stack (stack_owned) */
	int v;

	/* A tag the veth's receive path took off (skb_vlan_untag): the
	 * frame below it may look like IPv4, but no pod of Tern's sends
	 * tagged frames. */
	if (skb->vlan_present) {
		count(METRIC_DROP_NON_IPV4, skb->len);
		return TC_ACT_SHOT;
	}
	switch (parse_ipv4(skb, &eth, &iph)) {
	case PARSE_IPV4:
		break;
	case PARSE_NOT_IPV4:
		/* IPv4 and ARP only (lib/arp.h): IPv6 (router
		 * advertisements included) and every other ethertype would
		 * reach the stack without anti-spoofing or policy. */
		if (eth->h_proto != bpf_htons(ETH_P_ARP)) {
			count(METRIC_DROP_NON_IPV4, skb->len);
			return TC_ACT_SHOT;
		}
		switch (arp_from_endpoint(skb, skb->ifindex)) {
		case ARP_OK:
			count(METRIC_PASS_NON_IPV4, skb->len);
			return TERN_PASS;
		case ARP_SPOOFED:
			count(METRIC_DROP_ARP_SPOOFED, skb->len);
			return TC_ACT_SHOT;
		default:
			count(METRIC_DROP_TRUNCATED, skb->len);
			return TC_ACT_SHOT;
		}
	default:
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}

	/* Anti-spoofing: the source must be the endpoint behind this veth. */
	src = bpf_map_lookup_elem(&tern_endpoints, &iph->saddr);
	if (!src || src->ifindex != skb->ifindex || !mac_equal(eth->h_source, src->pod_mac)) {
		count(METRIC_DROP_SPOOFED, skb->len);
		return TC_ACT_SHOT;
	}
	/* 127.0.0.0/8 is martian off the loopback interface, unless
	 * route_localnet is on for the veth (kube-proxy sets it for its
	 * localhost NodePorts): then the node would deliver a pod's packet to
	 * services bound to the node's 127.0.0.1 (CVE-2020-8558). */
	if ((bpf_ntohl(iph->daddr) >> 24) == 127) {
		count(METRIC_DROP_LOOPBACK, skb->len);
		return TC_ACT_SHOT;
	}

	ip.saddr = iph->saddr;
	ip.daddr = iph->daddr;
	ip.frag_off = iph->frag_off;
	ip.ttl = iph->ttl;
	ip.proto = iph->protocol;
	ip.ihl = iph->ihl;
	ip.tos = iph->tos;
	ip_id = iph->id;

	/* Tern's own Service load balancer (services: "ebpf", lib/lb.h):
	 * the Service is translated first, so that policy and delivery
	 * below see the backend. Called whatever the endpoint's mode (it
	 * checks ENDPOINT_F_LB itself): one path for the verifier. */
	lb_pkt_of(&lp, &ip, ip_id);
	v = lb_from_pod(skb, src, &lp);
	if (v != LB_CONTINUE)
		return v;
	ip.daddr = lp.daddr;

	/* A Service address (never a pod's): kube-proxy's DNAT in the host
	 * stack decides where it goes, and policy is decided on the
	 * translated packet (tern_to_pod, lib/stack.h). A pod of this node or
	 * of another is not asked about: pod and Service CIDRs are disjoint
	 * in a working cluster (kube-proxy's rules would take the pods'
	 * packets too), and the pod-to-pod paths skip a lookup. */
	dst = bpf_map_lookup_elem(&tern_endpoints, &ip.daddr);
	rn = dst ? NULL : remote_lookup(ip.daddr);
	if (!dst && !rn && to_service_cidr(ip.daddr)) {
		count(METRIC_PASS_SERVICE, skb->len);
		return TERN_PASS;
	}

	/* NetworkPolicy, once the source is known to be this pod's own (a
	 * forged source would be policed as the pod it claims to be). */
	if (!policy_pass_flow(skb, ip.saddr, ip.daddr, ip.saddr, ip.proto, ip.ihl, ip.frag_off, ip_id,
			      &no_stack))
		return TC_ACT_SHOT;

	/* A backend's answer to a Service flow: from the Service address
	 * again (decided above on the backend's own, as its flow was). */
	lb_pkt_of(&lp, &ip, ip_id);
	v = lb_reply(skb, src, &lp);
	if (v != LB_CONTINUE)
		return v;
	ip.saddr = lp.saddr;
	/* Bandwidth limits (lib/shaped.h): through the veth's ingress
	 * filter and the stack; tern_to_uplink masquerades it. */
	if (endpoint_shaped(src)) {
		if (!dst && shaped_off_uplink_ip(skb, src, &ip))
			return TC_ACT_SHOT;
		count(METRIC_PASS_SHAPED, skb->len);
		return TERN_PASS;
	}

	if (dst) {
		/* An answer to a flow the stack delivered (e.g. DNATed from a
		 * ClusterIP): only the stack can translate it back. */
		if (stack_answer(skb, &ip, no_stack))
			return TERN_PASS;
		return deliver_to_endpoint(skb, dst, ip.ttl, METRIC_REDIRECT_PEER);
	}

	/* A pod of another node: native routing or VXLAN (lib/remote.h),
	 * never masqueraded; but an answer to a flow this node's stack
	 * delivered (a NodePort or hostPort hit from that pod) goes back
	 * through the stack, which reverses its DNAT. */
	if (rn) {
		if (stack_answer(skb, &ip, no_stack))
			return TERN_PASS;
		return remote_out(skb, rn, &ip);
	}

	/* Masquerade what leaves the cluster, when this pod's network asks
	 * for it and the node has an uplink with an address; but not the
	 * answers of flows the stack delivered (NodePort, hostPort): the
	 * stack translates them back to the address the client used. */
	cfg = node_config();
	if (cfg && cfg->node_ip && cfg->uplink_ifindex && (src->flags & ENDPOINT_F_MASQ) &&
	    !multicast_or_broadcast(ip.daddr) && !nomasq(ip.daddr)) {
		if (stack_answer(skb, &ip, no_stack))
			return TERN_PASS;
		return snat_out(skb, &ip, cfg);
	}

	/* The node itself, other nodes' pods, and unmasqueraded traffic: the
	 * host stack routes it (and kube-proxy's rules see it). */
	count(METRIC_PASS_HOST, skb->len);
	return TERN_PASS;
}

/* tern_to_pod: attached at tc egress (TCX, or clsact) of every pod's
 * host-side veth: it sees what the host stack sends into the pod (the node
 * itself, other nodes' pods and the outside, routed to the pod's /32).
 * Packets tern_from_pod and tern_from_uplink deliver with bpf_redirect_peer
 * never come here: they were decided before the redirect (replies of
 * masqueraded flows are replies of flows whose egress passed).
 *
 * Decides: the pod's ingress policy (and, for a packet a local pod sent
 * through the host stack, that pod's egress policy); everything else, and
 * replies of allowed flows, pass. It never changes the packet. */
SEC("tc")
int tern_to_pod(struct __sk_buff *skb)
{
	struct ethhdr *eth;
	struct iphdr *iph;
	__be32 saddr, daddr, peer;
	struct stack_ct ct = {};
	__be16 frag_off, id;
	__u8 proto, ihl, ttl;

	switch (parse_ipv4(skb, &eth, &iph)) {
	case PARSE_IPV4:
		break;
	case PARSE_NOT_IPV4:
		/* ARP passes: the node resolves a pod's MAC with it when its
		 * permanent neighbour entry is gone, and the pod answers with
		 * its own (checked on the way out). Nothing else: the pod
		 * is IPv4 only and the host veth has IPv6 disabled, so IPv6
		 * here was forwarded from elsewhere (another interface with
		 * IPv6 forwarding), past every policy. */
		if (eth->h_proto == bpf_htons(ETH_P_ARP) && !skb->vlan_present) {
			count(METRIC_PASS_TO_POD, skb->len);
			return TERN_PASS;
		}
		count(METRIC_DROP_NON_IPV4, skb->len);
		return TC_ACT_SHOT;
	default:
		/* Undecidable, and no pod could make sense of it either. */
		count(METRIC_DROP_TRUNCATED, skb->len);
		return TC_ACT_SHOT;
	}
	saddr = iph->saddr;
	daddr = iph->daddr;
	frag_off = iph->frag_off;
	id = iph->id;
	proto = iph->protocol;
	ihl = iph->ihl;
	ttl = iph->ttl;

	/* The host stack's conntrack entry (lib/stack.h): a reply it
	 * reverse-translated passes on the flow it answers; a flow it
	 * delivered is decided on its original client (before the stack's
	 * SNAT, e.g. kube-proxy's masquerade) and the translated destination
	 * (after DNAT: the backend pod). */
	stack_ct_of(skb, &ct);
	if (ct.tracked && ct.reply && ct.rsrc != saddr && stack_reply_tracked(&ct)) {
		count(METRIC_PASS_TO_POD, skb->len);
		return TERN_PASS;
	}
	peer = ct.tracked && !ct.reply ? ct.orig_src : saddr;
	if (!policy_pass_as(skb, saddr, daddr, peer, proto, ihl, frag_off, id))
		return TC_ACT_SHOT;
	if (ct.tracked && !ct.reply)
		stack_note_delivered(skb, saddr, daddr, proto, ihl, frag_off);
	/* services "ebpf": the answer of a backend that lives in the host
	 * stack (a host-network backend on this node, e.g. the API server
	 * behind the kubernetes Service, which the pod's packet reached after
	 * tern_from_pod's DNAT) comes from the backend's address: it goes
	 * back to the frontend the pod addressed, decided above on the
	 * backend's own (as its flow was). */
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
		struct endpoint *dst = bpf_map_lookup_elem(&tern_endpoints, &daddr);

		if (dst && (dst->flags & ENDPOINT_F_LB)) {
			struct lb_pkt lp = {
				.saddr = saddr,
				.daddr = daddr,
				.frag_off = frag_off,
				.id = id,
				.proto = proto,
				.ihl = ihl,
				.ttl = ttl,
			};
			int v = lb_reply(skb, dst, &lp);

			if (v != LB_CONTINUE)
				return v;
		}
	}
	count(METRIC_PASS_TO_POD, skb->len);
	return TERN_PASS;
}
