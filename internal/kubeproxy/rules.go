// Package kubeproxy renders the iptables rules kube-proxy's iptables mode
// writes for a set of Services.
package kubeproxy

import (
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"strconv"
	"strings"
)

// The rules below are the ones kube-proxy's iptables mode writes for the
// Services it is given, reproduced rule for rule (chain names, matches,
// order, the 0x4000 masquerade mark), so that the tests drive the netfilter
// state a real node has rather than a simplification of it. Source:
// kubernetes pkg/proxy/iptables/proxier.go (syncProxyRules and
// writeServiceToEndpointRules), in the layout current releases write
// (KUBE-EXT/KUBE-SVL since v1.24), checked against the expected rule dumps
// in pkg/proxy/iptables/proxier_test.go; the v1.37 tree itself could not
// be fetched when this was written. Left out: the filter table's
// firewall/reject chains (Services without endpoints, or without local
// endpoints under externalTrafficPolicy: Local), session affinity and the
// nfacct counters, which no test here depends on.
//
// The e2e tests (through internal/testutil) and ternbench's Service
// workloads both write these rules, so the benchmark's kube-proxy baseline
// is the rule set the tests prove correct.

// MasqueradeMark is kube-proxy's default --iptables-masquerade-bit 14.
const MasqueradeMark = "0x4000"

// Endpoint is one ready endpoint of a Service port.
type Endpoint struct {
	IP    string
	Port  int
	Local bool // on this node (externalTrafficPolicy: Local uses only these)
}

// Service is one port of a Service, as kube-proxy sees it.
type Service struct {
	Namespace, Name, PortName string
	Protocol                  string // "tcp" or "udp"
	ClusterIP                 string
	Port                      int
	NodePort                  int  // 0: none
	ExternalLocal             bool // externalTrafficPolicy: Local
	Endpoints                 []Endpoint
}

// name is kube-proxy's ServicePortName.String().
func (s Service) name() string {
	n := s.Namespace + "/" + s.Name
	if s.PortName != "" {
		n += ":" + s.PortName
	}
	return n
}

// ChainHash is kube-proxy's servicePortChainNameBase /
// servicePortEndpointChainName hash: base32(sha256(...))[:16].
func ChainHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return base32.StdEncoding.EncodeToString(h[:])[:16]
}

func (s Service) svcChain() string { return "KUBE-SVC-" + ChainHash(s.name()+s.Protocol) }
func (s Service) extChain() string { return "KUBE-EXT-" + ChainHash(s.name()+s.Protocol) }
func (s Service) svlChain() string { return "KUBE-SVL-" + ChainHash(s.name()+s.Protocol) }

// EndpointChain is the KUBE-SEP-* chain that DNATs to ep.
func (s Service) EndpointChain(ep Endpoint) string { return s.sepChain(ep) }

func (s Service) sepChain(ep Endpoint) string {
	return "KUBE-SEP-" + ChainHash(s.name()+s.Protocol+ep.IP+":"+strconv.Itoa(ep.Port))
}

