package e2e

import (
	"encoding/binary"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/internal/testutil"
)

// TestSCTPPolicy checks NetworkPolicy SCTP rules through the kernel, on
// both datapaths (iptables: real `-p sctp --dport` rules and conntrack's
// SCTP tracking), with crafted SCTP packets (this kernel has no SCTP
// sockets; raw IP sockets send and receive them). prod/web admits SCTP 3868
// from dev/client only; dev is isolated for ingress, so web's INIT-ACK can
// reach client only as the reply of client's association.
func TestSCTPPolicy(t *testing.T) {
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
			w.mustTernctl("apply", "-f", w.write("sctp.yaml", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: prod, name: diameter}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 3868, protocol: SCTP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: dev, name: deny-all}
spec:
  podSelector: {}
`))
			webRx, err := testutil.ListenRaw(web.NS, unix.IPPROTO_SCTP)
			if err != nil {
				t.Fatal(err)
			}
			defer webRx.Close()
			clientRx, err := testutil.ListenRaw(client.NS, unix.IPPROTO_SCTP)
			if err != nil {
				t.Fatal(err)
			}
			defer clientRx.Close()

			// sctp sends an SCTP packet (a few times, for ARP) and reports
			// whether rx saw it arrive from src with the given ports.
			sctp := func(from *k8sPod, to *k8sPod, rx *testutil.RawListener, sport, dport uint16, vtag uint32, chunk uint8, value []byte) bool {
				t.Helper()
				pkt := testutil.SCTPPacket(sport, dport, vtag, chunk, 0, value)
				src, dst := net.ParseIP(from.IP), net.ParseIP(to.IP)
				for range 3 {
					if err := testutil.SendIPv4(from.NS, src, dst, unix.IPPROTO_SCTP, pkt); err != nil {
						t.Fatal(err)
					}
				}
				got, err := rx.Receive(1500*time.Millisecond, func(p []byte) bool {
					if len(p) < 20 || p[9] != unix.IPPROTO_SCTP || !net.IP(p[12:16]).Equal(src) {
						return false
					}
					l4 := p[int(p[0]&0xf)*4:]
					return len(l4) >= 13 && binary.BigEndian.Uint16(l4[0:]) == sport &&
						binary.BigEndian.Uint16(l4[2:]) == dport && l4[12] == chunk
				})
				if err != nil {
					t.Fatal(err)
				}
				return got
			}

			const tag = 0x7e511234
			if !sctp(client, web, webRx, 40001, 3868, 0, testutil.SCTPChunkInit, testutil.SCTPInit(tag)) {
				t.Error("client's SCTP INIT to web:3868, which the policy allows, did not arrive")
			}
			// The reply direction: web's INIT-ACK to client, isolated.
			if !sctp(web, client, clientRx, 3868, 40001, tag, testutil.SCTPChunkInitAck, testutil.SCTPInit(0x0a0b0c0d)) {
				t.Error("web's SCTP INIT-ACK, the reply of client's association, did not reach the isolated client")
			}
			if sctp(client, web, webRx, 40002, 3869, 0, testutil.SCTPChunkInit, testutil.SCTPInit(tag+1)) {
				t.Error("client's SCTP INIT to web:3869 arrived; the policy allows 3868 only")
			}
			if sctp(api, web, webRx, 40003, 3868, 0, testutil.SCTPChunkInit, testutil.SCTPInit(tag+2)) {
				t.Error("api's SCTP INIT to web:3868 arrived; the policy allows dev/client only")
			}
			if sctp(web, client, clientRx, 5000, 3868, 0, testutil.SCTPChunkInit, testutil.SCTPInit(tag+3)) {
				t.Error("web's new SCTP association to the isolated client arrived")
			}
		})
	}
}
