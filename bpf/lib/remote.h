/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Pods of other nodes (multi-node routing, package routing in Go).
 *
 * tern_remote maps every other node's pod CIDR to that node: its InternalIP
 * and, in VXLAN mode, the ifindex of this node's VXLAN device (external,
 * collect_md). Native routing sends a pod's packet for a remote pod out of
 * the uplink to the next hop the kernel's FIB gives (the route the routing
 * reconciler installed via that node); VXLAN mode sets the tunnel key
 * (remote = node IP, VNI TERN_VXLAN_VNI) and redirects to the VXLAN device,
 * which encapsulates. Both decrement the TTL (a routed hop). On the way in,
 * a packet from a remote pod to a local one meets the local pod's ingress
 * policy and is delivered with bpf_redirect_peer.
 *
 * The source node of decapsulated traffic is the tunnel's outer source
 * address: it must be the node that owns the inner source's pod CIDR
 * (tunnel_from_owner), so a VXLAN packet from anywhere else (an unknown
 * host, or a node claiming another node's pods) is dropped. */
#ifndef TERN_REMOTE_H
#define TERN_REMOTE_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/tern_types.h"
#include "maps.h"
#include "metrics.h"
#include "verdict.h"
#include "csum.h"
#include "fib.h"
#include "forward.h"
#include "conntrack.h"
#include "nat.h" /* TCP flag names policy.h uses */
#include "policy.h"

/* The VXLAN network identifier of pod traffic. The device is external, so
 * it takes any VNI; one fixed value keeps other VXLAN users apart. */
#define TERN_VXLAN_VNI 1
#define TERN_TUNNEL_TTL 64

/* remote_lookup returns the node whose pod CIDR holds addr, or NULL. */
static __always_inline struct remote_node *remote_lookup(__be32 addr)
{
	struct lpm_v4_key key = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&tern_remote, &key);
}

/* REMOTE_FIB_TTL_NS: how long a node's cached FIB answer is used. */
#define REMOTE_FIB_TTL_NS 1000000000ULL

/* remote_fib_next_hop finds where a packet for a pod of the native node rn
 * leaves (interface and next hop), and returns BPF_FIB_LKUP_RET_SUCCESS or
 * what the FIB said instead. The FIB is asked once per second per node, not
 * per packet (the lookup was ~2.5% of a cross-node ping-pong's latency,
 * bench/example-multinode/round4): its answer is kept in rn's tern_remote
 * entry. So the datapath follows a change of the node's routes or of
 * forwarding within REMOTE_FIB_TTL_NS, and at once when package routing
 * rewrites the entry (its zeros: nothing cached); bpf_redirect_neigh still
 * resolves the neighbour per packet. A packet larger than the cached
 * interface MTU allows asks the FIB, which answers FRAG_NEEDED (or passes a
 * GSO packet): path MTU discovery sees every change at once. The answer is
 * per pod CIDR, not per destination: a route more specific than the CIDR
 * (one remote pod's /32 elsewhere) or ECMP paths for it are not followed
 * packet by packet; the answer of the last lookup serves the whole CIDR
 * for a second. Concurrent writers write the answers of lookups made
 * moments apart; fib_until, written last, is what makes an answer usable. */
static __always_inline long remote_fib_next_hop(struct __sk_buff *skb, struct remote_node *rn,
						__be32 saddr, __be32 daddr, __u8 tos, __u8 proto,
						__u32 *ifindex, __be32 *nh)
{
	struct bpf_fib_lookup fib;
	__u64 now = bpf_ktime_get_coarse_ns();
	long rc;

	if (now < rn->fib_until && skb->len <= rn->fib_mtu + ETH_HLEN) {
		*ifindex = rn->fib_ifindex;
		*nh = rn->fib_nh;
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	rc = fib_lookup_v4(skb, &fib, saddr, daddr, tos, proto, 0, 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return rc;
	*ifindex = fib.ifindex;
	*nh = fib.ipv4_dst;
	rn->fib_ifindex = fib.ifindex;
	rn->fib_nh = fib.ipv4_dst;
	rn->fib_mtu = fib.mtu_result; /* the interface's MTU: tot_len was 0 */
	rn->fib_until = now + REMOTE_FIB_TTL_NS;
	return rc;
}

/* remote_forward sends a pod's packet to a pod of the node rn (egress policy
 * already passed). ttl is the packet's TTL. What it cannot send itself (TTL
 * expiring, a native route the FIB does not resolve, a packet larger than
 * the route's MTU) goes to the stack, which answers the pod with the ICMP
 * error. Returns a tc verdict. */
static __always_inline int remote_forward(struct __sk_buff *skb, struct remote_node *rn,
					  __be32 saddr, __be32 daddr, __u8 tos, __u8 proto, __u8 ttl)
{
	struct bpf_tunnel_key key;
	__u32 tunnel = rn->tunnel_ifindex;
	__be32 node_ip = rn->node_ip;
	__be32 nh;
	struct node_config *cfg;
	__u32 ifindex;

	if (ttl <= 1) {
		count(METRIC_PASS_TTL, skb->len);
		return TERN_PASS;
	}
	if (tunnel) {
		__builtin_memset(&key, 0, sizeof(key));
		key.remote_ipv4 = bpf_ntohl(node_ip);
		key.tunnel_id = TERN_VXLAN_VNI;
		key.tunnel_ttl = TERN_TUNNEL_TTL;
		/* No outer UDP checksum (BPF_F_ZERO_CSUM_TX), as the kernel
		 * routes' encapsulation sends it (RFC 7348 allows zero): with
		 * one, every segment of a GSO packet is checksummed in software
		 * on its way out of a veth or an uplink without tunnel offload. */
		if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0 ||
		    decrement_ttl_at(skb, ttl) < 0) {
			count(METRIC_DROP_REDIRECT, skb->len);
			return TC_ACT_SHOT;
		}
		count(METRIC_REMOTE_VXLAN, skb->len);
		return bpf_redirect(tunnel, 0);
	}
	if (remote_fib_next_hop(skb, rn, saddr, daddr, tos, proto, &ifindex, &nh) !=
	    BPF_FIB_LKUP_RET_SUCCESS) {
		/* FRAG_NEEDED (the stack tells the pod the MTU), no route,
		 * forwarding off: the stack's answer is the right one. */
		count(METRIC_PASS_HOST, skb->len);
		return TERN_PASS;
	}
	if (decrement_ttl_at(skb, ttl) < 0) {
		count(METRIC_DROP_REDIRECT, skb->len);
		return TC_ACT_SHOT;
	}
	count(METRIC_REMOTE_NATIVE, skb->len);
	/* Out of the uplink, whose tern_to_uplink takes the bit off again;
	 * out of another interface it would travel on with the skb. */
	cfg = node_config();
	if (cfg && ifindex == cfg->uplink_ifindex)
		skb->tc_index |= TERN_TC_INDEX_DECIDED;
	return redirect_neigh_via(ifindex, nh);
}

/* tunnel_from_owner reports whether a decapsulated packet with inner source
 * saddr came from the node that owns saddr's pod CIDR: the tunnel key's
 * remote address (the outer source) must be that node's IP. No key (not
 * decapsulated by an external-mode device) is never the owner. */
static __always_inline int tunnel_from_owner(struct __sk_buff *skb, __be32 saddr)
{
	const struct remote_node *rn = remote_lookup(saddr);
	struct bpf_tunnel_key key;

	if (!rn)
		return 0;
	__builtin_memset(&key, 0, sizeof(key));
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return 0;
	return bpf_htonl(key.remote_ipv4) == rn->node_ip;
}

#endif /* TERN_REMOTE_H */
