package bench

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"
)

const nodePortWorkloadName = "nodeport-udp-pps"

// nodePortWorkload is udp-pps through a NodePort: iperf3 -u -l 64 -b 0
// from the outside host to the node's address and NodePort, translated to
// the server pod (by XDP or by tc, per path). The Service's TCP port
// carries iperf3's control connection. Only on the NodePort paths.
type nodePortWorkload struct{}

func (w *nodePortWorkload) Name() string { return nodePortWorkloadName }
func (w *nodePortWorkload) Title() string {
	return "NodePort UDP 64-byte packet rate from outside the node (iperf3 -u -l 64 -b 0 to node:NodePort)"
}
func (w *nodePortWorkload) Short() string { return "NodePort UDP 64 B rate (iperf3)" }

func (w *nodePortWorkload) Metrics() []MetricSpec {
	return (&iperfWorkload{udp: true}).Metrics()
}

func (w *nodePortWorkload) Available() error { return needTools("iperf3") }

func (w *nodePortWorkload) Supports(t *Topology) error {
	if !isNodePortPath(t.Path) {
		return errors.New("NodePort paths only (" + PathNodePortTC + ", " + PathNodePortXDP + ")")
	}
	return nil
}

func (w *nodePortWorkload) Traffic() bool { return true }

func (w *nodePortWorkload) Run(ctx context.Context, wc *WorkloadContext, t *Topology) (map[string]float64, error) {
	port := strconv.Itoa(nodePortTarget)
	srv, err := t.Server.NS.Start(ctx, wc.Pinned("iperf3", "-s", "-1", "-p", port), nil)
	if err != nil {
		return nil, err
	}
	defer srv.Stop()
	if err := t.Server.NS.waitListening(ctx, "tcp", nodePortTarget, srv, 5*time.Second); err != nil {
		return nil, fmt.Errorf("iperf3 server: %w", err)
	}
	args := []string{"iperf3", "-c", nodePortNodeIP, "-p", strconv.Itoa(nodePortPort),
		"-t", secondsArg(wc.Duration), "-O", secondsArg(wc.Omit), "-J",
		"-u", "-l", strconv.Itoa(udpPayload), "-b", "0"}
	cctx, cancel := context.WithTimeout(ctx, wc.Duration+wc.Omit+30*time.Second)
	defer cancel()
	out, runErr := t.Client.NS.Run(cctx, wc.Pinned(args...)...)
	m, perr := parseIperf(out, true)
	if runErr != nil {
		if perr != nil {
			return nil, runErr
		}
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
