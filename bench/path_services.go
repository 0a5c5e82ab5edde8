package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ternlabs/tern/internal/kubeproxy"
)

// The Service paths. The ebpf path (PathEBPF) is Tern's own load balancer
// when the Service workload is selected (its network gets "services":
// "ebpf"); these three are named in --paths only.
const (
	// PathDirect is the eBPF datapath with Tern's load balancer and the
	// same Services as ebpf, the client dialling the backend pod's own IP:
	// what a Service costs is the difference.
	PathDirect = "direct"
	// PathKubeProxy is the eBPF datapath with services "kube-proxy" and
	// kube-proxy's iptables-mode rules in the node.
	PathKubeProxy = "kube-proxy"
	// PathIptablesKubeProxy is Tern's iptables datapath with the same rules.
	PathIptablesKubeProxy = "iptables-kube-proxy"
)

// ServicePaths are run only when named in --paths.
var ServicePaths = []string{PathDirect, PathKubeProxy, PathIptablesKubeProxy}

// The Services every Service path holds: svcTargetIP is the measured
// Service (its backend the server pod), the others point at dummy backends
// in svcDummyBackends, which no packet reaches.
const (
	svcCIDR       = "10.96.0.0/16"
	svcTargetIP   = "10.96.0.10"
	svcNamespace  = "ternbench-svc"
	svcTargetName = "target"
	svcDummyPort  = 80
	svcDummyDst   = 8080
	// maxServices bounds --services: the dummies' ClusterIPs and backends
	// are numbered inside a /16 and the clusterCIDR's upper half.
	maxServices = 30000
)

var (
	svcDummyFirstIP      = netip.MustParseAddr("10.96.1.0")
	svcDummyFirstBackend = netip.MustParseAddr("10.244.128.0")
)

var servicePathDescriptions = map[string]string{
	PathDirect:            "Tern ebpf datapath with services \"ebpf\" and the same Services as ebpf, the client dialling the server pod's own IP (the limit of a Service)",
	PathKubeProxy:         "Tern ebpf datapath with services \"kube-proxy\" (serviceCIDR " + svcCIDR + ": Service traffic goes to the node's stack) and kube-proxy's iptables-mode rules (internal/kubeproxy, written with iptables-restore as kube-proxy does)",
	PathIptablesKubeProxy: "Tern iptables datapath (bridge, TERN-FWD chains) with kube-proxy's iptables-mode rules as on kube-proxy",
}

// serviceBaselines: the paths a Service path's "× limit" and "× iptables"
// ratios compare with in the generic tables (the Service sweep's own
// tables compare with direct and kube-proxy).
var serviceBaselines = map[string][2]string{
	PathDirect:            {"", ""},
	PathKubeProxy:         {PathDirect, ""},
	PathIptablesKubeProxy: {PathDirect, ""},
}

// svcPorts are the target Service's ports, one per measurement; port and
// targetPort are the same number, and new at every install so that a
// sample never meets the previous one's TIME_WAIT sockets or conntrack
// entries.
type svcPorts struct{ crr, tcp, udp int }

// serviceSet makes a path hold a given number of Services and says where
// the client reaches the target Service.
type serviceSet interface {
	// install makes exactly n Services present (the target on ports and
	// n-1 dummies), replacing what an earlier install left.
	install(ctx context.Context, n int, ports svcPorts) (serviceInstall, error)
	// prove checks, after the traffic of an install, that the path's own
	// Service machinery translated it.
	prove(ctx context.Context) error
	// remove deletes every Service.
	remove(ctx context.Context) error
	// dst is the address the client dials for the target Service.
	dst() net.IP
	// proofText says what prove checks.
	proofText() string
}

// serviceInstall describes one install.
type serviceInstall struct {
	took     time.Duration
	natRules int // rules in the node's nat table, -1 when not iptables
}

// servicesSelected reports whether the Service workload runs.
func (r *runner) servicesSelected() bool { return slices.Contains(r.cfg.Workloads, servicesName) }

