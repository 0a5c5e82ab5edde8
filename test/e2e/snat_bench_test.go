package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// BenchmarkSNATIperf measures pod -> external TCP throughput through each
// datapath's masquerade, side by side: one SNAT world per datapath (node
// with an uplink to ext, one pod), iperf3 server in ext and client in the
// pod, both on CPU 1 (taskset -c 1, see BENCHMARKING.md), 3 s runs with the
// first second omitted, interleaved ebpf / iptables for 5 rounds. It reports
// the medians (Gbit/s) and the median of the paired ratios; nothing is
// asserted. Run it alone:
//
//	go test ./test/e2e -run '^$' -bench SNATIperf -benchtime 1x
func BenchmarkSNATIperf(b *testing.B) {
	testutil.RequirePrivileged(b)
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Fatalf("iperf3: %v", err)
	}
	const rounds = 5
	dps := []string{"ebpf", "iptables"}
	clients := map[string]ns.NetNS{}
	for _, dp := range dps {
		w := newSNATWorld(b)
		_, conf := w.conf(b, dp, nil)
		p := w.node.Pod(b, "bp")
		id := "c-" + p.Name
		b.Cleanup(func() { _ = w.node.Del(context.Background(), conf, id, p.Path, "eth0", k8sArgs) })
		if _, err := w.node.Add(context.Background(), conf, id, p.Path, "eth0", k8sArgs); err != nil {
			b.Fatalf("ADD: %v", err)
		}
		startIperfServer(b, w.ext)
		clients[dp] = p.NS
	}

	results := map[string][]float64{}
	for round := range rounds {
		for _, dp := range dps {
			gbps, err := iperfClient(clients[dp], extIP, 3)
			if err != nil {
				b.Fatalf("%s round %d: %v", dp, round, err)
			}
			results[dp] = append(results[dp], gbps)
		}
	}
	var ratios []float64
	for i := range rounds {
		ratios = append(ratios, results["ebpf"][i]/results["iptables"][i])
	}
	for _, dp := range dps {
		b.Logf("%-8s Gbit/s: median %.2f, runs %.2f", dp, median(results[dp]), results[dp])
		b.ReportMetric(median(results[dp]), dp+"-Gbit/s")
	}
	b.Logf("ebpf/iptables paired ratio: median %.2f, runs %.2f", median(ratios), ratios)
	b.ReportMetric(median(ratios), "ebpf/iptables")
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// startIperfServer runs `iperf3 -s` on CPU 1 inside n until the benchmark
// ends.
func startIperfServer(b *testing.B, n ns.NetNS) {
	b.Helper()
	var cmd *exec.Cmd
	err := n.Do(func(ns.NetNS) error {
		cmd = exec.Command("taskset", "-c", "1", "iperf3", "-s", "-B", extIP)
		return cmd.Start()
	})
	if err != nil {
		b.Fatalf("start iperf3 server: %v", err)
	}
	b.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	time.Sleep(300 * time.Millisecond) // let it bind
}

// iperfClient runs a TCP stream from n to server for secs seconds (first
// second omitted) and returns the receiver's Gbit/s.
func iperfClient(n ns.NetNS, server string, secs int) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+15)*time.Second)
	defer cancel()
	var out []byte
	err := n.Do(func(ns.NetNS) error {
		var err error
		out, err = exec.CommandContext(ctx, "taskset", "-c", "1", "iperf3", "-c", server,
			"-t", fmt.Sprint(secs), "-O", "1", "-J").Output()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("iperf3 -c %s: %w: %s", server, err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return 0, fmt.Errorf("parse iperf3 output: %w", err)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, nil
}
