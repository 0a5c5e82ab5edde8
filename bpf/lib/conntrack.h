/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Flow tuples and their lifetimes, for the NAT maps. */
#ifndef TERN_CONNTRACK_H
#define TERN_CONNTRACK_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "../include/tern_types.h"
#include "csum.h"

#define NSEC_PER_SEC 1000000000ULL

/* ICMP types (linux/icmp.h pulls in libc headers a BPF build cannot use). */
#define ICMP_ECHOREPLY     0
#define ICMP_DEST_UNREACH  3
#define ICMP_ECHO          8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

/* Idle timeouts in seconds, set before load (cilium/ebpf Variables). An
 * entry idle for longer counts as free when a port is allocated, and the
 * garbage collector (nat.h) removes it. */
volatile const __u32 ct_timeout_tcp = 21600;     /* established TCP */
volatile const __u32 ct_timeout_tcp_syn = 60;    /* TCP without a reply yet */
volatile const __u32 ct_timeout_tcp_close = 10;  /* TCP after RST, or FIN both ways */
volatile const __u32 ct_timeout_udp = 60;
volatile const __u32 ct_timeout_icmp = 30;

/* last_seen is written at most once per this interval, so busy flows do not
 * bounce the entry's cache line between CPUs on every packet. */
#define CT_REFRESH_NS NSEC_PER_SEC

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_RST 0x04

/* l4: what the NAT needs of a packet's transport header. */
struct l4 {
	__u32 off;      /* offset of the L4 header in the frame */
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 nonfirst;  /* a non-first IPv4 fragment: no L4 header */
	__be16 sport;   /* TCP/UDP ports, network order */
	__be16 dport;
	__be16 icmp_id; /* ICMP echo identifier */
	__u32 tcp_seq;  /* TCP sequence and acknowledgment numbers, host order */
	__u32 tcp_ack;
};

enum l4_result {
	L4_OK = 0,
	L4_TRUNCATED,
};

/* parse_l4 reads the transport header of the IPv4 packet whose header is
 * ihl words long. It loads bytes with bpf_skb_load_bytes, which works on
 * non-linear skbs and needs no packet pointers. */
static __always_inline enum l4_result
parse_l4(struct __sk_buff *skb, __u8 proto, __u8 ihl, __be16 frag_off, struct l4 *l4)
{
	__u8 hdr[14];

	l4->proto = proto;
	l4->off = ETH_HLEN + ((__u32)ihl & 0xf) * 4; /* ihl is 4 bits: bounded for the verifier */
	l4->nonfirst = (frag_off & bpf_htons(0x1fff)) != 0;
	if (l4->nonfirst)
		return L4_OK;

	switch (proto) {
	case IPPROTO_TCP:
		if (bpf_skb_load_bytes(skb, l4->off, hdr, 14) < 0)
			return L4_TRUNCATED;
		l4->tcp_flags = hdr[13];
		l4->tcp_seq = ((__u32)hdr[4] << 24) | ((__u32)hdr[5] << 16) | ((__u32)hdr[6] << 8) | hdr[7];
		l4->tcp_ack = ((__u32)hdr[8] << 24) | ((__u32)hdr[9] << 16) | ((__u32)hdr[10] << 8) | hdr[11];
		break;
	case IPPROTO_UDP:
	case IPPROTO_SCTP: /* ports where UDP has them; policy matches SCTP ports (NAT does not translate SCTP) */
	case IPPROTO_ICMP:
		if (bpf_skb_load_bytes(skb, l4->off, hdr, 8) < 0)
			return L4_TRUNCATED;
		break;
	default:
		return L4_OK;
	}
	if (proto == IPPROTO_ICMP) {
		l4->icmp_type = hdr[0];
		__builtin_memcpy(&l4->icmp_id, &hdr[4], sizeof(l4->icmp_id));
	} else {
		__builtin_memcpy(&l4->sport, &hdr[0], sizeof(l4->sport));
		__builtin_memcpy(&l4->dport, &hdr[2], sizeof(l4->dport));
	}
	return L4_OK;
}

/* ct_timeout_ns is how long an entry of proto with flags may stay idle. */
static __always_inline __u64 ct_timeout_ns(__u8 proto, __u16 flags)
{
	__u32 s;

	switch (proto) {
	case IPPROTO_TCP:
		if ((flags & NAT_F_RST) ||
		    (flags & (NAT_F_FIN_POD | NAT_F_FIN_REMOTE)) == (NAT_F_FIN_POD | NAT_F_FIN_REMOTE))
			s = ct_timeout_tcp_close;
		else if (!(flags & NAT_F_SEEN_REPLY))
			s = ct_timeout_tcp_syn;
		else
			s = ct_timeout_tcp;
		break;
	case IPPROTO_UDP:
		s = ct_timeout_udp;
		break;
	default:
		s = ct_timeout_icmp;
	}
	return (__u64)s * NSEC_PER_SEC;
}

static __always_inline int ct_expired(__u64 last_seen, __u64 now, __u8 proto, __u16 flags)
{
	return now > last_seen && now - last_seen > ct_timeout_ns(proto, flags);
}

/* tcp_close_flags maps a TCP header's FIN/RST to the NAT flags of the
 * direction it travels (fin_flag: NAT_F_FIN_POD or NAT_F_FIN_REMOTE). */
static __always_inline __u16 tcp_close_flags(const struct l4 *l4, __u16 fin_flag)
{
	__u16 f = 0;

	if (l4->proto != IPPROTO_TCP)
		return 0;
	if (l4->tcp_flags & TCP_FLAG_FIN)
		f |= fin_flag;
	if (l4->tcp_flags & TCP_FLAG_RST)
		f |= NAT_F_RST;
	return f;
}

/* ct_touch refreshes last_seen (at most once per CT_REFRESH_NS) and adds
 * flags. Plain stores: a lost race only costs a second of lifetime or a
 * flag the next packet sets again. */
static __always_inline void ct_touch(struct nat_entry *e, __u64 now, __u16 flags)
{
	if (now > e->last_seen + CT_REFRESH_NS)
		e->last_seen = now;
	if ((e->flags | flags) != e->flags)
		e->flags |= flags;
}

#endif /* TERN_CONNTRACK_H */
