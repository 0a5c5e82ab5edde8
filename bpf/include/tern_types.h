/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Structs and enums shared between the BPF programs and Go (bpf2go -type). */
#ifndef TERN_TYPES_H
#define TERN_TYPES_H

#include <linux/types.h>

#define ETH_ALEN 6

/* endpoint: one pod interface on this node, keyed by the pod's IPv4 address
 * (network byte order). Written by the CNI plugin on ADD, removed on DEL. */
struct endpoint {
	__u32 ifindex;            /* host-side veth ifindex: target of bpf_redirect_peer */
	__u32 identity;           /* policy identity (0 until policy assigns one) */
	__u8 pod_mac[ETH_ALEN];   /* MAC of the pod's eth0 */
	__u8 host_mac[ETH_ALEN];  /* MAC of the host-side veth: the pod's gateway MAC */
	__u32 flags;              /* enum endpoint_flags */
};

enum endpoint_flags {
	ENDPOINT_F_NONE = 0,
};

/* metric: index into the per-CPU metrics array. Forwarding outcomes first,
 * then drop reasons; Go prints them by name (bpf2go -type metric). */
enum metric {
	METRIC_REDIRECT_PEER = 0, /* same-node pod to pod, delivered by bpf_redirect_peer */
	METRIC_PASS_HOST,         /* handed to the host stack (off-node, host, unknown dst) */
	METRIC_PASS_NON_IPV4,     /* ARP, IPv6 and other non-IPv4 frames */
	METRIC_PASS_TTL,          /* TTL would expire: let the stack send ICMP */
	METRIC_DROP_TRUNCATED,    /* frame too short for the headers it claims */
	METRIC_DROP_SPOOFED,      /* source IP or MAC is not the sending pod's */
	METRIC_DROP_REDIRECT,     /* a helper on the forwarding path failed */
	METRIC_MAX,
};

/* metric_value: one per-CPU slot of the metrics array. */
struct metric_value {
	__u64 packets;
	__u64 bytes;
};

#endif /* TERN_TYPES_H */
