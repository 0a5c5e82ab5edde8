/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Header parsing with a bounds check before every read. */
#ifndef TERN_PARSE_H
#define TERN_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>

enum parse_result {
	PARSE_IPV4 = 0,
	PARSE_NOT_IPV4,
	PARSE_TRUNCATED,
};

/* parse_ipv4 points eth and ip into the linear data of skb. It may pull the
 * headers into the linear area first (veth frames usually are linear). */
static __always_inline enum parse_result
parse_ipv4(struct __sk_buff *skb, struct ethhdr **eth, struct iphdr **ip)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + sizeof(struct ethhdr) > data_end) {
		if (skb->len < sizeof(struct ethhdr))
			return PARSE_TRUNCATED;
		if (bpf_skb_pull_data(skb, sizeof(struct ethhdr)) < 0)
			return PARSE_TRUNCATED;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + sizeof(struct ethhdr) > data_end)
			return PARSE_TRUNCATED;
	}
	*eth = data;
	if ((*eth)->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;

	if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > data_end) {
		if (bpf_skb_pull_data(skb, sizeof(struct ethhdr) + sizeof(struct iphdr)) < 0)
			return PARSE_TRUNCATED;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) > data_end)
			return PARSE_TRUNCATED;
		*eth = data;
	}
	*ip = data + sizeof(struct ethhdr);
	if ((*ip)->version != 4 || (*ip)->ihl < 5)
		return PARSE_TRUNCATED;
	return PARSE_IPV4;
}

#endif /* TERN_PARSE_H */
