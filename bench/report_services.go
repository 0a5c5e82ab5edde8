package bench

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// renderServices writes the Service workload's section: per metric a
// table with a row per Service count and a column per path, then the
// paired ratios that the targets are stated in: each path against direct
// (the Service against the backend's own IP), ebpf against the kube-proxy
// paths, and each path against itself at the lowest count (flatness). It
// reports whether anything was measured.
func (r *Results) renderServices(b *strings.Builder, wl WorkloadResult) bool {
	p := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }
	l := r.sweepLayout(wl)
	rows := r.rowsOf(wl.Name)
	if len(rows) == 0 || len(l.counts) == 0 {
		return false
	}
	p("### %s\n\n", wl.Title)
	p("For each count *n* the node holds *n* Services: the target (ClusterIP %s, one port each for the connection rate, TCP and UDP ping-pong, its one backend the server pod) and *n* − 1 others, one TCP port each, "+
		"each pointing at a backend of its own that no packet reaches. On `ebpf` and `direct` they are Service and EndpointSlice objects applied with `ternctl apply` (Tern's load balancer); "+
		"on `kube-proxy` and `iptables-kube-proxy` they are kube-proxy's iptables-mode rules (internal/kubeproxy, the writer the e2e tests use) written with `iptables-restore --noflush`, "+
		"the target in the middle of KUBE-SERVICES (kube-proxy writes Services in map order: a new connection walks half of them on average). "+
		"The client dials the ClusterIP, except on `direct`, which dials the server pod's IP with the same Services present. "+
		"The connection rate is tern-crr (a C client and server built with cc, one epoll thread each, pinned like sockperf: "+strconv.Itoa(crrInFlight)+" connections in flight, each connect, 1 byte each way, RST close); "+
		"its CPU per connection is the CPU time client and server used (getrusage, with the softirq work that ran in their context) over the connections they completed, steadier than the rate when other processes share the CPU. "+
		"The ping-pongs are sockperf, as tcp-rr and udp-rr; then the path proves its Service machinery translated the traffic. "+
		"**× direct** and **ebpf × …** are paired ratios at the same count; **× %s** is the paired ratio to the same path at %s Services, each within one repetition.\n\n",
		svcTargetIP, groupThousands(int64(l.counts[0])), groupThousands(int64(l.counts[0])))
	first := l.counts[0]
	hasDirect := slices.Contains(l.paths, PathDirect)
	var ebpfVs []string
	if slices.Contains(l.paths, PathEBPF) {
		for _, o := range []string{PathKubeProxy, PathIptablesKubeProxy} {
			if slices.Contains(l.paths, o) {
				ebpfVs = append(ebpfVs, o)
			}
		}
	}
	paired := func(metric, a, bPath string) *Ratio {
		return SummarizeRatios(PairedRatios(r.values(wl.Name, metric, a), r.values(wl.Name, metric, bPath)))
	}
	for _, spec := range l.bases {
		if spec.Better == Informational {
			continue
		}
		p("#### %s\n\n", metricLabel(spec))
		head := append([]string{"Services"}, l.paths...)
		for _, path := range l.paths {
			if hasDirect && path != PathDirect {
				head = append(head, path+" × direct")
			}
		}
		for _, o := range ebpfVs {
			head = append(head, "ebpf × "+o)
		}
		for _, path := range l.paths {
			head = append(head, fmt.Sprintf("%s × %s", path, groupThousands(int64(first))))
		}
		p("| %s |\n|%s|\n", strings.Join(head, " | "), strings.TrimSuffix(strings.Repeat("--:|", len(head)), "|"))
		for _, n := range l.counts {
			name := sweepMetricName(spec.Name, n)
			cells := []string{groupThousands(int64(n))}
			for _, path := range l.paths {
				cells = append(cells, r.sweepCell(wl, spec.Name, n, path))
			}
			for _, path := range l.paths {
				if hasDirect && path != PathDirect {
					cells = append(cells, ratioText(paired(name, path, PathDirect)))
				}
			}
			for _, o := range ebpfVs {
				cells = append(cells, ratioText(paired(name, PathEBPF, o)))
			}
			cells = append(cells, r.sweepVsFirstCells(wl, spec.Name, first, n, l.paths)...)
			p("| %s |\n", strings.Join(cells, " | "))
		}
		p("\n")
	}
	r.renderSweepInformational(b, wl, l, "Services")
	return true
}
