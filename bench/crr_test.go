package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ternlabs/tern/internal/testutil"
)

func TestParseCRR(t *testing.T) {
	var r crrResult
	if err := parseCRR([]byte("conns 1200\nerrors 3\nwindow_s 0.500000\ntotal 2000\ncpu_us 30000\np50_us 40.5\np99_us 300.5\nover_100ms 2\n"), &r); err != nil {
		t.Fatal(err)
	}
	if err := parseCRR([]byte("answered 2000\nserver_cpu_us 20000\n"), &r); err != nil {
		t.Fatal(err)
	}
	want := crrResult{conns: 1200, errors: 3, window: 0.5, p50: 40.5, p99: 300.5, slow: 2, answered: 2000, total: 2000, cliCPU: 30000, srvCPU: 20000}
	if r != want {
		t.Fatalf("parsed %+v, want %+v", r, want)
	}
	m, err := crrMetrics(r)
	if err != nil {
		t.Fatal(err)
	}
	if m["conns_per_s"] != 2400 || m["p50_us"] != 40.5 || m["errors"] != 3 || m["slow"] != 2 || m["cpu_us"] != 25 {
		t.Errorf("metrics %v", m)
	}
	if err := parseCRR([]byte("tern-crr: bind: Address already in use\n"), &r); err == nil {
		t.Error("output without results accepted")
	}
}

// TestCRRMetricsRejects: a sample is an error when nothing completed, or
// when the server under test answered fewer connections than the client
// completed (they went somewhere else).
func TestCRRMetricsRejects(t *testing.T) {
	for name, r := range map[string]crrResult{
		"no connection":     {conns: 0, errors: 40, window: 1, answered: 0},
		"not to the server": {conns: 500, window: 1, answered: 499, total: 500, cliCPU: 1, srvCPU: 1},
		"no CPU time":       {conns: 500, window: 1, answered: 500, total: 500},
	} {
		if m, err := crrMetrics(r); err == nil {
			t.Errorf("%s: accepted: %v", name, m)
		}
	}
}

// TestCRRGenerator builds tern-crr with cc and runs it between two
// namespaces joined by a veth: the client completes connections that the
// server under test answered. Dialled at an address where another
// tern-crr server (a decoy, not the one under test) answers, the sample
// fails although the client completed connections; dialled at an address
// where nothing listens, it fails because none completed.
func TestCRRGenerator(t *testing.T) {
	testutil.RequirePrivileged(t)
	requireTools(t, "cc", "ip")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	tag := fmt.Sprintf("%d", os.Getpid()%100000)
	cli, err := createNetns("ternbench-crrtest-c-"+tag, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	srv, err := createNetns("ternbench-crrtest-s-"+tag, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	for _, argv := range [][]string{
		{"ip", "link", "add", "crrc" + tag, "netns", cli.Name, "type", "veth", "peer", "name", "crrs" + tag, "netns", srv.Name},
		{"ip", "-n", cli.Name, "addr", "add", "10.251.0.1/24", "dev", "crrc" + tag},
		{"ip", "-n", srv.Name, "addr", "add", "10.251.0.2/24", "dev", "crrs" + tag},
		{"ip", "-n", srv.Name, "addr", "add", "10.251.0.3/24", "dev", "crrs" + tag},
		{"ip", "-n", cli.Name, "link", "set", "crrc" + tag, "up"},
		{"ip", "-n", srv.Name, "link", "set", "crrs" + tag, "up"},
	} {
		if out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(argv, " "), err, out)
		}
	}
	var tool crrTool
	bin, err := tool.build(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	wc := &WorkloadContext{Duration: 500 * time.Millisecond, Omit: 200 * time.Millisecond}
	under, decoy, nobody := net.ParseIP("10.251.0.2"), net.ParseIP("10.251.0.3"), net.ParseIP("10.251.0.4")

	m, err := runCRR(ctx, bin, wc, cli, srv, under, under, 7101)
	if err != nil {
		t.Fatalf("client to the server under test: %v", err)
	}
	if m["conns_per_s"] <= 0 {
		t.Fatalf("no connection rate: %v", m)
	}
	t.Logf("through a veth, unpinned, %d in flight: %v", crrInFlight, m)

	d, err := srv.Start(ctx, []string{bin, "server", decoy.String(), "7102"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Stop()
	if err := srv.waitListening(ctx, "tcp", 7102, d, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if m, err := runCRR(ctx, bin, wc, cli, srv, under, decoy, 7102); err == nil || !strings.Contains(err.Error(), "did not all go to it") {
		t.Errorf("client to a decoy server: %v, %v; want the server under test's count to fail the sample", m, err)
	}
	if m, err := runCRR(ctx, bin, wc, cli, srv, under, nobody, 7103); err == nil || !strings.Contains(err.Error(), "no connection completed") {
		t.Errorf("client to an address nobody has: %v, %v; want no connection completed", m, err)
	}
}
