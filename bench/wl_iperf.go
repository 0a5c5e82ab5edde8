package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// udpPayload is the datagram size of the packet-rate test.
const udpPayload = 64

// iperfWorkload is iperf3 from the client pod to the server pod: one TCP
// stream (throughput), or 64-byte UDP datagrams as fast as the client can
// send them (received packet rate). The server is started per sample with
// -1 (one test, then exit); the first Omit of the test is discarded (-O).
type iperfWorkload struct{ udp bool }

func (w *iperfWorkload) Name() string {
	if w.udp {
		return "udp-pps"
	}
	return "tcp-stream"
}

func (w *iperfWorkload) Title() string {
	if w.udp {
		return "UDP 64-byte packet rate (iperf3 -u -l 64 -b 0)"
	}
	return "TCP stream throughput (iperf3, one stream)"
}

func (w *iperfWorkload) Short() string {
	if w.udp {
		return "UDP 64 B packet rate (iperf3)"
	}
	return "TCP stream (iperf3)"
}

func (w *iperfWorkload) Metrics() []MetricSpec {
	if w.udp {
		return []MetricSpec{
			{Name: "rx_pps", Title: "Received packets", Unit: "packets/s", Better: HigherIsBetter, Chart: true},
			{Name: "loss_pct", Title: "Loss", Unit: "%", Better: Informational},
			{Name: "bytes", Title: "Bytes received", Unit: "B", Better: Informational},
		}
	}
	return []MetricSpec{
		{Name: "gbps", Title: "Throughput", Unit: "Gbit/s", Better: HigherIsBetter, Chart: true},
		{Name: "retransmits", Title: "Retransmits", Unit: "segments", Better: Informational},
		{Name: "bytes", Title: "Bytes received", Unit: "B", Better: Informational},
	}
}

func (w *iperfWorkload) Available() error           { return needTools("iperf3") }
func (w *iperfWorkload) Supports(t *Topology) error { return nil }
func (w *iperfWorkload) Traffic() bool              { return true }

func (w *iperfWorkload) Run(ctx context.Context, wc *WorkloadContext, t *Topology) (map[string]float64, error) {
	portN := wc.Port()
	port := strconv.Itoa(portN)
	srv, err := t.Server.NS.Start(ctx, wc.Pinned("iperf3", "-s", "-1", "-p", port), nil)
	if err != nil {
		return nil, err
	}
	defer srv.Stop()
	if err := t.Server.NS.waitListening(ctx, "tcp", portN, srv, 5*time.Second); err != nil {
		return nil, fmt.Errorf("iperf3 server: %w", err)
	}
	args := []string{"iperf3", "-c", t.Server.IP.String(), "-p", port,
		"-t", secondsArg(wc.Duration), "-O", secondsArg(wc.Omit), "-J"}
	if w.udp {
		args = append(args, "-u", "-l", strconv.Itoa(udpPayload), "-b", "0")
	}
	cctx, cancel := context.WithTimeout(ctx, wc.Duration+wc.Omit+30*time.Second)
	defer cancel()
	out, runErr := t.Client.NS.Run(cctx, wc.Pinned(args...)...)
	m, perr := parseIperf(out, w.udp)
	if runErr != nil {
		if perr != nil {
			return nil, runErr
		}
		// iperf3 -J reports its own errors in the JSON.
		return nil, fmt.Errorf("%w (%v)", perr, runErr)
	}
	if perr != nil {
		return nil, perr
	}
	if err := srv.Wait(5 * time.Second); err != nil {
		return nil, fmt.Errorf("iperf3 server: %w", err)
	}
	return m, nil
}

// iperfSum is one of the "end" sums of iperf3 -J output.
type iperfSum struct {
	Seconds       float64 `json:"seconds"`
	Bytes         float64 `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
	Retransmits   float64 `json:"retransmits"`
	Packets       float64 `json:"packets"`
	LostPackets   float64 `json:"lost_packets"`
}

type iperfOutput struct {
	Error string `json:"error"`
	End   struct {
		SumSent     *iperfSum `json:"sum_sent"`
		SumReceived *iperfSum `json:"sum_received"`
	} `json:"end"`
}

// parseIperf reads iperf3 -J output. For UDP it counts received packets
// from the received bytes: with -O, iperf3 3.12's packet and loss counters
// include the omitted second while the byte counters do not.
func parseIperf(out []byte, udp bool) (map[string]float64, error) {
	var o iperfOutput
	if err := json.Unmarshal(out, &o); err != nil {
		return nil, fmt.Errorf("iperf3 output: %w", err)
	}
	if o.Error != "" {
		return nil, errors.New("iperf3: " + o.Error)
	}
	sent, recv := o.End.SumSent, o.End.SumReceived
	if sent == nil || recv == nil || recv.Seconds <= 0 {
		return nil, errors.New("iperf3 output has no end.sum_sent/sum_received")
	}
	if recv.Bytes <= 0 {
		return nil, errors.New("iperf3: no byte reached the server")
	}
	if udp {
		loss := 0.0
		if sent.Bytes > 0 {
			loss = 100 * (1 - recv.Bytes/sent.Bytes)
		}
		return map[string]float64{
			"rx_pps":   recv.Bytes / udpPayload / recv.Seconds,
			"loss_pct": max(loss, 0),
			"bytes":    recv.Bytes,
		}, nil
	}
	return map[string]float64{
		"gbps":        recv.BitsPerSecond / 1e9,
		"retransmits": sent.Retransmits,
		"bytes":       recv.Bytes,
	}, nil
}