// setupServicePath sets up one of ServicePaths, or the ebpf path with
// Tern's load balancer.
func (r *runner) setupServicePath(ctx context.Context, path string) (*Topology, error) {
	lbConf := map[string]any{"services": "ebpf"}
	kpConf := map[string]any{"services": "kube-proxy", "serviceCIDR": []string{svcCIDR}}
	var (
		t   *Topology
		err error
	)
	switch path {
	case PathEBPF, PathDirect:
		t, err = r.setupTern(ctx, path, PathEBPF, lbConf)
	case PathKubeProxy:
		t, err = r.setupTern(ctx, path, PathEBPF, kpConf)
	case PathIptablesKubeProxy:
		t, err = r.setupTern(ctx, path, PathIptables, kpConf)
	default:
		return nil, fmt.Errorf("unknown Service path %q", path)
	}
	if err != nil {
		return t, err
	}
	switch path {
	case PathEBPF, PathDirect:
		if t.policy == nil {
			return t, fmt.Errorf("ternctl is needed to apply Services: %s", r.noTernctl)
		}
		lb := &ebpfServices{p: t.policy, direct: path == PathDirect, t: t}
		// No removal at teardown: the node's state and bpffs go with the
		// topology.
		t.services = lb
		t.checks = append(t.checks, `network "services": "ebpf": Service and EndpointSlice objects applied with ternctl apply/delete`)
		if path == PathDirect {
			t.checks = append(t.checks, "the client dials the server pod's IP, not the ClusterIP")
		}
	default:
		dir := filepath.Join(r.tmp, "kube-proxy-"+path)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return t, err
		}
		// A node running kube-proxy forwards: Service traffic is DNATed
		// and routed by the node's stack (Tern's eBPF datapath itself
		// needs no ip_forward for pod-to-pod traffic).
		if err := t.Node.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
			return t, err
		}
		kp := &kubeProxyServices{t: t, dir: dir}
		t.services = kp
		if path == PathKubeProxy {
			// Service traffic goes through the node's netfilter (that is
			// what kube-proxy mode means), so the ebpf path's FORWARD
			// check does not hold; the tc programs must be there.
			t.verifier = &tcProgramVerifier{t: t}
		}
		t.checks = append(t.checks, `network "services": "kube-proxy", "serviceCIDR": ["`+svcCIDR+`"]; node net.ipv4.ip_forward=1; kube-proxy's iptables-mode rules written with iptables-restore --noflush`)
	}
	t.checks = append(t.checks, "after the Service measurements at every count: "+t.services.proofText())
	return t, r.finish(ctx, t)
}

// svcManifest is the target Service and dummies, in kube-proxy's
// rule order: the target in the middle of the n-1 dummies. kube-proxy
// writes its Services in map order, so on average a new connection walks
// half of KUBE-SERVICES before it meets its Service; the middle is that
// average, every time.
func svcList(n int, server net.IP, ports svcPorts) []kubeproxy.Service {
	var out []kubeproxy.Service
	target := func() []kubeproxy.Service {
		var ts []kubeproxy.Service
		for _, p := range []struct {
			name, proto string
			port        int
		}{{"crr", "tcp", ports.crr}, {"tcp-rr", "tcp", ports.tcp}, {"udp-rr", "udp", ports.udp}} {
			ts = append(ts, kubeproxy.Service{Namespace: svcNamespace, Name: svcTargetName, PortName: p.name, Protocol: p.proto,
				ClusterIP: svcTargetIP, Port: p.port, Endpoints: []kubeproxy.Endpoint{{IP: server.String(), Port: p.port, Local: true}}})
		}
		return ts
	}
	half := (n - 1) / 2
	for i := 0; i < n-1; i++ {
		if i == half {
			out = append(out, target()...)
		}
		out = append(out, dummyService(i))
	}
	if n-1 <= half {
		out = append(out, target()...)
	}
	return out
}

func dummyName(i int) string { return fmt.Sprintf("svc-%05d", i) }

// dummyService is the i-th other Service: TCP port 80 of its ClusterIP to
// port 8080 of a backend that does not exist.
func dummyService(i int) kubeproxy.Service {
	return kubeproxy.Service{Namespace: svcNamespace, Name: dummyName(i), Protocol: "tcp",
		ClusterIP: dummyIP(i).String(), Port: svcDummyPort,
		Endpoints: []kubeproxy.Endpoint{{IP: dummyBackend(i).String(), Port: svcDummyDst}}}
}

