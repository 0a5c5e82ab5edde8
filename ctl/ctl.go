// Package ctl implements ternctl, which shows what a node's Tern datapath
// does (endpoints, attached programs, counters, NetworkPolicies in force)
// and changes the node's NetworkPolicy state.
package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/ternlabs/tern/cni"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
)

const usage = `usage: ternctl [--cni-conf FILE] [-o table|json] COMMAND [-o table|json]

commands:
  get endpoints         pods on this node: IP, MACs, host veth, attached program
  get counters [--all] [--watch [--interval 2s] [--count N]]
                        datapath counters, summed over CPUs: packets and bytes by
                        outcome and drop reason (eBPF), or the packet and byte
                        counters of the network's iptables rules; zero rows are
                        hidden unless --all; --watch prints rates per second
                        every interval until Ctrl-C ("get metrics": the same; its
                        -o json keeps the earlier shape, every counter by name)
  get policies          NetworkPolicies in force: selected local pods, policy types, rules
  get services          the Service table of Tern's load balancer (services "ebpf"):
                        frontends, their backends or what they do without any
  apply -f FILE|DIR     add or replace the Pods, Namespaces, NetworkPolicies,
                        Services and EndpointSlices of the manifests in the
                        node's state, and enforce it
  delete -f FILE|DIR    remove them (by kind, namespace and name), and enforce it
  monitor [--type drop|policy|trace] [--pod NS/NAME] [--count N] [--duration D]
                        datapath events as they happen (eBPF datapath): drops,
                        NetworkPolicy verdicts, forwarding traces
  explain --from NS/POD|IP --to NS/POD|IP --port N [--protocol TCP|UDP|SCTP]
                        what the datapath would do with the first packet of a
                        connection, without sending it, checked against the
                        reference evaluator

apply and delete read multi-document YAML or JSON (a directory: its *.yaml,
*.yml and *.json files, "-": standard input), also lists as kubectl prints
them (kind: List, or NetworkPolicyList etc.), strictly: an invalid object is
named and nothing changes. Deleting an object that is not there prints
"not found" and is not an error (as kubectl delete --ignore-not-found).
The datapath is updated before they return.
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
	if len(rest) == 0 || (rest[0] == "get" && len(rest) < 2) || (rest[0] != "get" && rest[0] != "apply" && rest[0] != "delete") {
		fs.Usage()
		return errors.New("unknown command")
	}
	var files []string
	var counters countersOptions
	switch rest[0] {
	case "apply", "delete":
		var err error
		if files, err = parseFileFlags(rest[0], rest[1:], stderr); err != nil {
			return err
		}
	case "get":
		var err error
		if counters, err = parseGetFlags(rest[1], rest[2:], *output, stderr); err != nil {
			return err
		}
		*output = counters.output
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("unknown output format %q", *output)
	}
	conf, err := loadConf(*confPath)
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
	case "counters", "counter", "metrics":
		// `get metrics -o json` keeps the shape it had before counters
		// existed (every counter, name -> packets and bytes) for scripts.
		counters.legacyJSON = rest[1] == "metrics" && !counters.watch
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		return getCounters(ctx, conf, counters, stdout)
	case "policies", "policy", "networkpolicies", "netpol":
		return getPolicies(conf, *output, stdout)
	case "services", "service", "svc":
		return getServices(conf, *output, stdout)
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

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// writeJSONLine writes v as one line of JSON (a stream of objects for tools).
func writeJSONLine(w io.Writer, v any) error {
	return json.NewEncoder(w).Encode(v)
}

// parseGetFlags parses the flags after `get RESOURCE` (-o for every
// resource; --all, --watch, --interval and --count for counters), so both
// `ternctl -o json get counters` and `ternctl get counters -o json` work.
func parseGetFlags(resource string, args []string, output string, stderr io.Writer) (countersOptions, error) {
	fs := flag.NewFlagSet("ternctl get "+resource, flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := countersOptions{}
	fs.StringVar(&o.output, "o", output, "output format: table or json")
	isCounters := resource == "counters" || resource == "counter" || resource == "metrics"
	if isCounters {
		fs.BoolVar(&o.all, "all", false, "also list counters that are zero")
		fs.BoolVar(&o.watch, "watch", false, "print the rates every --interval until interrupted (Ctrl-C)")
		fs.DurationVar(&o.interval, "interval", 2*time.Second, "--watch: time between samples (100ms to 1m)")
		fs.IntVar(&o.count, "count", 0, "--watch: stop after this many samples (0: until interrupted)")
	}
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("get %s: unexpected argument %q", resource, fs.Arg(0))
	}
	return o, o.validate()
}
