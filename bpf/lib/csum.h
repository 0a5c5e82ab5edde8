/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Header rewrites with incremental checksum updates. Everything works on
 * offsets from the start of the frame (not packet pointers): the csum and
 * store helpers may move skb->data, so pointers would need re-validation
 * after every call. */
#ifndef TERN_CSUM_H
#define TERN_CSUM_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define IP_OFF        ETH_HLEN
#define IP_TTL_OFF    (ETH_HLEN + offsetof(struct iphdr, ttl))
#define IP_CSUM_OFF   (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF  (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF  (ETH_HLEN + offsetof(struct iphdr, daddr))

/* Offsets inside an L4 header. */
#define TCP_CSUM_OFF  16
#define UDP_CSUM_OFF  6
#define ICMP_CSUM_OFF 2
#define ICMP_ID_OFF   4

/* l4_csum_off is where the checksum of an L4 header of proto sits, relative
 * to that header. */
static __always_inline __u32 l4_csum_off(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return TCP_CSUM_OFF;
	case IPPROTO_UDP:
		return UDP_CSUM_OFF;
	}
	return ICMP_CSUM_OFF;
}

/* decrement_ttl_at acts as the router the pod believes it talks to: TTL
 * minus one, IP checksum fixed. ttl is the current value (already > 1).
 * Written in place, as the kernel's ip_decrease_ttl does (the checksum
 * adjusted for the TTL byte's 0x0100 in its 16-bit word): no helper call.
 * The header is in the linear part (the programs parsed it there); if a
 * helper left it otherwise, the two helpers do it. */
static __always_inline int decrement_ttl_at(struct __sk_buff *skb, __u8 ttl)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + IP_OFF;
	__u8 new_ttl = ttl - 1;

	if ((void *)(iph + 1) <= data_end && iph->ttl == ttl) {
		__u32 check = (__u32)iph->check + (__u32)bpf_htons(0x0100);

		iph->check = (__u16)(check + (check >= 0xffff));
		iph->ttl = new_ttl;
		return 0;
	}
	/* TTL is the high byte of a 16-bit word whose low byte (protocol)
	 * stays: replacing the bytes as a word keeps the checksum exact. */
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, bpf_htons((__u16)ttl << 8),
				bpf_htons((__u16)new_ttl << 8), sizeof(__u16)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, IP_TTL_OFF, &new_ttl, sizeof(new_ttl), 0) < 0 ? -1 : 0;
}

/* nat_rewrite replaces one address of the IPv4 header (at addr_off) and the
 * matching port or ICMP echo identifier (at port_off), fixing the IPv4
 * header checksum and the L4 checksum at l4_csum. The TCP and UDP checksums
 * cover the address through the pseudo header (BPF_F_PSEUDO_HDR, which also
 * keeps CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right); ICMP's does
 * not. A zero UDP checksum means "none" and must stay zero: with
 * BPF_F_MARK_MANGLED_0 the helper leaves 0 alone and writes a computed 0 as
 * 0xffff. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, __u8 proto, __u32 addr_off,
				       __be32 from_addr, __be32 to_addr, __u32 port_off,
				       __be16 from_port, __be16 to_port, __u32 l4_csum)
{
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (from_addr != to_addr) {
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, from_addr, to_addr, sizeof(to_addr)) < 0)
			return -1;
		if (proto != IPPROTO_ICMP &&
		    bpf_l4_csum_replace(skb, l4_csum, from_addr, to_addr,
					BPF_F_PSEUDO_HDR | mangled | sizeof(to_addr)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &to_addr, sizeof(to_addr), 0) < 0)
			return -1;
	}
	if (from_port != to_port) {
		if (bpf_l4_csum_replace(skb, l4_csum, from_port, to_port, mangled | sizeof(to_port)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &to_port, sizeof(to_port), 0) < 0)
			return -1;
	}
	return 0;
}

#endif /* TERN_CSUM_H */