func addrPlus(a netip.Addr, n int) netip.Addr {
	b := a.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// dummyIP skips the addresses ending in .0 and .255 for readability.
func dummyIP(i int) netip.Addr      { return addrPlus(svcDummyFirstIP, 1+i+2*(i/254)) }
func dummyBackend(i int) netip.Addr { return addrPlus(svcDummyFirstBackend, 1+i+2*(i/254)) }

// k8sObjects renders Service and EndpointSlice objects (ternctl's input)
// for the kube-proxy-style list, merging the target's ports into one
// Service.
func k8sObjects(svcs []kubeproxy.Service) []any {
	var out []any
	byName := map[string]int{}
	for _, s := range svcs {
		proto := corev1.ProtocolTCP
		if s.Protocol == "udp" {
			proto = corev1.ProtocolUDP
		}
		i, ok := byName[s.Name]
		if !ok {
			i = len(out)
			byName[s.Name] = i
			out = append(out, &corev1.Service{
				TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
				ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name},
				Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: s.ClusterIP, ClusterIPs: []string{s.ClusterIP}},
			}, &discoveryv1.EndpointSlice{
				TypeMeta:    metav1.TypeMeta{APIVersion: "discovery.k8s.io/v1", Kind: "EndpointSlice"},
				ObjectMeta:  metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: s.Name}},
				AddressType: discoveryv1.AddressTypeIPv4,
			})
		}
		svc := out[i].(*corev1.Service)
		es := out[i+1].(*discoveryv1.EndpointSlice)
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{Name: s.PortName, Protocol: proto, Port: int32(s.Port),
			TargetPort: intstr.FromInt32(int32(s.Endpoints[0].Port))})
		name, port := s.PortName, int32(s.Endpoints[0].Port)
		es.Ports = append(es.Ports, discoveryv1.EndpointPort{Name: &name, Protocol: &proto, Port: &port})
		if len(es.Endpoints) == 0 {
			ready := true
			for _, ep := range s.Endpoints {
				es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{ep.IP}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}})
			}
		}
	}
	return out
}

// ebpfServices applies the Services to Tern's load balancer with ternctl,
// in the node namespace, as an operator would (the node's store, the
// services compiler, the LB maps written by difference).
type ebpfServices struct {
	p         *ternPolicy
	t         *Topology
	direct    bool
	installed bool // the target is there
	n         int  // dummies present
	files     int
}

func (s *ebpfServices) dst() net.IP {
	if s.direct {
		return s.t.Server.IP
	}
	return net.ParseIP(svcTargetIP).To4()
}

func (s *ebpfServices) proofText() string {
	if s.direct {
		return "the connections went to the server pod's IP"
	}
	return "the node's nat table holds no DNAT rule (nothing but Tern's load balancer can have translated the ClusterIP)"
}

func (s *ebpfServices) file(kind string, objs []any) (string, error) {
	data, err := manifestJSON(objs)
	if err != nil {
		return "", err
	}
	s.files++
	return s.p.write(fmt.Sprintf("services-%d-%s.json", s.files, kind), data)
}

func (s *ebpfServices) install(ctx context.Context, n int, ports svcPorts) (serviceInstall, error) {
	res := serviceInstall{natRules: -1}
	all := k8sObjects(svcList(n, s.t.Server.IP, ports))
	// Apply the target (its ports are new) and the dummies that are not
	// there yet; delete those beyond n-1.
	var apply []any
	for _, o := range all {
		name := objName(o)
		if name == svcTargetName || dummyIndex(name) >= s.n {
			apply = append(apply, o)
		}
	}
	var del []any
	for i := n - 1; i < s.n; i++ {
		del = append(del, k8sObjects([]kubeproxy.Service{dummyService(i)})...)
	}
	start := time.Now()
	if len(del) > 0 {
		f, err := s.file("delete", del)
		if err != nil {
			return res, err
		}
		if err := s.p.run(ctx, "delete", f); err != nil {
			return res, fmt.Errorf("ternctl delete Services: %w", err)
		}
	}
	f, err := s.file("apply", apply)
	if err != nil {
		return res, err
	}
	if err := s.p.run(ctx, "apply", f); err != nil {
		return res, fmt.Errorf("ternctl apply Services: %w", err)
	}
	res.took = time.Since(start)
	s.n, s.installed = n-1, true
	return res, nil
}

func objName(o any) string {
	switch v := o.(type) {
	case *corev1.Service:
		return v.Name
	case *discoveryv1.EndpointSlice:
		return v.Labels[discoveryv1.LabelServiceName]
	}
	return ""
}

// dummyIndex is i of dummyName(i), -1 for other names.
func dummyIndex(name string) int {
	var i int
	if _, err := fmt.Sscanf(name, "svc-%05d", &i); err != nil {
		return -1
	}
	return i
}

