/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the datapath. All are pinned by name under the node's bpffs
 * directory, so state outlives the CNI process and survives program reloads,
 * and every object that includes this header shares the same maps. */
#ifndef TERN_MAPS_H
#define TERN_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "../include/tern_types.h"

#define TERN_MAX_ENDPOINTS 65536
#define TERN_METRIC_SLOTS 64
/* Masqueraded flows per direction: the size the objects are built with.
 * The plugin sizes the maps from the network config's natMemoryMiB before
 * they are created (datapath/ebpf NAT.MapEntries). */
#define TERN_MAX_NAT 65536
#define TERN_MAX_NOMASQ 256
/* Pod CIDRs of other nodes: a few per node. */
#define TERN_MAX_REMOTE 16384
/* NetworkPolicy. One policy rule becomes a few tern_policy entries (port
 * ranges split into prefix-aligned blocks, one entry per matching remote
 * class): room for well over 10,000 rules. The LPM tries allocate on
 * insert (BPF_F_NO_PREALLOC), so their size is a limit, not a cost. */
#define TERN_MAX_IPCACHE 65536
#define TERN_MAX_POLICY 262144
/* Tracked flows of pods with policy state (both directions in one entry).
 * LRU: under pressure the least recently used flows go first, and their
 * next packet is simply checked again. */
#define TERN_MAX_POLICY_CT 131072
#define TERN_MAX_POLICY_FRAG 8192
/* kube-proxy coexistence (stack.h): Service CIDRs, and flows the host stack
 * delivered into a pod whose replies must go back through it. LRU: an
 * evicted flow's replies take the fast path again, so it is sized like the
 * policy conntrack. */
