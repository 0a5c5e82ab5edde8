package bpf

import (
	"fmt"
	"math"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ternlabs/tern/internal/testutil"
	"github.com/ternlabs/tern/policy/compile"
	"github.com/ternlabs/tern/policy/manifest"
)

// BenchmarkPolicy measures the pod programs per packet (ns/pkt, timed by
// the kernel: BPF_PROG_TEST_RUN with repeat, Program.Benchmark) with N
// NetworkPolicy rules per direction: the client pods are isolated for
// egress and the server pods for ingress, each by one policy of N rules
// whose peers are distinct /32 ipBlocks no pod is in (each with its own
// port), plus the rule that matters (server: from app=client, TCP 8080;
// client: to app=server, any port). Paths:
//
//   - pod-pod: client -> server on this node, both directions decided
//     (egress 1 ipcache + 3 policy lookups, ingress 1 + 1), run through
//     tern_to_pod, which decides exactly as tern_from_pod does before its
//     redirect but leaves the packet as it is: BPF_PROG_TEST_RUN repeats
//     on one skb, and tern_from_pod's redirect rewrites MACs and TTL;
//   - egress: tern_from_pod, client -> a server pod on another node (to
//     the host stack, unmodified);
//   - ingress: tern_to_pod, a client pod on another node -> server.
//
// States: nopolicy (no policy state: the datapath without policy; the
// flow is tracked all the same, so repeats are conntrack hits),
// nopolicy-new (the same, every repeat a new flow: the failed insert),
// established (a packet of a flow in the policy conntrack), new-allowed
// (the first packet of an allowed flow; conntrack inserts are made to fail
// so every repeat decides anew, the failed insert included) and new-denied
// (the first packet of a denied flow: every lookup of the denying
// direction misses, nothing is inserted).
//
// Program.Benchmark has no context argument, so the programs run on the
// loopback of a fresh namespace (ifindex 1): the client endpoint is
// registered with ifindex 1 to pass tern_from_pod's anti-spoofing.
func BenchmarkPolicy(b *testing.B) {
	testutil.RequirePrivileged(b)
	var (
		client, server   = netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("10.244.1.3")
		rclient, rserver = netip.MustParseAddr("10.244.2.2"), netip.MustParseAddr("10.244.2.3")
		world            = netip.MustParseAddr("8.8.8.8")
	)
	type flow struct {
		src, dst netip.Addr
		dport    uint16
		verdict  uint32
	}
	paths := []struct {
		name          string
		fromPod       bool
		allow, denied flow
	}{
		{"pod-pod", false, flow{client, server, 8080, tcActOK}, flow{client, server, 9999, tcActShot}},
		{"egress", true, flow{client, rserver, 8080, tcActOK}, flow{client, world, 8080, tcActShot}},
		{"ingress", false, flow{rclient, server, 8080, tcActOK}, flow{rclient, server, 9999, tcActShot}},
	}
	for _, n := range []int{10, 1000, 10000} {
		rs := benchRuleSet(b, n)
		for _, path := range paths {
			for _, c := range []struct {
				name            string
				policy          bool
				failCT, primeCT bool
				denied          bool
			}{
				{name: "nopolicy"},
				{name: "nopolicy-new", failCT: true},
				{name: "established", policy: true, primeCT: true},
				{name: "new-allowed", policy: true, failCT: true},
				{name: "new-denied", policy: true, denied: true},
			} {
				if !c.policy && n != 10 {
					continue // independent of the rules
				}
				f := path.allow
				if c.denied {
					f = path.denied
				}
				b.Run(fmt.Sprintf("rules=%d/%s/%s", n, path.name, c.name), func(b *testing.B) {
					progs, maps := benchLoad(b, c.failCT)
					prog := progs[TernProgTernToPod]
					if path.fromPod {
						prog = progs[TernProgTernFromPod]
					}
					if c.policy {
						writeRuleSet(b, maps, rs)
					}
					for ip, ifindex := range map[netip.Addr]uint32{client: 1, server: 2} {
						e := TernEndpoint{Ifindex: ifindex, PodMac: [6]byte{2, 0, 0, 0, 0, byte(ifindex)}, HostMac: [6]byte{2, 0, 0, 0, 1, byte(ifindex)}}
						if err := maps[TernMapTernEndpoints].Put(endpointKey(ip), e); err != nil {
							b.Fatal(err)
						}
					}
					frame := natPkt{
						srcMAC: []byte{2, 0, 0, 0, 0, 1}, dstMAC: []byte{2, 0, 0, 0, 1, 1},
						src: f.src, dst: f.dst, proto: unix.IPPROTO_TCP, sport: 40000, dport: f.dport, tcpFlags: natTCPSyn,
					}.frame()
					world := testutil.NewNetNS(b, "polbench")
					err := world.Do(func(ns.NetNS) error {
						if c.primeCT {
							if v, _, err := prog.Test(frame); err != nil || v != f.verdict {
								return fmt.Errorf("priming run: verdict %d, %v", v, err)
							}
						}
						v, per, err := prog.Benchmark(frame, b.N, b.ResetTimer)
						if err != nil {
							return err
						}
						if v != f.verdict {
							return fmt.Errorf("verdict %d, want %d", v, f.verdict)
						}
						b.ReportMetric(float64(per.Nanoseconds()), "ns/pkt")
						return nil
					})
					if err != nil {
						b.Fatal(err)
					}
					if c.policy {
						b.ReportMetric(float64(len(rs.Policy)), "entries")
					}
				})
			}
		}
	}
}

