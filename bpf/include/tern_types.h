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
	/* The pod's network has ipMasq: its traffic to destinations outside
	 * tern_nomasq is masqueraded to the node IP. Per endpoint, so that
	 * networks sharing a node can differ. */
	ENDPOINT_F_MASQ = 1 << 0,
	/* The pod's network has services: "ebpf": Tern's own Service load
	 * balancer (lib/lb.h) translates what it sends to a Service. */
	ENDPOINT_F_LB = 1 << 1,
	/* Shaped: the pod has bandwidth limits (runtimeConfig.bandwidth), its
	 * traffic goes through the host veth's qdiscs, i.e. the host stack,
	 * both ways (lib/shaped.h). */
	ENDPOINT_F_SHAPED = 1 << 2,
};

/* node_config: the single entry of tern_config, written by the plugin on
 * every ADD. A map rather than load-time constants because the uplink and
 * its address may change while programs stay loaded. */
struct node_config {
	__be32 node_ip;        /* SNAT source: first IPv4 address of the uplink; 0 disables SNAT */
	__u32 uplink_ifindex;  /* interface SNATed traffic must leave by; 0 = none */
};

/* remote_node: value of tern_remote, keyed (lpm_v4_key) by another node's
 * pod CIDR. Written by the routing reconciler (package routing), never by
 * the programs. */
struct remote_node {
	__be32 node_ip;         /* the node's InternalIP: next hop (native) or tunnel remote (VXLAN) */
	__u32 tunnel_ifindex;   /* VXLAN device (external mode) to redirect to; 0 = native routing */
	/* Native routing: the FIB's last answer for this node's pods, kept
	 * by tern_from_pod until fib_until (bpf_ktime_get_coarse_ns), see
	 * lib/remote.h. Package routing writes zeros (nothing cached). */
	__u32 fib_ifindex;      /* interface the FIB chose */
	__be32 fib_nh;          /* its next hop (the gateway, or the pod when on-link) */
	__u32 fib_mtu;          /* that interface's MTU */
	__u32 fib_pad;
	__u64 fib_until;        /* 0: nothing cached */
};

/* lpm_v4_key: key of tern_nomasq (LPM trie of destinations that keep the
 * pod's source address: cluster CIDR and nonMasqueradeCIDRs). */
struct lpm_v4_key {
	__u32 prefixlen;
	__be32 addr;
};

/* nat_tuple: a flow as one direction sees it. Key of both NAT maps:
 *  - tern_nat: the flow as the pod sent it (saddr = pod, daddr = remote);
 *  - tern_nat_rev: the reply as it arrives on the uplink (saddr = remote,
 *    daddr = node IP, dport = NAT port).
 * For ICMP echo the identifier takes the place of the pod/NAT port and the
 * remote port is 0. */
struct nat_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* nat_entry: value of both NAT maps. In tern_nat, addr/port is the
 * translated source (node IP, NAT port); in tern_nat_rev, the original pod
 * address and port the reply is translated back to. */
struct nat_entry {
	__u64 last_seen; /* bpf_ktime_get_ns of the last packet; compare-and-swapped when a port is reclaimed */
	__be32 addr;
	__be16 port;
	__u16 flags;     /* enum nat_flags */
};

/* nat_key: the single entry of tern_nat_key, the node's secret for the
 * NAT port choice (SipHash-2-4 key), random per node, written once when the
 * map is created. Without it the port a flow gets would be predictable from
 * its tuple. */
struct nat_key {
	__u64 k0;
	__u64 k1;
};

enum nat_flags {
	NAT_F_INBOUND = 1 << 0,    /* tern_nat only: opened from outside to the pod's own IP: never translated */
	NAT_F_SEEN_REPLY = 1 << 1, /* a reply came back */
	NAT_F_FIN_POD = 1 << 2,    /* TCP FIN from the pod */
	NAT_F_FIN_REMOTE = 1 << 3, /* TCP FIN from the remote */
	NAT_F_RST = 1 << 4,        /* TCP RST either way */
};

/* metric: index into the per-CPU metrics array. Forwarding outcomes first,
 * then drop reasons; Go prints them by name (bpf2go -type metric). New
 * values go before METRIC_MAX: Go's name table follows this order. */