func (s *ebpfServices) prove(ctx context.Context) error {
	if s.direct {
		return nil
	}
	out, err := s.t.Node.Run(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		return err
	}
	_, rules := parseIptablesSave(string(out))
	for _, r := range rules {
		if strings.Contains(r.Spec, "DNAT") {
			return fmt.Errorf("ebpf Service check: a DNAT rule is in the node's nat table (-A %s %s): the ClusterIP may not have been translated by Tern's load balancer", r.Chain, r.Spec)
		}
	}
	return nil
}

func (s *ebpfServices) remove(ctx context.Context) error {
	if !s.installed {
		return nil
	}
	objs := k8sObjects(svcList(s.n+1, s.t.Server.IP, svcPorts{1, 2, 3}))
	f, err := s.file("delete", objs)
	if err != nil {
		return err
	}
	if err := s.p.run(ctx, "delete", f); err != nil {
		return fmt.Errorf("ternctl delete Services: %w", err)
	}
	s.n, s.installed = 0, false
	return nil
}

// kubeProxyServices writes kube-proxy's iptables-mode rules for the
// Services into the node, as kube-proxy's sync does: one iptables-restore
// --noflush that declares (and so flushes) every chain it writes and
// deletes the chains of Services that went ("-X"); the jumps from the
// built-in chains are written once.
type kubeProxyServices struct {
	t      *Topology
	dir    string
	jumps  bool     // the built-in chains jump to kube-proxy's
	chains []string // KUBE-* nat chains written by the last install
	target []string // the target's KUBE-SEP-* chains
	writes int
}

func (s *kubeProxyServices) dst() net.IP { return net.ParseIP(svcTargetIP).To4() }

func (s *kubeProxyServices) proofText() string {
	return "the packet counters of the target Service's KUBE-SEP-* DNAT rules (one per port) grew: kube-proxy's rules translated the traffic"
}

// kubeProxyRestore is the iptables-restore --noflush input of one sync of
// kube-proxy for svcs: kubeproxy.Rules, without the jumps from the
// built-in chains when they are there already (jumps), and with the nat
// chains of the previous sync (prev) that svcs no longer have declared
// (flushed) and deleted. It returns the nat chains it writes.
func kubeProxyRestore(svcs []kubeproxy.Service, prev []string, jumps bool) (string, []string) {
	rules := strings.Split(strings.TrimSuffix(kubeproxy.Rules(ternClusterCIDR, svcs), "\n"), "\n")
	var chains []string
	table := ""
	for _, line := range rules {
		if strings.HasPrefix(line, "*") {
			table = line
		}
		if table == "*nat" && strings.HasPrefix(line, ":KUBE-") {
			chains = append(chains, strings.Fields(line[1:])[0])
		}
	}
	var gone []string
	for _, c := range prev {
		if !slices.Contains(chains, c) {
			gone = append(gone, c)
		}
	}
	var b strings.Builder
	table = ""
	for _, line := range rules {
		if strings.HasPrefix(line, "*") {
			table = line
		}
		if jumps && builtinJump(line) {
			continue
		}
		if line == "COMMIT" && table == "*nat" {
			for _, c := range gone {
				fmt.Fprintf(&b, "-X %s\n", c)
			}
		}
		b.WriteString(line + "\n")
		if line == "*nat" {
			for _, c := range gone {
				fmt.Fprintf(&b, ":%s - [0:0]\n", c)
			}
		}
	}
	return b.String(), chains
}

// builtinJump reports whether a rule line of kubeproxy.Rules is a jump
// from a built-in chain into kube-proxy's.
func builtinJump(line string) bool {
	for _, c := range []string{"PREROUTING", "OUTPUT", "POSTROUTING", "FORWARD"} {
		if strings.HasPrefix(line, "-A "+c+" ") {
			return true
		}
	}
	return false
}

func (s *kubeProxyServices) restore(ctx context.Context, rules string) error {
	s.writes++
	f := filepath.Join(s.dir, fmt.Sprintf("rules-%d", s.writes))
	if err := os.WriteFile(f, []byte(rules), 0o600); err != nil {
		return err
	}
	defer os.Remove(f)
	_, err := s.t.Node.Run(ctx, "iptables-restore", "--noflush", "-w", "5", f)
	return err
}

