package e2e

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/testutil"
)

// Two rule sets that both isolate prod/web and both deny dev/client, but
// differ in everything else (selectors, ports, ipBlocks, the number of
// rules), so every update rewrites the datapath's tables for web.
const (
	webPolicyA = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: web-in}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080}, {port: 53, protocol: UDP}]
`
	webPolicyB = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: web-in}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {env: prod}}}]
    ports: [{port: 8080}, {port: 9090}, {port: 53, protocol: UDP}]
  - from: [{ipBlock: {cidr: 192.0.2.0/24}}, {ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}}]
    ports: [{port: 1000, endPort: 1100}]
`
)

// TestPolicyUpdateNeverOpens: while the policy isolating prod/web is
// replaced back and forth between two rule sets that both deny dev/client,
// dev/client keeps trying to reach web (new TCP connections, UDP datagrams
// from fresh source ports, in a tight loop from several goroutines). Not one
// may get through: an update must never leave a moment of open access. The
// probes must have run throughout, and prod/api must reach web under both
// rule sets (so the denials are the policy's, not a broken network).
func TestPolicyUpdateNeverOpens(t *testing.T) {
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			testutil.RequirePrivileged(t)
			t.Parallel()
			w := newPolicyWorld(t, dp)
			n := w.node
			web := addK8sPod(t, n, w.conf, "prod", "web")
			api := addK8sPod(t, n, w.conf, "prod", "api")
			client := addK8sPod(t, n, w.conf, "dev", "client")
			w.mustTernctl("apply", "-f", w.write("cluster.yaml", policyCluster))
			files := []string{w.write("a.yaml", webPolicyA), w.write("b.yaml", webPolicyB)}
			w.mustTernctl("apply", "-f", files[0])
			expect(t, "rule set A", tcp(client, web, 8080, false), udp(client, web, 53, false), tcp(api, web, 8080, true))

			ctx, cancel := context.WithCancel(t.Context())
			var (
				attempts, leaks atomic.Int64
				wg              sync.WaitGroup
				leakMu          sync.Mutex
				leakWhat        []string
			)
			leak := func(what string) {
				leaks.Add(1)
				leakMu.Lock()
				defer leakMu.Unlock()
				if len(leakWhat) < 5 {
					leakWhat = append(leakWhat, what)
				}
			}
			for range 2 {
				wg.Go(func() { tcpProbeLoop(ctx, client.NS, web.IP+":8080", &attempts, leak) })
			}
			wg.Go(func() { udpProbeLoop(ctx, client.NS, web.IP+":53", &attempts, leak) })

			// At least 24 updates, in pairs (B, then A: rule set A is in
			// force at the end), and more until 240 probes have run
			// during them: an update can take less time than a denied
			// TCP probe (which waits out its 150 ms), and the test must
			// keep its probes rather than its update count.
			const minUpdates, maxUpdates, minProbes = 24, 240, 240
			updates := 0
			for updates < minUpdates || (attempts.Load() < minProbes && updates < maxUpdates) {
				w.mustTernctl("apply", "-f", files[1])
				w.mustTernctl("apply", "-f", files[0])
				updates += 2
			}
			// Keep probing a moment after the last update.
			time.Sleep(300 * time.Millisecond)
			cancel()
			wg.Wait()

			if l := leaks.Load(); l > 0 {
				t.Errorf("%d of %d denied probes got through during %d policy updates, e.g. %v", l, attempts.Load(), updates, leakWhat)
			}
			if a := attempts.Load(); a < minProbes {
				t.Errorf("only %d denied probes ran during %d updates: the test proves nothing", a, updates)
			}
			expect(t, "after the updates (rule set A)", tcp(client, web, 8080, false), tcp(api, web, 8080, true))
			w.mustTernctl("apply", "-f", files[1])
			expect(t, "rule set B", tcp(client, web, 8080, false), tcp(api, web, 9090, true))
		})
	}
}

// tcpProbeLoop opens new TCP connections to addr from inside from until ctx
// ends; each one established is a leak.
func tcpProbeLoop(ctx context.Context, from ns.NetNS, addr string, attempts *atomic.Int64, leak func(string)) {
	for ctx.Err() == nil {
		attempts.Add(1)
		var c net.Conn
		err := from.Do(func(ns.NetNS) error {
			var err error
			// A short timeout keeps new SYNs (new flows) coming; a SYN
			// that is dropped is not retransmitted within it.
			c, err = net.DialTimeout("tcp4", addr, 150*time.Millisecond)
			return err
		})
		if err == nil {
			leak(fmt.Sprintf("tcp connection %s -> %s", c.LocalAddr(), addr))
			c.Close()
		}
	}
}

// udpProbeLoop sends datagrams to addr (an echo server) from a new socket,
// so a new source port, every 20 datagrams, until ctx ends; each echo
// received is a leak.
func udpProbeLoop(ctx context.Context, from ns.NetNS, addr string, attempts *atomic.Int64, leak func(string)) {
	buf := make([]byte, 64)
	for ctx.Err() == nil {
		var c net.Conn
		err := from.Do(func(ns.NetNS) error {
			var err error
			c, err = net.Dial("udp4", addr)
			return err
		})
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		for i := 0; i < 20 && ctx.Err() == nil; i++ {
			attempts.Add(1)
			if _, err := c.Write([]byte("policy-probe")); err != nil {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			// An echo comes back in well under a millisecond; a longer
			// wait would only slow the probing down.
			c.SetReadDeadline(time.Now().Add(2 * time.Millisecond))
			if k, err := c.Read(buf); err == nil && strings.HasPrefix(string(buf[:k]), "policy-probe") {
				leak(fmt.Sprintf("udp echo %s -> %s", c.LocalAddr(), addr))
			}
		}
		c.Close()
	}
}