enum metric {
	METRIC_REDIRECT_PEER = 0, /* delivered into a pod of this node by bpf_redirect_peer */
	METRIC_PASS_HOST,         /* handed to the host stack (off-node without SNAT, host, FIB says so) */
	METRIC_PASS_NON_IPV4,     /* ARP from a pod about itself (other non-IPv4 frames: METRIC_DROP_NON_IPV4) */
	METRIC_PASS_TTL,          /* TTL would expire: let the stack send ICMP */
	METRIC_DROP_TRUNCATED,    /* frame too short for the headers it claims */
	METRIC_DROP_SPOOFED,      /* source IP or MAC is not the sending pod's */
	METRIC_DROP_REDIRECT,     /* a helper on the forwarding path failed */
	METRIC_SNAT,              /* masqueraded to the node IP and sent out of the uplink */
	METRIC_REV_SNAT,          /* reply (or ICMP error) of a masqueraded flow, delivered to the pod */
	METRIC_PASS_UPLINK,       /* uplink ingress: not for a pod, left to the host stack */
	METRIC_DROP_NAT_NO_PORT,  /* masquerade needed, every probed NAT port was taken */
	METRIC_DROP_NAT_MAP_FULL, /* masquerade needed, a NAT map refused the entry */
	METRIC_DROP_NAT_UNSUPPORTED, /* masquerade needed for a protocol or fragment NAT cannot handle */
	METRIC_DROP_POLICY_INGRESS, /* NetworkPolicy: the destination pod's ingress rules deny the flow */
	METRIC_DROP_POLICY_EGRESS,  /* NetworkPolicy: the source pod's egress rules deny the flow */
	METRIC_PASS_TO_POD,         /* tc egress of a pod's veth: what the host stack delivers, let through */
	METRIC_DROP_NON_IPV4,       /* pod veth: neither IPv4 nor ARP (IPv6, VLAN-tagged, other ethertypes) */
	METRIC_DROP_ARP_SPOOFED,    /* ARP from a pod whose sender MAC or IP is not its own, or not Ethernet/IPv4 */
	METRIC_DROP_LOOPBACK,       /* from a pod to 127.0.0.0/8: martian, reachable only through route_localnet */
	METRIC_DROP_REV_TTL,        /* uplink: reply of a masqueraded flow whose TTL expires on the hop into the pod */
	METRIC_DROP_NAT_NO_ROUTE,   /* masquerade needed, but the FIB failed or routes it out of another interface than the uplink */
	METRIC_DROP_NAT_TOO_BIG,    /* masquerade needed, larger than the uplink's MTU and DF clear (cannot be fragmented after NAT) */
	METRIC_DROP_NAT_ICMP,       /* ICMP from a pod that masquerade cannot translate (error about no masqueraded flow, other types) */
	METRIC_NAT_REV_LOST,        /* a flow's reverse NAT entry was gone or another flow's: re-allocated (should stay 0) */
	METRIC_NAT_GC,              /* expired NAT entries removed by the garbage collector (packets = entries) */
	METRIC_PASS_SERVICE,        /* to a Service CIDR: left to the host stack (kube-proxy) undecided */
	METRIC_PASS_STACK_REPLY,    /* answer of a flow the host stack delivered: back through the stack */
	METRIC_DROP_SVC_NO_DNAT, /* uplink egress: a pod's packet to a Service CIDR nothing translated */
	METRIC_REMOTE_NATIVE,       /* to a pod of another node: FIB lookup and bpf_redirect_neigh out of the uplink (native routing) */
	METRIC_REMOTE_VXLAN,        /* to a pod of another node: tunnel key set, redirected to the VXLAN device */
	METRIC_FROM_REMOTE,         /* from a pod of another node (uplink or VXLAN), delivered into a pod of this node by bpf_redirect_peer */
	METRIC_DROP_TUNNEL_FORGED,  /* VXLAN: no tunnel key, or the outer source is not the node that owns the inner source's pod CIDR */
	METRIC_DROP_TUNNEL_NO_POD,  /* VXLAN: decapsulated, but neither for a pod of this node nor for the node's own address */
	METRIC_TUNNEL_TO_HOST,      /* VXLAN: from another node's pod, for this node's own address: to the host stack */
	METRIC_LB_DNAT,          /* services "ebpf": a pod's packet to a Service translated to a backend */
	METRIC_LB_REV_NAT,       /* services "ebpf": a backend's answer translated back to the Service address */
	METRIC_LB_HAIRPIN,       /* services "ebpf": a pod reaching itself through its Service, through the loopback address */
	METRIC_LB_REJECT,        /* services "ebpf": a Service without endpoints, answered with ICMP port unreachable */
	METRIC_DROP_LB_NO_LOCAL, /* services "ebpf": traffic policy Local and no backend on this node */
	METRIC_DROP_LB,          /* services "ebpf": translation failed (helper error, map full, unknown hairpin answer) */
	METRIC_DROP_POLICY_RST,  /* TCP RST of a tracked flow whose sequence number is out of window (forged) */
	METRIC_DROP_POLICY_CT_QUOTA, /* new flow of a pod that opened its share of flows this minute (policy_ct_pod_flows) */
	METRIC_PASS_SHAPED, /* to or from a pod with bandwidth limits: handed to the host stack, through the host veth's qdiscs */
	METRIC_LB_XDP_DNAT, /* services "ebpf": a NodePort / external IP packet translated at the uplink's XDP (nodePortAcceleration) */
	METRIC_REMOTE_STACK_REPLY, /* from another node's pod: an answer to a flow the host stack translated (kube-proxy), handed to the stack */
	METRIC_LB_SNAT_REMOTE, /* services "ebpf": a client outside the node sent to a backend on another node, SNATed to the node address */
	METRIC_MAX,
};