func (s *kubeProxyServices) install(ctx context.Context, n int, ports svcPorts) (serviceInstall, error) {
	res := serviceInstall{natRules: -1}
	svcs := svcList(n, s.t.Server.IP, ports)
	text, chains := kubeProxyRestore(svcs, s.chains, s.jumps)
	var target []string
	for _, sv := range svcs {
		if sv.Name == svcTargetName {
			target = append(target, sv.EndpointChain(sv.Endpoints[0]))
		}
	}
	start := time.Now()
	if err := s.restore(ctx, text); err != nil {
		return res, fmt.Errorf("kube-proxy rules for %d Services: %w", n, err)
	}
	res.took = time.Since(start)
	s.jumps, s.chains, s.target = true, chains, target
	out, err := s.t.Node.Run(ctx, "iptables-save", "-t", "nat")
	if err != nil {
		return res, err
	}
	_, natRules := parseIptablesSave(string(out))
	res.natRules = len(natRules)
	return res, nil
}

func (s *kubeProxyServices) prove(ctx context.Context) error {
	out, err := s.t.Node.Run(ctx, "iptables-save", "-c", "-t", "nat")
	if err != nil {
		return err
	}
	_, rules := parseIptablesSave(string(out))
	for _, c := range s.target {
		var pkts uint64
		found := false
		for _, r := range rules {
			if r.Chain == c && strings.Contains(r.Spec, "-j DNAT") {
				found = true
				pkts += r.Packets
			}
		}
		if !found {
			return fmt.Errorf("kube-proxy check: no DNAT rule in %s", c)
		}
		if pkts == 0 {
			return fmt.Errorf("kube-proxy check: the DNAT rule of %s counted no packet: kube-proxy's rules did not translate the traffic", c)
		}
	}
	return nil
}

// remove deletes kube-proxy's chains and the jumps into them.
func (s *kubeProxyServices) remove(ctx context.Context) error {
	if !s.jumps {
		return nil
	}
	var b strings.Builder
	for _, table := range []string{"filter", "nat"} {
		out, err := s.t.Node.Run(ctx, "iptables-save", "-t", table)
		if err != nil {
			return err
		}
		chains, rules := parseIptablesSave(string(out))
		fmt.Fprintf(&b, "*%s\n", table)
		var kube []string
		for _, c := range chains {
			if strings.HasPrefix(c, "KUBE-") {
				kube = append(kube, c)
				fmt.Fprintf(&b, ":%s - [0:0]\n", c)
			}
		}
		for _, r := range rules {
			if !strings.HasPrefix(r.Chain, "KUBE-") && strings.Contains(r.Spec, "-j KUBE-") {
				fmt.Fprintf(&b, "-D %s %s\n", r.Chain, r.Spec)
			}
		}
		for _, c := range kube {
			fmt.Fprintf(&b, "-X %s\n", c)
		}
		b.WriteString("COMMIT\n")
	}
	if err := s.restore(ctx, b.String()); err != nil {
		return fmt.Errorf("remove kube-proxy's rules: %w", err)
	}
	s.jumps, s.chains, s.target = false, nil, nil
	return nil
}

// tcProgramVerifier: the kube-proxy path's check. Tern's tc programs are
// on both host veths; Service traffic goes through the node's stack by
// design, so FORWARD is not checked (the Service workload proves that
// kube-proxy's rules translated its traffic).
type tcProgramVerifier struct{ t *Topology }

func (v *tcProgramVerifier) setup(ctx context.Context) ([]string, error) {
	checks, err := v.check()
	if err != nil {
		return nil, err
	}
	return append(checks, "the tc programs stay attached after every traffic sample"), nil
}

func (v *tcProgramVerifier) check() ([]string, error) {
	var checks []string
	for _, p := range []*Pod{v.t.Client, v.t.Server} {
		progs, err := hostVethPrograms(v.t.Node, p.HostIfindex)
		if err != nil {
			return nil, err
		}
		if len(progs) == 0 {
			return nil, fmt.Errorf("no tc ingress BPF program on host veth %s of pod %s", p.HostVeth, p.Name)
		}
		checks = append(checks, fmt.Sprintf("%s: %s", p.HostVeth, strings.Join(progs, ", ")))
	}
	return checks, nil
}

func (v *tcProgramVerifier) before(context.Context) error { return nil }
func (v *tcProgramVerifier) after(context.Context) error {
	_, err := v.check()
	return err
}

var errNoServices = errors.New("the path holds no Services (Service paths: ebpf, direct, kube-proxy, iptables-kube-proxy)")
