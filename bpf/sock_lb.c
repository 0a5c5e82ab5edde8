// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sock_lb.c: Tern's Service load balancer for the node's own processes
 * (services: "ebpf"; kubelet probes, hostNetwork pods, anything in the
 * node's network namespace). Their packets never cross a pod's veth, where
 * tern_from_pod translates pods' Service traffic, so the translation is
 * done on the socket instead, by cgroup v2 sock_addr programs attached at
 * the cgroup2 root (loader.AttachCgroup):
 *
 *  - tern_sock_connect4 (connect: TCP, connected UDP) and
 *    tern_sock_sendmsg4 (unconnected UDP): a destination that is a
 *    frontend in tern_lb_svc becomes a backend chosen by lb_select, the
 *    tc load balancer's own choice over the same maps (a hash of the
 *    socket cookie stands in for the flow hash: a socket's datagrams to a
 *    frontend keep their backend while the slots do). The backend is
 *    remembered per socket in tern_sock_rev;
 *  - tern_sock_recvmsg4 (UDP) and tern_sock_getpeername4: a source (peer)
 *    that tern_sock_rev knows for this socket becomes the frontend again,
 *    so a DNS client that checks where its answer came from accepts it;
 *  - a frontend without backends fails connect() and sendmsg() with
 *    ECONNREFUSED (bpf_set_retval, then return 0), what kube-proxy's
 *    REJECT rule gives (ICMP port unreachable); one that drops (traffic
 *    policy Local, no backend here) fails them with EPERM (the program's
 *    plain "no").
 *
 * Only sockets of the node's network namespace (tern_sock_config, written
 * by the plugin) are translated: attached at the root, the programs also
 * run for pods' processes, whose Service traffic tern_from_pod balances
 * with per-flow state, policy and hairpin handling, and for namespaces of
 * other networks (services "kube-proxy"), which are not Tern's to
 * translate. */

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "include/tern_types.h"
#include "lib/maps.h"
#include "lib/lb_select.h"

#define SOCK_ECONNREFUSED 111

/* sock_rev_key: key of tern_sock_rev: a socket and the backend it was
 * sent to. Socket cookies are never reused, so an entry cannot outlive
 * its meaning; the map is an LRU for the sockets that are gone. */
struct sock_rev_key {
	__u64 cookie;
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* sock_config: value of tern_sock_config. */
struct sock_config {
	__u64 netns_cookie; /* the node's network namespace; 0: translate nowhere */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_rev_key);
	__type(value, struct lb_backend); /* the frontend */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_sock_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sock_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_sock_config SEC(".maps");

/* Put the types in BTF for bpf2go (-type); programs never read these. */
const volatile struct sock_rev_key tern_btf_sock_rev_key = {};
const volatile struct sock_config tern_btf_sock_config = {};

static __always_inline int sock_in_node(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct sock_config *c = bpf_map_lookup_elem(&tern_sock_config, &zero);

	return c && c->netns_cookie && c->netns_cookie == bpf_get_netns_cookie(ctx);
}

static __always_inline __u32 sock_hash(__u64 cookie)
{
	/* Fibonacci hashing: sequential cookies spread over the slots. */
	return (__u32)((cookie * 0x9E3779B97F4A7C15ULL) >> 32);
}

/* sock_translate rewrites a destination that is a Service frontend to its
 * backend. Returns 1 (go on) or 0 (refuse; the errno set). */
static __always_inline int sock_translate(struct bpf_sock_addr *ctx)
{
	struct lb_svc_key fk = {};
	struct sock_rev_key rk = {};
	struct lb_affinity na;
	struct lb_backend b, fe;
	struct node_config *nc;
	struct lb_svc *svc;
	__be32 client = 0;
	__u32 zero = 0;
	__u64 cookie;
	__u8 proto;

	proto = ctx->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	if (!sock_in_node(ctx))
		return 1;
	fk.addr = ctx->user_ip4;
	fk.port = (__be16)ctx->user_port;
	fk.proto = proto;
	svc = bpf_map_lookup_elem(&tern_lb_svc, &fk);
	if (!svc)
		return 1;
	/* ClientIP affinity: the node's processes are one client, the node's
	 * address (no source is chosen yet at connect). */
	nc = bpf_map_lookup_elem(&tern_config, &zero);
	if (nc)
		client = nc->node_ip;
	cookie = bpf_get_socket_cookie(ctx);
	if (lb_select(svc, client, bpf_ktime_get_ns(), sock_hash(cookie), &b, &na) < 0) {
		if (!(svc->flags & LB_SVC_F_DROP))
			bpf_set_retval(-SOCK_ECONNREFUSED);
		return 0;
	}
	rk.cookie = cookie;
	rk.addr = b.addr;
	rk.port = b.port;
	rk.proto = proto;
	fe.addr = fk.addr;
	fe.port = fk.port;
	fe.pad = 0;
	/* Best effort: without it a UDP answer shows the backend's address,
	 * the connection itself works. */
	bpf_map_update_elem(&tern_sock_rev, &rk, &fe, BPF_ANY);
	ctx->user_ip4 = b.addr;
	ctx->user_port = (__u32)b.port;
	return 1;
}

/* sock_reverse gives a peer address the socket reached through a frontend
 * the frontend's address back. Always 1: these hooks cannot refuse. */
static __always_inline int sock_reverse(struct bpf_sock_addr *ctx)
{
	struct sock_rev_key rk = {};
	struct lb_backend *fe;

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = (__be16)ctx->user_port;
	rk.proto = ctx->protocol;
	fe = bpf_map_lookup_elem(&tern_sock_rev, &rk);
	if (fe) {
		ctx->user_ip4 = fe->addr;
		ctx->user_port = (__u32)fe->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int tern_sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx);
}

SEC("cgroup/sendmsg4")
int tern_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx);
}

SEC("cgroup/recvmsg4")
int tern_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx);
}

SEC("cgroup/getpeername4")
int tern_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock_reverse(ctx);
}

char __license[] SEC("license") = "Dual BSD/GPL";
