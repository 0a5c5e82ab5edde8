// Package ctl implements ternctl, which shows what a node's Tern datapath
// does (endpoints, attached programs, counters, NetworkPolicies in force)
// and changes the node's NetworkPolicy state.
package ctl

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"text/tabwriter"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/cni"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
)

const usage = `usage: ternctl [--cni-conf FILE] [-o table|json] COMMAND

commands:
  get endpoints         pods on this node: IP, MACs, host veth, attached program
  get metrics           datapath counters (packets and bytes by outcome and drop reason)
  get policies          NetworkPolicies in force: selected local pods, policy types, rules
  apply -f FILE|DIR     add or replace the Pods, Namespaces and NetworkPolicies of
                        the manifests in the node's policy state, and enforce it
  delete -f FILE|DIR    remove them (by kind, namespace and name), and enforce it
  monitor [--type drop|policy|trace] [--pod NS/NAME] [--count N] [--duration D]
                        datapath events as they happen (eBPF datapath): drops,
                        NetworkPolicy verdicts, forwarding traces
  explain --from NS/POD|IP --to NS/POD|IP --port N [--protocol TCP|UDP|SCTP]
                        what the datapath would do with the first packet of a
                        connection, without sending it, checked against the
                        reference evaluator

apply and delete read multi-document YAML or JSON (a directory: its *.yaml,
*.yml and *.json files, "-": standard input), strictly: an invalid object is
named and nothing changes. The datapath is updated before they return.
Endpoints are matched to Pod objects by the K8S_POD_NAMESPACE and
K8S_POD_NAME they were added with.

--cni-conf defaults to the first conflist in /etc/cni/net.d with a tern plugin.
`

// Run executes ternctl with args (without the program name).
func Run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ternctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	confPath := fs.String("cni-conf", "", "network configuration (conflist or conf) of the tern network")
	output := fs.String("o", "table", "output format: table or json")
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	if err := fs.Parse(args); err != nil {
		return err
	}
	if v := fs.Arg(0); v == "monitor" || v == "explain" {
		return observe(*confPath, fs.Args(), *output, stdout, stderr)
	}
	rest := fs.Args()
	if len(rest) == 0 || (rest[0] == "get" && len(rest) != 2) || (rest[0] != "get" && rest[0] != "apply" && rest[0] != "delete") {
		fs.Usage()
		return errors.New("unknown command")
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("unknown output format %q", *output)
	}
	var files []string
	if rest[0] == "apply" || rest[0] == "delete" {
		var err error
		if files, err = parseFileFlags(rest[0], rest[1:], stderr); err != nil {
			return err
		}
	}
	path := *confPath
	if path == "" {
		p, err := cni.FindConfFile(cni.DefaultConfDir)
		if err != nil {
			return err
		}
		path = p
	}
	conf, err := cni.LoadConfFile(path)
	if err != nil {
		return err
	}
	switch rest[0] {
	case "apply":
		return applyManifests(conf, files, false, stdout)
	case "delete":
		return applyManifests(conf, files, true, stdout)
	}
	switch rest[1] {
	case "endpoints", "endpoint", "ep":
		return getEndpoints(conf, *output, stdout)
	case "metrics", "counters":
		return getMetrics(conf, *output, stdout)
	case "policies", "policy", "networkpolicies", "netpol":
		return getPolicies(conf, *output, stdout)
	}
	fs.Usage()
	return fmt.Errorf("unknown resource %q", rest[1])
}

// endpointRow is one line of `get endpoints`.
type endpointRow struct {
	IP        string `json:"ip"`
	Pod       string `json:"pod,omitempty"`
	HostVeth  string `json:"hostVeth"`
	Ifindex   int    `json:"ifindex"`
	PodMAC    string `json:"podMAC"`
	InMap     bool   `json:"inMap,omitempty"`
	Program   string `json:"program,omitempty"`
	Container string `json:"containerID"`
}

func getEndpoints(conf *cni.NetConf, output string, w io.Writer) error {
	eps, err := conf.Endpoints()
	if err != nil {
		return err
	}
	var m *ebpf.Map
	if conf.IsEBPF() {
		m, err = ebpf.LoadPinnedMap(conf.BPFFSDir+"/maps/tern_endpoints", &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return fmt.Errorf("open endpoints map: %w", err)
		}
		defer m.Close()
	}
	rows := make([]endpointRow, 0, len(eps))
	for _, ep := range eps {
		r := endpointRow{IP: ep.IP.IP.String(), HostVeth: ep.HostVeth, Ifindex: ep.HostIfindex, PodMAC: ep.PodMAC.String(), Container: ep.ContainerID}
		if ep.PodName != "" {
			r.Pod = ep.PodNamespace + "/" + ep.PodName
		}
		if m != nil {
			key, err := ebpfdp.EndpointKey(ep.IP.IP)
			if err == nil {
				var v []byte
				r.InMap = m.Lookup(key, &v) == nil
			}
			r.Program = attachedPrograms(ep.HostIfindex)
		}
		rows = append(rows, r)
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].IP < rows[j].IP })
	if output == "json" {
		return writeJSON(w, rows)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IP\tPOD\tHOST VETH\tIFINDEX\tPOD MAC\tIN MAP\tPROGRAM")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%v\t%s\n", r.IP, r.Pod, r.HostVeth, r.Ifindex, r.PodMAC, r.InMap, r.Program)
	}
	return tw.Flush()
}

// attachedPrograms names what runs at tc ingress of an interface: the TCX
// chain, else clsact filters (bpftool 7.1 cannot show TCX).
func attachedPrograms(ifindex int) string {
	res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		for _, p := range res.Programs {
			if prog, err := ebpf.NewProgramFromID(p.ID); err == nil {
				info, ierr := prog.Info()
				prog.Close()
				if ierr == nil {
					return fmt.Sprintf("tcx/ingress %s id %d", info.Name, p.ID)
				}
			}
		}
	}
	lk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return ""
	}
	filters, err := netlink.FilterList(lk, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return ""
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok {
			return fmt.Sprintf("tc/ingress %s id %d", bf.Name, bf.Id)
		}
	}
	return ""
}

func getMetrics(conf *cni.NetConf, output string, w io.Writer) error {
	if !conf.IsEBPF() {
		return errors.New("metrics: the iptables datapath keeps its counters in iptables (iptables -L -v)")
	}
	m, err := ebpf.LoadPinnedMap(conf.BPFFSDir+"/maps/tern_metrics", &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("open metrics map: %w", err)
	}
	defer m.Close()
	vals, err := ebpfdp.ReadMetrics(m)
	if err != nil {
		return err
	}
	names := make([]string, 0, len(vals))
	for k := range vals {
		names = append(names, k)
	}
	sort.Strings(names)
	if output == "json" {
		out := map[string]map[string]uint64{}
		for _, n := range names {
			out[n] = map[string]uint64{"packets": vals[n].Packets, "bytes": vals[n].Bytes}
		}
		return writeJSON(w, out)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "COUNTER\tPACKETS\tBYTES")
	for _, n := range names {
		fmt.Fprintf(tw, "%s\t%d\t%d\n", n, vals[n].Packets, vals[n].Bytes)
	}
	return tw.Flush()
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
