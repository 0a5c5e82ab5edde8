/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* What a pod may send besides IPv4: ARP about itself, nothing else.
 *
 * Tern's pods are IPv4 only. Any other frame a pod sends (IPv6 router
 * advertisements and neighbour discovery, IPv6 to anywhere, VLAN-tagged or
 * other ethertypes) would reach the host stack, or a bridge, with no
 * anti-spoofing and no policy, so it is dropped. ARP passes only when its
 * sender hardware and protocol addresses are the endpoint's own: a pod must
 * not claim, in the node's or a neighbour's ARP cache, an address that is
 * not its own. */
#ifndef TERN_ARP_H
#define TERN_ARP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/tern_types.h"
#include "maps.h"

/* From linux/if_arp.h, which pulls in libc headers BPF cannot build with. */
#define ARPHRD_ETHER 1
#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

/* arp_eth_ipv4: an Ethernet/IPv4 ARP packet (RFC 826), as it follows the
 * Ethernet header. */
struct arp_eth_ipv4 {
	__be16 hrd; /* ARPHRD_ETHER */
	__be16 pro; /* ETH_P_IP */
	__u8 hln;   /* 6 */
	__u8 pln;   /* 4 */
	__be16 op;  /* ARPOP_REQUEST, ARPOP_REPLY */
	__u8 sha[ETH_ALEN];
	__be32 spa;
	__u8 tha[ETH_ALEN];
	__be32 tpa;
} __attribute__((packed));

enum arp_verdict {
	ARP_OK = 0,      /* the endpoint's own ARP */
	ARP_SPOOFED,     /* sender MAC or IP not the endpoint's, or not Ethernet/IPv4 ARP */
	ARP_TRUNCATED,   /* shorter than an Ethernet/IPv4 ARP packet */
};

static __always_inline int arp_mac_equal(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] &&
	       a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

/* arp_from_endpoint checks an ARP frame received on ifindex (the host side
 * of a pod's veth): the Ethernet source and the ARP sender MAC must be the
 * MAC of the endpoint that owns the ARP sender IP, and that endpoint must
 * sit behind ifindex. An ARP probe (sender IP 0.0.0.0, RFC 5227) belongs
 * to no endpoint and is refused too: a pod's address is assigned by Tern,
 * there is nothing to probe. */
static __always_inline enum arp_verdict arp_from_endpoint(struct __sk_buff *skb, __u32 ifindex)
{
	struct arp_eth_ipv4 arp;
	struct endpoint *ep;
	struct ethhdr eth;
	__be32 spa;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, sizeof(eth), &arp, sizeof(arp)) < 0)
		return ARP_TRUNCATED;
	if (arp.hrd != bpf_htons(ARPHRD_ETHER) || arp.pro != bpf_htons(ETH_P_IP) ||
	    arp.hln != ETH_ALEN || arp.pln != 4 ||
	    (arp.op != bpf_htons(ARPOP_REQUEST) && arp.op != bpf_htons(ARPOP_REPLY)))
		return ARP_SPOOFED;
	spa = arp.spa;
	ep = bpf_map_lookup_elem(&tern_endpoints, &spa);
	if (!ep || ep->ifindex != ifindex || !arp_mac_equal(eth.h_source, ep->pod_mac) ||
	    !arp_mac_equal(arp.sha, ep->pod_mac))
		return ARP_SPOOFED;
	return ARP_OK;
}

#endif /* TERN_ARP_H */