#define TERN_MAX_SERVICE_CIDRS 64
#define TERN_MAX_STACK_CT 131072

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_ENDPOINTS);
	__type(key, __u32); /* pod IPv4, network byte order */
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	/* Room beyond METRIC_MAX: a new counter must not change the map's
	 * definition, or a node's pinned map would be incompatible on upgrade. */
	__uint(max_entries, TERN_METRIC_SLOTS);
	__type(key, enum metric);
	__type(value, struct metric_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_metrics SEC(".maps");

/* tern_config: one node_config at index 0. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_config SEC(".maps");

/* Datapath events (lib/events.h). Pinned like the rest: the ring buffer is
 * read by `ternctl monitor`, the config written by `ternctl monitor` and
 * the plugin. */
#define TERN_EVENTS_RINGBUF (256 * 1024)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TERN_EVENTS_RINGBUF);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_events SEC(".maps");

/* tern_event_config: one event_config at index 0 (all zero: defaults). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct event_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_event_config SEC(".maps");

/* tern_event_limiter: the per-CPU token bucket of event emission. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct event_limiter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_event_limiter SEC(".maps");

/* tern_nomasq: destinations pods reach with their own address. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TERN_MAX_NOMASQ);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nomasq SEC(".maps");

/* tern_remote: pod CIDR of another node -> that node (lib/remote.h). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TERN_MAX_REMOTE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4_key);
	__type(value, struct remote_node);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_remote SEC(".maps");

/* tern_nat: pod-side tuple -> translated source (node IP, NAT port).
 *
 * Both NAT maps are plain hashes, not LRU: an LRU map evicts an entry to
 * make room for any insert, even one BPF_NOEXIST then refuses, so a live
 * flow's reverse entry could vanish and its NAT port be handed to another
 * pod's flow, which would then receive the first flow's replies. A plain
 * hash refuses an insert when full (counted as drop_nat_map_full) and
 * never drops a live entry; expired pairs are removed by the garbage
 * collector (tern_nat_gc_timer below, nat_gc in lib/nat.h) and reclaimed by the
 * port allocator. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_NAT);
	__type(key, struct nat_tuple);
	__type(value, struct nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nat SEC(".maps");

/* tern_nat_rev: reply tuple on the uplink -> original pod address and port.
 * Its keys are what makes a NAT port taken: one entry per (remote address,
 * remote port, protocol, NAT port). A plain hash, as tern_nat. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_NAT);
	__type(key, struct nat_tuple);
	__type(value, struct nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nat_rev SEC(".maps");

/* tern_nat_key: the node's secret key for the NAT port choice, one
 * struct nat_key at index 0 (random, written when the map is created). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nat_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nat_key SEC(".maps");

/* nat_gc_timer: value of tern_nat_gc_timer. */
struct nat_gc_timer {
	struct bpf_timer timer;
};

/* tern_nat_gc_timer: the NAT garbage collector's timer, armed by the plugin
 * (program tern_nat_gc): it lives as long as the pinned map, so expired
 * NAT pairs are removed while no Tern process runs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nat_gc_timer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nat_gc_timer SEC(".maps");

/* tern_ep_policy: local pod IPv4 -> its policy (compile.RuleSet.Endpoints).
 * No entry: the pod has no policy state, nothing is decided or tracked. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_ENDPOINTS);
	__type(key, __u32); /* pod IPv4, network byte order */
	__type(value, struct ep_policy);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_ep_policy SEC(".maps");

/* tern_ipcache: IPv4 prefix -> remote class (compile.RuleSet.IPCache). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TERN_MAX_IPCACHE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_ipcache SEC(".maps");

/* tern_policy: (direction, protocol, local identity, remote class, port
 * prefix) -> verdict (compile.RuleSet.Policy). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TERN_MAX_POLICY);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy SEC(".maps");

/* tern_policy_ct: TCP flows of local pods (whose first packet passed
 * policy). TCP alone: a spray of UDP flows, whose entries nothing closes,
 * cannot evict them from the LRU. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_POLICY_CT);
	__type(key, struct policy_ct_key);
	__type(value, struct policy_ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_ct SEC(".maps");

/* tern_policy_ct_other: the same for UDP, ICMP, SCTP and the rest. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_POLICY_CT);
	__type(key, struct policy_ct_key);
	__type(value, struct policy_ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_ct_other SEC(".maps");

/* tern_policy_ct_quota: local pod IPv4 -> flows it opened this period
 * (policy.h, policy_ct_charge). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_ENDPOINTS);
	__type(key, __u32); /* pod IPv4, network byte order */
	__type(value, struct policy_ct_quota);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_ct_quota SEC(".maps");

/* tern_policy_frag: ports of fragmented datagrams that passed policy. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_POLICY_FRAG);
	__type(key, struct policy_frag_key);
	__type(value, struct policy_frag_ports);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_policy_frag SEC(".maps");

/* tern_service_cidrs: destinations kube-proxy translates (serviceCIDR):
 * pods' traffic to them goes to the host stack untouched. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TERN_MAX_SERVICE_CIDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_service_cidrs SEC(".maps");

/* tern_stack_ct: flows the host stack delivered into a pod (DNATed by
 * kube-proxy or a hostPort rule, or from a local pod), keyed like
 * tern_policy_ct: the pod's answers go back through the stack, whose
 * conntrack translates them back. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_STACK_CT);
	__type(key, struct policy_ct_key);
	__type(value, struct policy_ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_stack_ct SEC(".maps");

/* Tern's Service load balancer (services: "ebpf", lib/lb.h). Frontends and
 * backend slots are written by the plugin by difference from the compiled
 * Service table (datapath/ebpf/lb.go); the conntrack and affinity maps by
 * the programs. TERN_MAX_LB_SLOTS: sum over frontends of their backends. */
#define TERN_MAX_LB_SERVICES 65536
#define TERN_MAX_LB_SLOTS 262144
#define TERN_MAX_LB_CT 262144
#define TERN_MAX_LB_AFFINITY 65536

/* tern_lb_svc: frontend (address, port, protocol) -> service. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_LB_SERVICES);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_svc SEC(".maps");

/* tern_lb_backends: (frontend id, slot) -> backend. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_LB_SLOTS);
	__type(key, struct lb_slot_key);
	__type(value, struct lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_backends SEC(".maps");

/* tern_lb_rev: frontend id -> frontend address and port (rev-NAT). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_LB_SERVICES);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_rev SEC(".maps");

/* tern_lb_ct: per-flow conntrack of the load balancer, both directions
 * (struct lb_ct_entry). LRU: an evicted flow is balanced again on its
 * next packet (its backend stays the same while the slots do). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_LB_CT);
	__type(key, struct nat_tuple);
	__type(value, struct lb_ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_ct SEC(".maps");

/* tern_lb_empty: index 0 is nonzero while tern_lb_svc is known to hold no
 * frontend at all (kube-proxy mode, or no Service): the uplink program then
 * skips the per-packet frontend lookup (lib/lb.h, lb_no_frontends). Written
 * by the Services apply path only (datapath/ebpf ApplyLBTable, under its
 * lock): set after the last frontend is deleted, cleared before the first
 * one is written. Zero, what a new map holds (a fresh node, or objects
 * upgraded over pinned frontends), means "look", so a stale or missing
 * flag costs a lookup, never a frontend. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_empty SEC(".maps");

/* tern_lb_affinity: (client, frontend id) -> backend, ClientIP affinity. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_LB_AFFINITY);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_lb_affinity SEC(".maps");

/* The flag enums only ever travel in integer fields, so nothing would put
 * them in BTF, where bpf2go -type looks for them: these constants do.
 * Programs never read them. */
const volatile enum endpoint_flags tern_btf_endpoint_flags = ENDPOINT_F_NONE;
const volatile enum lb_svc_flags tern_btf_lb_svc_flags = 0;
const volatile enum lb_ct_flags tern_btf_lb_ct_flags = 0;
const volatile enum nat_flags tern_btf_nat_flags = 0;
const volatile enum ep_policy_flags tern_btf_ep_policy_flags = 0;
const volatile enum policy_ct_flags tern_btf_policy_ct_flags = 0;
const volatile enum policy_class tern_btf_policy_class = POLICY_CLASS_WORLD;
const volatile enum policy_dir tern_btf_policy_dir = POLICY_DIR_INGRESS;
const volatile enum policy_verdict tern_btf_policy_verdict = POLICY_VERDICT_ALLOW;
const volatile enum event_kind tern_btf_event_kind = EVENT_DROP;
const volatile enum event_verdict tern_btf_event_verdict = EVENT_VERDICT_ALLOW;
const volatile enum event_flags tern_btf_event_flags = 0;

#endif /* TERN_MAPS_H */