// Rules renders the iptables-restore input kube-proxy writes for
// services, with clusterCIDR as its --cluster-cidr (the local traffic
// detector: sources outside it are masqueraded on their way to a
// ClusterIP).
func Rules(clusterCIDR string, services []Service) string {
	var b strings.Builder
	line := func(words ...string) { b.WriteString(strings.Join(words, " ") + "\n") }
	q := func(s string) string { return `"` + s + `"` }

	b.WriteString("*filter\n")
	line(":KUBE-FORWARD", "-", "[0:0]")
	line("-A", "FORWARD", "-m", "comment", "--comment", q("kubernetes forwarding rules"), "-j", "KUBE-FORWARD")
	line("-A", "KUBE-FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
	line("-A", "KUBE-FORWARD", "-m", "comment", "--comment", q("kubernetes forwarding rules"),
		"-m", "mark", "--mark", MasqueradeMark+"/"+MasqueradeMark, "-j", "ACCEPT")
	line("-A", "KUBE-FORWARD", "-m", "comment", "--comment", q("kubernetes forwarding conntrack rule"),
		"-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
	b.WriteString("COMMIT\n*nat\n")

	chains := []string{"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"}
	for _, s := range services {
		chains = append(chains, s.svcChain())
		if s.NodePort != 0 {
			chains = append(chains, s.extChain())
			if s.ExternalLocal {
				chains = append(chains, s.svlChain())
			}
		}
		for _, ep := range s.Endpoints {
			chains = append(chains, s.sepChain(ep))
		}
	}
	for _, c := range chains {
		line(":"+c, "-", "[0:0]")
	}
	line("-A", "PREROUTING", "-m", "comment", "--comment", q("kubernetes service portals"), "-j", "KUBE-SERVICES")
	line("-A", "OUTPUT", "-m", "comment", "--comment", q("kubernetes service portals"), "-j", "KUBE-SERVICES")
	line("-A", "POSTROUTING", "-m", "comment", "--comment", q("kubernetes postrouting rules"), "-j", "KUBE-POSTROUTING")
	line("-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", MasqueradeMark)
	line("-A", "KUBE-POSTROUTING", "-m", "mark", "!", "--mark", MasqueradeMark+"/"+MasqueradeMark, "-j", "RETURN")
	line("-A", "KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", MasqueradeMark)
	line("-A", "KUBE-POSTROUTING", "-m", "comment", "--comment", q("kubernetes service traffic requiring SNAT"),
		"-j", "MASQUERADE", "--random-fully")

	for _, s := range services {
		p := s.Protocol
		cip := q(s.name() + " cluster IP")
		line("-A", "KUBE-SERVICES", "-m", "comment", "--comment", cip, "-m", p, "-p", p,
			"-d", s.ClusterIP, "--dport", strconv.Itoa(s.Port), "-j", s.svcChain())
		// Off-cluster sources reaching a ClusterIP are masqueraded.
		line("-A", s.svcChain(), "-m", "comment", "--comment", cip, "-m", p, "-p", p,
			"-d", s.ClusterIP, "--dport", strconv.Itoa(s.Port), "!", "-s", clusterCIDR, "-j", "KUBE-MARK-MASQ")
		if s.NodePort != 0 {
			line("-A", "KUBE-NODEPORTS", "-m", "comment", "--comment", s.name(), "-m", p, "-p", p,
				"--dport", strconv.Itoa(s.NodePort), "-j", s.extChain())
			if s.ExternalLocal {
				line("-A", s.extChain(), "-m", "comment", "--comment", q("pod traffic for "+s.name()+" external destinations"),
					"-s", clusterCIDR, "-j", s.svcChain())
				line("-A", s.extChain(), "-m", "comment", "--comment", q("masquerade LOCAL traffic for "+s.name()+" external destinations"),
					"-m", "addrtype", "--src-type", "LOCAL", "-j", "KUBE-MARK-MASQ")
				line("-A", s.extChain(), "-m", "comment", "--comment", q("route LOCAL traffic for "+s.name()+" external destinations"),
					"-m", "addrtype", "--src-type", "LOCAL", "-j", s.svcChain())
				line("-A", s.extChain(), "-j", s.svlChain())
			} else {
				line("-A", s.extChain(), "-m", "comment", "--comment", q("masquerade traffic for "+s.name()+" external destinations"),
					"-j", "KUBE-MARK-MASQ")
				line("-A", s.extChain(), "-j", s.svcChain())
			}
		}
		writeBalancing(line, q, s, s.svcChain(), s.Endpoints)
		if s.NodePort != 0 && s.ExternalLocal {
			var local []Endpoint
			for _, ep := range s.Endpoints {
				if ep.Local {
					local = append(local, ep)
				}
			}
			writeBalancing(line, q, s, s.svlChain(), local)
		}
		for _, ep := range s.Endpoints {
			to := ep.IP + ":" + strconv.Itoa(ep.Port)
			// Hairpin: an endpoint reaching itself through the Service is
			// masqueraded so that its answer comes back through the node.
			line("-A", s.sepChain(ep), "-m", "comment", "--comment", s.name(), "-s", ep.IP, "-j", "KUBE-MARK-MASQ")
			line("-A", s.sepChain(ep), "-m", "comment", "--comment", s.name(), "-m", p, "-p", p,
				"-j", "DNAT", "--to-destination", to)
		}
	}
	line("-A", "KUBE-SERVICES", "-m", "comment", "--comment",
		q("kubernetes service nodeports; NOTE: this must be the last rule in this chain"),
		"-m", "addrtype", "--dst-type", "LOCAL", "-j", "KUBE-NODEPORTS")
	b.WriteString("COMMIT\n")
	return b.String()
}

// writeBalancing writes kube-proxy's random balancing over eps in chain.
func writeBalancing(line func(...string), q func(string) string, s Service, chain string, eps []Endpoint) {
	for i, ep := range eps {
		args := []string{"-A", chain, "-m", "comment", "--comment", q(s.name() + " -> " + ep.IP + ":" + strconv.Itoa(ep.Port))}
		if i < len(eps)-1 {
			args = append(args, "-m", "statistic", "--mode", "random", "--probability", fmt.Sprintf("%0.10f", 1.0/float64(len(eps)-i)))
		}
		line(append(args, "-j", s.sepChain(ep))...)
	}
}
