package bpf

import (
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ternlabs/tern/policy/compile"
)

// TestRemotePolicyDecidedUntracked: on the cross-node path (tern_from_uplink
// delivering a remote pod's packet into local pod b, lib/xnode.h), a packet
// of a tracked flow passes on its conntrack entry alone, and policy_check
// reads the ends' policy state (tern_ep_policy) only for what it decides
// anew: a new flow, a flow whose entry expired, a SYN on a closed TCP
// tuple, a fragment without its first. Each of those must still be decided
// by b's ingress policy as it is now, with b's identity: a drop proves the
// isolation flag was read, an allow by an entry of b's identity proves the
// identity was.
func TestRemotePolicyDecidedUntracked(t *testing.T) {
	w := newRemoteWorld(t)
	w.reset(t)
	w.setRemote(t, false)
	const classRemote = 5
	udp, tcp := uint8(unix.IPPROTO_UDP), uint8(unix.IPPROTO_TCP)
	redirect, shot := uint32(natActRedirect), uint32(natActShot)
	fromRemote, dropIn := TernMetricMETRIC_FROM_REMOTE, TernMetricMETRIC_DROP_POLICY_INGRESS

	zeroMetrics := func() {
		t.Helper()
		zero := make([]TernMetricValue, ebpf.MustPossibleCPU())
		for i := range TernMetricMETRIC_MAX {
			if err := w.maps[TernMapTernMetrics].Put(uint32(i), zero); err != nil {
				t.Fatal(err)
			}
		}
	}
	in := func(what string, p natPkt, want uint32, m TernMetric) {
		t.Helper()
		zeroMetrics()
		p.src, p.dst = natOtherPod, w.b.ip
		if verdict, _ := w.fromUplinkRun(t, p); verdict != want {
			t.Errorf("%s: verdict %#x, want %#x", what, verdict, want)
		}
		w.wantMetrics(t, map[TernMetric]uint64{m: 1})
	}
	isolate := func(allow ...compile.PolicyKey) {
		t.Helper()
		rs := polRuleSet(false, true, allow...)
		rs.IPCache = append(rs.IPCache, polIPCache(remoteCIDR.String(), classRemote))
		writeRuleSet(t, w.maps, rs)
	}
	udpFrom := func(sport uint16) natPkt { return natPkt{proto: udp, sport: sport, dport: 53} }
	tcpFrom := func(flags uint8) natPkt { return natPkt{proto: tcp, sport: 5000, dport: 80, tcpFlags: flags} }

	// No policy state yet: the flows pass and are tracked.
	in("UDP before the policy", udpFrom(4000), redirect, fromRemote)
	in("TCP SYN before the policy", tcpFrom(natTCPSyn), redirect, fromRemote)

	// b isolated for ingress, nothing allowed.
	isolate()
	in("tracked UDP flow", udpFrom(4000), redirect, fromRemote)
	in("tracked TCP flow", tcpFrom(natTCPAck), redirect, fromRemote)
	zeroMetrics()
	if verdict, _ := w.fromPodRun(t, w.b, natPkt{dst: natOtherPod, proto: udp, sport: 53, dport: 4000}); verdict != natActRedirect {
		t.Errorf("b's answer to the tracked flow: verdict %#x, want redirect", verdict)
	}
	w.wantMetrics(t, map[TernMetric]uint64{TernMetricMETRIC_REMOTE_NATIVE: 1})
	in("new UDP flow", udpFrom(4001), shot, dropIn)
	in("later fragment without its first", natPkt{proto: udp, frag: 0x0009, l4: make([]byte, 40)}, shot, dropIn)

	// The RST closes the TCP flow; a SYN on its tuple is decided anew.
	in("TCP RST", tcpFrom(natTCPRst|natTCPAck), redirect, fromRemote)
	in("SYN on the closed tuple", tcpFrom(natTCPSyn), shot, dropIn)

	// The tracked UDP flow idle past its timeout: decided anew.
	k, _ := stackKey(natOtherPod, 4000, w.b.ip, 53, udp)
	var e TernPolicyCtEntry
	ct := w.maps[TernMapTernPolicyCtOther]
	if err := ct.Lookup(k, &e); err != nil {
		t.Fatalf("conntrack entry of the UDP flow: %v", err)
	}
	e.LastSeen = natMonoNow(t) - uint64(2*time.Minute)
	if err := ct.Put(k, e); err != nil {
		t.Fatal(err)
	}
	in("expired UDP flow", udpFrom(4000), shot, dropIn)

	// An entry for b's identity, from the remote pods' class, UDP 53:
	// decided with that identity.
	isolate(pk(compile.Ingress, udp, polIDB, classRemote, 53, 16))
	in("new UDP flow, allowed for b's identity", udpFrom(4002), redirect, fromRemote)
	in("new UDP flow to another port", natPkt{proto: udp, sport: 4003, dport: 54}, shot, dropIn)
}