/* NetworkPolicy. The three policy maps hold a compiled rule set
 * (policy/compile: ruleset.go's package doc is the lookup specification,
 * layout.go the byte layouts, written from Go with compile's MarshalBinary
 * so that the two cannot drift; a test checks these structs against it). */

/* ep_policy: value of tern_ep_policy, keyed by a local pod's IPv4 address
 * (network order). Layout of compile.EndpointPolicy. */
struct ep_policy {
	__u32 local_id; /* local identity: the pod's equivalence class in tern_policy keys */
	__u32 flags;    /* enum ep_policy_flags */
};

enum ep_policy_flags {
	EP_POLICY_F_INGRESS = 1 << 0, /* isolated for ingress: what it receives is checked */
	EP_POLICY_F_EGRESS = 1 << 1,  /* isolated for egress: what it sends is checked */
};

/* Reserved remote classes and key values (compile.ClassWorld, ClassHost,
 * ClassAny, ProtoAny, Ingress, Egress, VerdictAllow). */
enum policy_class {
	POLICY_CLASS_WORLD = 0,          /* no tern_ipcache entry: not a pod, in no ipBlock */
	POLICY_CLASS_HOST = 1,           /* an address of this node inside no ipBlock */
	POLICY_CLASS_ANY = 0xffffffffu,  /* key wildcard: any remote */
};

enum policy_dir {
	POLICY_DIR_INGRESS = 0,
	POLICY_DIR_EGRESS = 1,
};

enum policy_verdict {
	POLICY_VERDICT_ALLOW = 1, /* the only verdict: policy is allow-only, a miss denies */
};

#define POLICY_PROTO_ANY 0 /* key wildcard: any protocol (with 0 port bits) */

/* policy_key: key of tern_policy, an LPM trie over the 96 bits after
 * prefixlen. prefixlen is 80 + the port bits of the entry; lookups use 96.
 * 16 bytes, compile.PolicyKey's encoding: the two identities sit at offsets
 * 6 and 10, unaligned, so they are byte arrays holding a host-order __u32
 * (memcpy in and out) rather than a packed struct, which bpf2go's Go type
 * could not reproduce. */
struct policy_key {
	__u32 prefixlen;
	__u8 dir;              /* enum policy_dir */
	__u8 proto;            /* IPPROTO_*, POLICY_PROTO_ANY */
	__u8 local_id[4];      /* ep_policy.local_id of the local end */
	__u8 remote_class[4];  /* tern_ipcache class of the remote end, or POLICY_CLASS_ANY */
	__be16 dport;          /* destination port, network order: port ranges are prefixes */
};

/* policy_value: value of tern_policy. */
struct policy_value {
	__u8 verdict; /* enum policy_verdict */
	__u8 pad[3];
};

/* policy_ct_key: key of tern_policy_ct, the conntrack that lets a flow's
 * later packets, and its replies, pass without a policy decision. Both
 * directions of a flow share one key: the end with the lower (address,
 * port) is "lo", whoever sends. ICMP echo requests and replies carry the
 * identifier in both ports, so that they too are one flow. */
