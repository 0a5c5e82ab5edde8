// Package bpf holds Tern's eBPF programs, compiled by bpf2go into the
// committed tern_bpfel.{go,o}, so building Tern needs no clang.
package bpf

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type endpoint -type metric -type metric_value Tern tc_pod.c
