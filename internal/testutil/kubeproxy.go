package testutil

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/ternlabs/tern/internal/kubeproxy"
)

// kube-proxy's iptables-mode rules are rendered by package
// internal/kubeproxy (which says what they reproduce and from where), so
// that ternbench's Service workloads write the same rules the tests drive.
// These names keep the tests' vocabulary.
type (
	// KubeEndpoint is one ready endpoint of a Service port.
	KubeEndpoint = kubeproxy.Endpoint
	// KubeService is one port of a Service, as kube-proxy sees it.
	KubeService = kubeproxy.Service
)

// KubeMasqueradeMark is kube-proxy's default --iptables-masquerade-bit 14.
const KubeMasqueradeMark = kubeproxy.MasqueradeMark

// KubeProxyRules renders the iptables-restore input kube-proxy writes for
// services, with clusterCIDR as its --cluster-cidr.
func KubeProxyRules(clusterCIDR string, services []KubeService) string {
	return kubeproxy.Rules(clusterCIDR, services)
}

// InstallKubeProxy writes kube-proxy's rules for services into the
// namespace n (a simulated node), with iptables-restore --noflush as
// kube-proxy does. The rules go with the namespace.
func InstallKubeProxy(n ns.NetNS, clusterCIDR string, services []KubeService) error {
	return restoreIn(n, KubeProxyRules(clusterCIDR, services))
}

// HostPort writes a hostPort mapping of the portmap plugin's shape into
// n: traffic to any local address on hostPort/proto is DNATed to
// podIP:podPort. hostPort is the reference portmap plugin's job, not
// kube-proxy's: CNI-HOSTPORT-DNAT, from PREROUTING and OUTPUT for local
// destinations, a hairpin masquerade for the pod reaching its own hostPort.
func HostPort(n ns.NetNS, proto string, hostPort int, podIP string, podPort int) error {
	chain := "CNI-DN-" + kubeproxy.ChainHash(podIP + proto + strconv.Itoa(hostPort))[:12]
	var b strings.Builder
	line := func(words ...string) { b.WriteString(strings.Join(words, " ") + "\n") }
	b.WriteString("*nat\n")
	line(":CNI-HOSTPORT-DNAT", "-", "[0:0]")
	line(":CNI-HOSTPORT-SETMARK", "-", "[0:0]")
	line(":CNI-HOSTPORT-MASQ", "-", "[0:0]")
	line(":"+chain, "-", "[0:0]")
	line("-A", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
	line("-A", "OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "CNI-HOSTPORT-DNAT")
	line("-A", "POSTROUTING", "-j", "CNI-HOSTPORT-MASQ")
	line("-A", "CNI-HOSTPORT-SETMARK", "-j", "MARK", "--set-xmark", "0x2000/0x2000")
	line("-A", "CNI-HOSTPORT-MASQ", "-m", "mark", "--mark", "0x2000/0x2000", "-j", "MASQUERADE")
	line("-A", "CNI-HOSTPORT-DNAT", "-p", proto, "-m", "multiport", "--destination-ports", strconv.Itoa(hostPort), "-j", chain)
	line("-A", chain, "-s", podIP+"/32", "-p", proto, "--dport", strconv.Itoa(hostPort), "-j", "CNI-HOSTPORT-SETMARK")
	line("-A", chain, "-p", proto, "--dport", strconv.Itoa(hostPort), "-j", "DNAT",
		"--to-destination", podIP+":"+strconv.Itoa(podPort))
	b.WriteString("COMMIT\n")
	return restoreIn(n, b.String())
}

func restoreIn(n ns.NetNS, rules string) error {
	return n.Do(func(ns.NetNS) error {
		cmd := exec.Command("iptables-restore", "--noflush", "-w", "5")
		cmd.Stdin = strings.NewReader(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("iptables-restore: %w: %s\nrules:\n%s", err, out, rules)
		}
		return nil
	})
}