struct policy_ct_key {
	__be32 lo_addr;
	__be32 hi_addr;
	__be16 lo_port;
	__be16 hi_port;
	__u8 proto;
	__u8 pad[3];
};

/* policy_ct_entry: value of tern_policy_ct and tern_policy_ct_other. */
struct policy_ct_entry {
	__u64 last_seen; /* bpf_ktime_get_ns, refreshed at most once a second */
	__u16 flags;     /* enum policy_ct_flags */
	/* TCP: the upper 16 bits of the last sequence number seen from the
	 * originator ([0]) and the responder ([1]), valid with
	 * POLICY_CT_F_SEQ_ORIG / _REPLY: enough to tell a plausible RST
	 * (within POLICY_CT_RST_WINDOW) from a forged one. */
	__u16 seq_hi[2];
	__u8 pad[2];
};

enum policy_ct_flags {
	POLICY_CT_F_ORIG_HI = 1 << 0,    /* the flow's first packet came from the key's hi end */
	POLICY_CT_F_SEEN_REPLY = 1 << 1, /* a packet came back the other way */
	POLICY_CT_F_FIN_ORIG = 1 << 2,   /* TCP FIN from the originator */
	POLICY_CT_F_FIN_REPLY = 1 << 3,  /* TCP FIN from the responder */
	POLICY_CT_F_RST = 1 << 4,        /* TCP RST either way */
	POLICY_CT_F_SEQ_ORIG = 1 << 5,   /* seq_hi[0] holds the originator's sequence */
	POLICY_CT_F_SEQ_REPLY = 1 << 6,  /* seq_hi[1] holds the responder's sequence */
	/* tern_stack_ct had no entry for the flow when a packet of it was
	 * checked (lib/stack.h stack_owned), and none was written since
	 * (stack_note_delivered clears it): its later packets skip that
	 * lookup. Flows the host stack delivered never get it. */
	POLICY_CT_F_NO_STACK = 1 << 7,
};

/* policy_frag_key: key of tern_policy_frag. A non-first IPv4 fragment has
 * no ports; the first fragment of a datagram that passed leaves them here,
 * under the fields that identify the datagram (RFC 791). */
struct policy_frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

/* policy_frag_ports: value of tern_policy_frag. */
struct policy_frag_ports {
	__be16 sport;
	__be16 dport;
};

/* Tern's Service load balancer (services: "ebpf", lib/lb.h). */

/* lb_svc_key: key of tern_lb_svc, a frontend: (address, port, protocol). */
struct lb_svc_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* lb_svc: value of tern_lb_svc. */
struct lb_svc {
	__u32 id;               /* rev-NAT id (tern_lb_rev) and the backend slots' namespace */
	__u32 count;            /* backend slots 0..count-1 in tern_lb_backends; 0: none */
	__u32 affinity_timeout; /* ClientIP session affinity, seconds; 0: none */
	__u32 flags;            /* enum lb_svc_flags */
};

enum lb_svc_flags {
	LB_SVC_F_DROP = 1 << 0, /* without backends: drop (traffic policy Local, none here) instead of rejecting */
};

/* lb_slot_key: key of tern_lb_backends. */
struct lb_slot_key {
	__u32 id;
	__u32 slot;
};

/* lb_backend: value of tern_lb_backends, and of tern_lb_rev (the frontend
 * a rev-NAT id translates answers back to). */
