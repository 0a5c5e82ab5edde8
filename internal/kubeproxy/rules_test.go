package kubeproxy

import (
	"strings"
	"testing"
)

// TestChainNames: the chain names are kube-proxy's own, as its
// iptables proxier tests expect them (pkg/proxy/iptables/proxier_test.go):
// the hash of "namespace/name:port" + protocol, and of that + endpoint.
func TestChainNames(t *testing.T) {
	svc := func(ns, name string) Service {
		return Service{Namespace: ns, Name: name, PortName: "p80", Protocol: "tcp"}
	}
	for _, c := range []struct{ got, want string }{
		{svc("ns2", "svc2").svcChain(), "KUBE-SVC-GNZBNJ2PO5MGZ6GT"},
		{svc("ns2", "svc2").extChain(), "KUBE-EXT-GNZBNJ2PO5MGZ6GT"},
		{svc("ns2", "svc2").svlChain(), "KUBE-SVL-GNZBNJ2PO5MGZ6GT"},
		{svc("ns3", "svc3").svcChain(), "KUBE-SVC-X27LE4BHSL4DOUIK"},
		{svc("ns4", "svc4").svcChain(), "KUBE-SVC-4SW47YFZTEDKD3PK"},
		{svc("ns5", "svc5").svcChain(), "KUBE-SVC-NUKIZ6OKUXPJNT4C"},
		{svc("ns2", "svc2").sepChain(Endpoint{IP: "10.180.0.2", Port: 80}), "KUBE-SEP-RS4RBKLTHTF2IUXJ"},
	} {
		if c.got != c.want {
			t.Errorf("chain %s, kube-proxy names it %s", c.got, c.want)
		}
	}
}

// TestRulesShape: the rules of a NodePort Service with
// externalTrafficPolicy Local hold kube-proxy's chain layout and hairpin
// masquerade.
func TestRulesShape(t *testing.T) {
	s := Service{Namespace: "ns", Name: "web", Protocol: "tcp", ClusterIP: "10.96.0.10", Port: 80,
		NodePort: 30080, ExternalLocal: true,
		Endpoints: []Endpoint{{IP: "10.244.1.5", Port: 8080, Local: true}, {IP: "10.244.2.5", Port: 8080}}}
	rules := Rules("10.244.0.0/16", []Service{s})
	for _, want := range []string{
		"-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
		"-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
		"-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
		"-A " + s.svcChain() + " -m comment --comment \"ns/web cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ",
		"-A KUBE-NODEPORTS -m comment --comment ns/web -m tcp -p tcp --dport 30080 -j " + s.extChain(),
		"-A " + s.extChain() + " -j " + s.svlChain(),
		"-A " + s.svcChain() + " -m comment --comment \"ns/web -> 10.244.1.5:8080\" -m statistic --mode random --probability 0.5000000000 -j " + s.sepChain(s.Endpoints[0]),
		"-A " + s.svlChain() + " -m comment --comment \"ns/web -> 10.244.1.5:8080\" -j " + s.sepChain(s.Endpoints[0]),
		"-A " + s.sepChain(s.Endpoints[0]) + " -m comment --comment ns/web -s 10.244.1.5 -j KUBE-MARK-MASQ",
		"-A " + s.sepChain(s.Endpoints[0]) + " -m comment --comment ns/web -m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080",
	} {
		if !strings.Contains(rules, want+"\n") {
			t.Errorf("rules lack %q:\n%s", want, rules)
		}
	}
	// The local-endpoints chain balances over local endpoints only.
	if strings.Contains(rules, "-A "+s.svlChain()+" -m comment --comment \"ns/web -> 10.244.2.5:8080\"") {
		t.Errorf("%s holds a remote endpoint", s.svlChain())
	}
}
