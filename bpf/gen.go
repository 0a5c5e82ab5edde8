// Package bpf holds Tern's eBPF programs, compiled by bpf2go into the
// committed *_bpfel.{go,o}, so building Tern needs no clang. One object per
// attach point: Tern (tc_pod.c, pod veths), TernUplink (tc_uplink.c, the
// node's uplink at tc), TernSock (sock_lb.c, the cgroup2 root: host
// processes' Service traffic) and TernXDP (xdp_uplink.c, the uplink's XDP).
// They define the same maps, pinned by name, so they share them once loaded;
// the shared C types are generated once, from Tern.
// -mcpu=v3 for the atomic compare-and-swap the NAT port allocator uses.
package bpf

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -type endpoint -type metric -type metric_value -type node_config -type lpm_v4_key -type nat_tuple -type nat_entry -type nat_key -type ep_policy -type policy_value -type policy_ct_key -type policy_ct_entry -type policy_frag_key -type policy_frag_ports -type event_config -type event_limiter -type remote_node -type lb_svc_key -type lb_svc -type lb_slot_key -type lb_backend -type lb_ct_entry -type lb_affinity_key -type lb_affinity -type policy_ct_quota Tern tc_pod.c
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -no-global-types TernUplink tc_uplink.c
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -no-global-types TernTunnel tc_tunnel.c
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -no-global-types -type sock_rev_key -type sock_config TernSock sock_lb.c
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu" -target bpfel -no-global-types TernXDP xdp_uplink.c

// After the objects: their version (ObjectVersion), hashed once here.
//go:generate go run ./internal/objversion