struct lb_backend {
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/* lb_ct_entry: value of tern_lb_ct, keyed by struct nat_tuple:
 *  - forward (the flow as the client sent it, to the frontend): the
 *    backend it is pinned to;
 *  - reply (LB_CT_F_REPLY; the backend's answer as it sends it): the
 *    client's address and port the answer goes to (for a hairpin, the pod
 *    behind the loopback address), or, with LB_CT_F_FRONTEND, the
 *    frontend the answer comes from (the client's address and port are
 *    the key's destination then): lb_reply rewrites the source without
 *    looking the frontend up in tern_lb_rev, one hash lookup less per
 *    answer packet. */
struct lb_ct_entry {
	__u64 last_seen;
	__be32 addr;
	__be16 port;
	__u16 flags;  /* enum lb_ct_flags */
	__u32 rev_id; /* frontend id */
	/* forward entry of a flow from outside the node to a backend on
	 * another node (lib/lb_remote.h): the node-address source port it is
	 * SNATed to (network order; 0 until chosen) */
	__be16 snat_port;
	__u16 pad;
};

/* Above the NAT_F_* bits, which lb_ct_entry.flags also carries (FIN, RST:
 * the timeouts of lib/conntrack.h). */
enum lb_ct_flags {
	LB_CT_F_REPLY = 1 << 8,
	LB_CT_F_HAIRPIN = 1 << 9,
	LB_CT_F_EXTERNAL = 1 << 10, /* reply entry: the client is outside the node (came in by the uplink) */
	LB_CT_F_SNAT = 1 << 11,     /* reply entry keyed by the node address and its SNAT port (lib/lb_remote.h) */
	LB_CT_F_FRONTEND = 1 << 12, /* reply entry: addr and port are the frontend's, not the client's */
};

/* lb_affinity_key: key of tern_lb_affinity (ClientIP session affinity). */
struct lb_affinity_key {
	__be32 client;
	__u32 id;
};

/* lb_affinity: value of tern_lb_affinity. */
struct lb_affinity {
	__u64 last_seen;
	__be32 addr;
	__be16 port;
	__u16 pad;
};

/* policy_ct_quota: value of tern_policy_ct_quota, the flows a local pod
 * opened in the current period, per conntrack map. */
struct policy_ct_quota {
	__u64 period_start; /* bpf_ktime_get_coarse_ns */
	__u32 tcp;          /* new tern_policy_ct entries */
	__u32 other;        /* new tern_policy_ct_other entries */
};

/* metric_value: one per-CPU slot of the metrics array. */
struct metric_value {
	__u64 packets;
	__u64 bytes;
};

/* Datapath events (lib/events.h): records of tern_events, the ring buffer
 * `ternctl monitor` reads. */
enum event_kind {
	EVENT_DROP = 1,   /* a drop, counted under reason (enum metric) */
	EVENT_POLICY = 2, /* a NetworkPolicy decision on the first packet of a flow */
	EVENT_TRACE = 3,  /* a forwarding outcome, counted under reason (enum metric) */
};

enum event_verdict {
	EVENT_VERDICT_ALLOW = 1,
	EVENT_VERDICT_DENY = 2,
};

/* event: one record of tern_events. The addresses and ports are read from
 * the packet as it is when the event is sent (after a SNAT: translated). */
struct event {
	__u64 ts_ns;         /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u32 ifindex;       /* interface the program runs on */
	__u32 len;           /* packet length */
	__u8 type;           /* enum event_kind */
	__u8 proto;          /* IP protocol; 0 when not IPv4 */
	__u16 reason;        /* EVENT_DROP, EVENT_TRACE: enum metric */
	__u8 dir;            /* EVENT_POLICY: enum policy_dir decided */
	__u8 verdict;        /* EVENT_POLICY: enum event_verdict */
	__be16 eth_proto;    /* ethertype */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;        /* ICMP echo: the identifier in both */
	__be16 dport;
	__u32 local_id;      /* EVENT_POLICY: identity of the pod whose policy decided */
	__u32 remote_class;  /* EVENT_POLICY: class (identity) of the other end */
	__u32 pad;
};

/* event_config: the single entry of tern_event_config. All zero is the
 * default: drops and policy denials on, policy allows and traces off, at
 * EVENT_DEFAULT_RATE per CPU. */
struct event_config {
	__u32 flags; /* enum event_flags */
	__u32 rate;  /* events per second per CPU; 0: EVENT_DEFAULT_RATE */
	__u32 burst; /* events a CPU may send at once; 0: EVENT_DEFAULT_BURST */
	__u32 pad;
};

enum event_flags {
	EVENT_F_NO_DROP = 1 << 0,        /* no EVENT_DROP */
	EVENT_F_NO_POLICY_DENY = 1 << 1, /* no EVENT_POLICY denials */
	EVENT_F_POLICY_ALLOW = 1 << 2,   /* EVENT_POLICY for allowed flows too */
	EVENT_F_TRACE = 1 << 3,          /* EVENT_TRACE */
};

/* event_limiter: per-CPU token bucket of tern_event_limiter, and what
 * became of the events it was asked for. */
struct event_limiter {
	__u64 last_ns;    /* when credit_ns was last updated */
	__u64 credit_ns;  /* time credit: each event costs 1 s / rate */
	__u64 sent;       /* written to the ring buffer */
	__u64 suppressed; /* over the rate: not sent */
	__u64 lost;       /* the ring buffer was full */
};

#endif /* TERN_TYPES_H */
