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
/* Masqueraded flows per direction. LRU: under pressure the least recently
 * used flows go first; the port allocator copes with either half missing. */
#define TERN_MAX_NAT 65536
#define TERN_MAX_NOMASQ 256

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TERN_MAX_ENDPOINTS);
	__type(key, __u32); /* pod IPv4, network byte order */
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, METRIC_MAX);
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

/* tern_nomasq: destinations pods reach with their own address. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TERN_MAX_NOMASQ);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct lpm_v4_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nomasq SEC(".maps");

/* tern_nat: pod-side tuple -> translated source (node IP, NAT port). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_NAT);
	__type(key, struct nat_tuple);
	__type(value, struct nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nat SEC(".maps");

/* tern_nat_rev: reply tuple on the uplink -> original pod address and port.
 * Its keys are what makes a NAT port taken: one entry per (remote address,
 * remote port, protocol, NAT port). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TERN_MAX_NAT);
	__type(key, struct nat_tuple);
	__type(value, struct nat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tern_nat_rev SEC(".maps");

/* The flag enums only ever travel in integer fields, so nothing would put
 * them in BTF, where bpf2go -type looks for them: these two constants do.
 * Programs never read them. */
const volatile enum endpoint_flags tern_btf_endpoint_flags = ENDPOINT_F_NONE;
const volatile enum nat_flags tern_btf_nat_flags = 0;

#endif /* TERN_MAPS_H */