// benchLoad loads the pod object unpinned. With failCT the policy
// conntrack is a full one-entry hash, so no flow is ever inserted.
func benchLoad(b *testing.B, failCT bool) (map[string]*ebpf.Program, map[string]*ebpf.Map) {
	b.Helper()
	spec, err := LoadTern()
	if err != nil {
		b.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	if failCT {
		spec.Maps[TernMapTernPolicyCt].Type = ebpf.Hash
		spec.Maps[TernMapTernPolicyCt].MaxEntries = 1
		// Every repeat is a new flow of the same pod: a share that
		// never runs out, but is counted.
		if err := spec.Variables["policy_ct_pod_flows"].Set(uint32(math.MaxUint32)); err != nil {
			b.Fatal(err)
		}
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		b.Fatalf("load: %+v", err)
	}
	b.Cleanup(coll.Close)
	if failCT {
		if err := coll.Maps[TernMapTernPolicyCt].Put(TernPolicyCtKey{Proto: 255}, TernPolicyCtEntry{}); err != nil {
			b.Fatal(err)
		}
	}
	return coll.Programs, coll.Maps
}

// benchRuleSet compiles the benchmark's cluster with n rules per direction.
func benchRuleSet(b *testing.B, n int) *compile.RuleSet {
	b.Helper()
	tcp := corev1.ProtocolTCP
	port := func(p int) []networkingv1.NetworkPolicyPort {
		v := intstr.FromInt32(int32(p))
		return []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &v}}
	}
	block := func(i int) []networkingv1.NetworkPolicyPeer {
		return []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: fmt.Sprintf("172.16.%d.%d/32", i/250, 1+i%250)}}}
	}
	meta := func(kind, name string, l map[string]string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Namespace: "bench", Name: name, Labels: l}
	}
	pod := func(name string) *corev1.Pod {
		return &corev1.Pod{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"}, ObjectMeta: meta("Pod", name, map[string]string{"app": name}),
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c"}}}}
	}
	ingress := &networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
		ObjectMeta: meta("NetworkPolicy", "server-in", nil),
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		},
	}
	egress := &networkingv1.NetworkPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: "networking.k8s.io/v1", Kind: "NetworkPolicy"},
		ObjectMeta: meta("NetworkPolicy", "client-out", nil),
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		},
	}
	for i := range n - 1 {
		ingress.Spec.Ingress = append(ingress.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: block(i), Ports: port(1000 + i%20000)})
		egress.Spec.Egress = append(egress.Spec.Egress, networkingv1.NetworkPolicyEgressRule{To: block(i), Ports: port(1000 + i%20000)})
	}
	ingress.Spec.Ingress = append(ingress.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{
		From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "client"}}}}, Ports: port(8080)})
	egress.Spec.Egress = append(egress.Spec.Egress, networkingv1.NetworkPolicyEgressRule{
		To: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}}}}})
	rclient, rserver := pod("rclient"), pod("rserver")
	rclient.Labels["app"], rserver.Labels["app"] = "client", "server"
	st, err := manifest.NewState().Apply([]manifest.Object{pod("client"), pod("server"), rclient, rserver, ingress, egress})
	if err != nil {
		b.Fatal(err)
	}
	topo := policyTopo(map[string][2]string{"10.244.1.2": {"bench", "client"}, "10.244.1.3": {"bench", "server"}},
		map[string][2]string{"10.244.2.2": {"bench", "rclient"}, "10.244.2.3": {"bench", "rserver"}}, "10.244.1.1")
	rs, err := compile.Compile(st, topo, nil)
	if err != nil {
		b.Fatal(err)
	}
	return rs
}
