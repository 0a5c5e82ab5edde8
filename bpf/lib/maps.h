/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the datapath. All are pinned by name under the node's bpffs
 * directory, so state outlives the CNI process and survives program reloads. */
#ifndef TERN_MAPS_H
#define TERN_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "../include/tern_types.h"

#define TERN_MAX_ENDPOINTS 65536

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

#endif /* TERN_MAPS_H */
