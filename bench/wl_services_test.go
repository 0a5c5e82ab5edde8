package bench

import (
	"bytes"
	"flag"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

var svcTestServer = net.ParseIP("10.244.1.3").To4()

// TestSvcList: n Services in all, the target (three ports, backend the
// server pod) in the middle of kube-proxy's order, every other Service on
// a ClusterIP of its own in the Service CIDR with a backend of its own
// that is no pod of the node.
func TestSvcList(t *testing.T) {
	svcCIDRPrefix := netip.MustParsePrefix(svcCIDR)
	cluster := netip.MustParsePrefix(ternClusterCIDR)
	node := netip.MustParsePrefix(ternSubnet)
	for _, n := range []int{1, 2, 10, 1000, 10000} {
		list := svcList(n, svcTestServer, svcPorts{20001, 20002, 20003})
		names := map[string]bool{}
		ips := map[string]bool{}
		first := -1
		for i, s := range list {
			names[s.Name] = true
			if s.Name == svcTargetName {
				if first < 0 {
					first = i
				}
				if s.ClusterIP != svcTargetIP || len(s.Endpoints) != 1 || s.Endpoints[0].IP != svcTestServer.String() || s.Endpoints[0].Port != s.Port {
					t.Errorf("n=%d: target %+v", n, s)
				}
				continue
			}
			if ips[s.ClusterIP] {
				t.Errorf("n=%d: ClusterIP %s twice", n, s.ClusterIP)
			}
			ips[s.ClusterIP] = true
			ip, be := netip.MustParseAddr(s.ClusterIP), netip.MustParseAddr(s.Endpoints[0].IP)
			if !svcCIDRPrefix.Contains(ip) || s.ClusterIP == svcTargetIP || ip.As4()[3] == 0 || ip.As4()[3] == 255 {
				t.Errorf("n=%d: dummy ClusterIP %s", n, ip)
			}
			if !cluster.Contains(be) || node.Contains(be) {
				t.Errorf("n=%d: dummy backend %s must be in the cluster, off this node", n, be)
			}
		}
		if len(names) != n {
			t.Errorf("n=%d: %d Services", n, len(names))
		}
		if first != (n-1)/2 {
			t.Errorf("n=%d: the target is at %d of kube-proxy's order, want the middle %d", n, first, (n-1)/2)
		}
		if got := len(list) - (n - 1); got != 3 {
			t.Errorf("n=%d: target has %d ports", n, got)
		}
	}
	if len(svcList(maxServices, svcTestServer, svcPorts{1, 2, 3})) != maxServices+2 {
		t.Error("maxServices does not fit")
	}
}

// TestK8sObjects: the objects ternctl applies: one Service and one
// EndpointSlice per Service, the target's three ports in one Service,
// port = targetPort, the slice labelled with its Service.
func TestK8sObjects(t *testing.T) {
	objs := k8sObjects(svcList(4, svcTestServer, svcPorts{20001, 20002, 20003}))
	if len(objs) != 8 {
		t.Fatalf("%d objects for 4 Services", len(objs))
	}
	var target *corev1.Service
	var slice *discoveryv1.EndpointSlice
	for _, o := range objs {
		switch v := o.(type) {
		case *corev1.Service:
			if v.Name == svcTargetName {
				target = v
			}
		case *discoveryv1.EndpointSlice:
			if v.Labels[discoveryv1.LabelServiceName] == svcTargetName {
				slice = v
			}
		}
	}
	if target == nil || slice == nil {
		t.Fatal("no target Service or slice")
	}
	if target.Spec.ClusterIP != svcTargetIP || len(target.Spec.Ports) != 3 || target.Spec.Ports[2].Protocol != corev1.ProtocolUDP ||
		target.Spec.Ports[1].Port != 20002 || target.Spec.Ports[1].TargetPort.IntValue() != 20002 {
		t.Errorf("target %+v", target.Spec)
	}
	if len(slice.Ports) != 3 || *slice.Ports[0].Name != "crr" || *slice.Ports[0].Port != 20001 ||
		len(slice.Endpoints) != 1 || slice.Endpoints[0].Addresses[0] != svcTestServer.String() {
		t.Errorf("slice %+v", slice)
	}
	if got := objName(objs[0]); got != dummyName(0) {
		t.Errorf("first object %s", got)
	}
	if dummyIndex(dummyName(1234)) != 1234 || dummyIndex(svcTargetName) != -1 {
		t.Error("dummyIndex")
	}
}

// TestKubeProxyRestore: the first sync writes kube-proxy's rules with the
// jumps from the built-in chains; a later one leaves the jumps alone,
// rewrites every chain it declares, and flushes then deletes the chains
// of what went (the target's old endpoint chains, the dummies beyond n).
func TestKubeProxyRestore(t *testing.T) {
	first, chains := kubeProxyRestore(svcList(10, svcTestServer, svcPorts{20001, 20002, 20003}), nil, false)
	if !strings.Contains(first, "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES") ||
		!strings.Contains(first, "-A FORWARD ") || strings.Contains(first, "-X ") {
		t.Errorf("first sync:\n%s", first)
	}
	second, chains2 := kubeProxyRestore(svcList(5, svcTestServer, svcPorts{20004, 20005, 20006}), chains, true)
	for _, line := range strings.Split(second, "\n") {
		if builtinJump(line) {
			t.Errorf("second sync repeats a jump: %s", line)
		}
	}
	var gone []string
	for _, c := range chains {
		if !slices.Contains(chains2, c) {
			gone = append(gone, c)
		}
	}
	// 5 dummies (their SVC and SEP chains) and the target's 3 SEP chains.
	if len(gone) != 5*2+3 {
		t.Errorf("%d chains gone: %v", len(gone), gone)
	}
	nat := second[strings.Index(second, "*nat"):]
	for _, c := range gone {
		decl, del := strings.Index(nat, ":"+c+" - [0:0]\n"), strings.Index(nat, "-X "+c+"\n")
		if decl < 0 || del < 0 || del < decl || del > strings.Index(nat, "COMMIT") {
			t.Errorf("chain %s: not flushed then deleted in the nat table", c)
		}
	}
	for _, c := range chains2 {
		if strings.Contains(nat, "-X "+c+"\n") {
			t.Errorf("chain %s deleted while in use", c)
		}
	}
}

func TestConfigServiceCounts(t *testing.T) {
	cfg := Config{Pin: "none"}
	if err := cfg.resolve(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.ServiceCounts, ServiceCounts) {
		t.Errorf("default %v", cfg.ServiceCounts)
	}
	cfg = Config{Pin: "none", Quick: true}
	if err := cfg.resolve(); err != nil || !slices.Equal(cfg.ServiceCounts, QuickServiceCounts) {
		t.Errorf("quick %v %v", cfg.ServiceCounts, err)
	}
	var fcfg Config
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fcfg.RegisterFlags(fs)
	if err := fs.Parse([]string{"--services", "10_000, 10,1000", "--paths", "direct,ebpf,kube-proxy,iptables-kube-proxy", "--workloads", "services"}); err != nil {
		t.Fatal(err)
	}
	fcfg.Pin = "none"
	if err := fcfg.resolve(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(fcfg.ServiceCounts, []int{10, 1000, 10000}) {
		t.Errorf("--services: %v", fcfg.ServiceCounts)
	}
	for _, bad := range [][]int{{0}, {10, 10}, {maxServices + 1}} {
		c := Config{Pin: "none", ServiceCounts: bad}
		if err := c.resolve(); err == nil {
			t.Errorf("--services %v accepted", bad)
		}
	}
}

func servicesFixture() *Results {
	r := fixtureResults()
	r.Paths = []PathResult{{Name: PathDirect, Status: StatusOK}, {Name: PathEBPF, Status: StatusOK}, {Name: PathKubeProxy, Status: StatusOK}}
	w := &servicesWorkload{counts: []int{10, 10000}}
	r.Workloads = []WorkloadResult{{Name: w.Name(), Title: w.Title(), Short: w.Short(), Metrics: w.Metrics(), Status: StatusOK}}
	r.Samples = nil
	conns := map[string]map[int][]float64{
		PathDirect:    {10: {10000, 10000}, 10000: {10000, 9000}},
		PathEBPF:      {10: {9000, 9500}, 10000: {9000, 9000}},
		PathKubeProxy: {10: {8000, 8000}, 10000: {2000, 3000}},
	}
	for rep := 1; rep <= 2; rep++ {
		for _, p := range []string{PathDirect, PathEBPF, PathKubeProxy} {
			m := map[string]float64{}
			for _, n := range []int{10, 10000} {
				for _, s := range svcMetrics {
					m[sweepMetricName(s.name, n)] = 5
				}
				m[sweepMetricName("conns_per_s", n)] = conns[p][n][rep-1]
				if p != PathKubeProxy {
					delete(m, sweepMetricName("nat_rules", n))
				}
			}
			r.Samples = append(r.Samples, Sample{Path: p, Workload: servicesName, Rep: rep, Metrics: m})
		}
	}
	r.Config.Workloads = []string{servicesName}
	r.Config.ServiceCounts = []int{10, 10000}
	r.Summarize()
	return r
}

func TestRenderReportServices(t *testing.T) {
	var b bytes.Buffer
	if err := RenderReport(&b, servicesFixture()); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"### Services: a ClusterIP with 10, 10,000 Services on the node",
		"#### TCP connection rate through the Service (connections/s, higher is better)",
		"| Services | direct | ebpf | kube-proxy | ebpf × direct | kube-proxy × direct | ebpf × kube-proxy | direct × 10 | ebpf × 10 | kube-proxy × 10 |",
		"| 10 | 10,000 (10,000–10,000) | 9,250 (9,000–9,500) | 8,000 (8,000–8,000) | 0.93× (0.90×–0.95×) | 0.80× (0.80×–0.80×) | 1.16× (1.12×–1.19×) | 1 | 1 | 1 |",
		"| 10,000 | 9,500 (9,000–10,000) | 9,000 (9,000–9,000) | 2,500 (2,000–3,000) | 0.95× (0.90×–1.00×) | 0.27× (0.20×–0.33×) | 3.75× (3.00×–4.50×) | 0.95× (0.90×–1.00×) | 0.97× (0.95×–1.00×) | 0.31× (0.25×–0.38×) |",
		"Rules in the node's nat table, kube-proxy",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if strings.Contains(md, "| TCP connection rate through the Service (connections/s, higher is better) | ebpf |") {
		t.Error("the Service workload has generic rows")
	}
	checkMarkdownTables(t, md)

	b.Reset()
	if err := RenderChart(&b, servicesFixture()); err != nil {
		t.Fatal(err)
	}
	st := parseSVG(t, b.Bytes())
	panels := 0
	for _, s := range st.texts {
		if strings.HasPrefix(s, "Services: ") {
			panels++
		}
	}
	if panels != 3 { // connection rate, TCP and UDP ping-pong
		t.Errorf("%d Service panels in the chart", panels)
	}
}
