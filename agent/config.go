package agent

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Config is ternd's configuration: command-line flags, each with an
// environment variable as fallback (the DaemonSet sets those).
type Config struct {
	Kubeconfig   string
	NodeName     string
	CNIConfDir   string
	CNIBinDir    string
	StateDir     string
	BPFFSDir     string
	Datapath     string
	ClusterCIDR  string
	ServiceCIDR  string
	PodCIDR      string
	Network      string
	CNIVersion   string
	Bridge       string
	Portmap      bool
	MTU          int
	Uplink       string
	Routing      string
	Services     string
	HostSvcCgrp  string
	MetricsAddr  string
	HealthAddr   string
	Offline      bool
	Uninstall    bool
	InstallFrom  string
	MinSync      time.Duration
	MaxSync      time.Duration
	ResyncPeriod time.Duration
	GCGrace      time.Duration
	LogLevel     string
}

// supportedCNIVersions are the conflist versions ternd writes: those of
// the tern plugin that libcni's of current runtimes accept.
var supportedCNIVersions = []string{"0.4.0", "1.0.0", "1.1.0"}

// ConfFileName is the CNI configuration ternd writes into the CNI conf dir.
const ConfFileName = "10-tern.conflist"

// flagSpec is one flag: name, environment variable, default, usage.
type flagSpec struct {
	name, env, def, usage string
}

// Flags lists every flag ternd takes, with its environment variable and
// default, in the order the README documents them.
var Flags = []flagSpec{
	{"kubeconfig", "KUBECONFIG", "", "kubeconfig file; in-cluster configuration when empty"},
	{"node-name", "NODE_NAME", "", "name of this node's Node object (default: the hostname)"},
	{"cni-conf-dir", "TERN_CNI_CONF_DIR", "/etc/cni/net.d", "directory ternd writes " + ConfFileName + " into"},
	{"cni-bin-dir", "TERN_CNI_BIN_DIR", "/opt/cni/bin", "directory holding the tern plugin; no conflist is written before it is there"},
	{"state-dir", "TERN_STATE_DIR", "/var/lib/tern", "the plugin's state directory (records, IPAM, policy store)"},
	{"bpffs-dir", "TERN_BPFFS_DIR", "/sys/fs/bpf/tern", "bpffs directory of the pinned maps and programs"},
	{"datapath", "TERN_DATAPATH", "ebpf", `"ebpf" or "iptables"`},
	{"cluster-cidr", "TERN_CLUSTER_CIDR", "", "pod network of the cluster: never masqueraded (the conflist's clusterCIDR)"},
	{"service-cidr", "TERN_SERVICE_CIDR", "", "Service ClusterIP range (the conflist's serviceCIDR: beside kube-proxy, pod traffic to it goes to the host stack untouched); unset: the first IPv4 range of the API's default ServiceCIDR object"},
	{"pod-cidr", "TERN_POD_CIDR", "", "this node's pod subnet; default: the Node's spec.podCIDRs (required with --offline)"},
	{"network-name", "TERN_NETWORK", "tern", "CNI network name"},
	{"cni-version", "TERN_CNI_VERSION", "1.0.0", "cniVersion of the conflist: 1.0.0 works with every runtime (containerd 1.6 and 1.7 know no later version); 1.1.0 adds CNI GC and STATUS (containerd 2)"},
	{"bridge", "TERN_BRIDGE", "", "name of the node's pod bridge (default: the plugin's, tern0)"},
	{"portmap", "TERN_PORTMAP", "false", "chain the portmap plugin (hostPort) behind tern in the conflist; ternd then waits for <cni-bin-dir>/portmap as for tern"},
	{"mtu", "TERN_MTU", "0", "MTU of the pod veths (0: kernel default)"},
	{"uplink", "TERN_UPLINK", "", "the node's interface toward the outside (default: that of the default route)"},
	{"routing", "TERN_ROUTING", "native", `how pods reach other nodes' pods: "native" (a route per remote pod CIDR via that node's InternalIP) or "vxlan" (an overlay)`},
	{"services", "TERN_SERVICES", "kube-proxy", `who translates Services: "kube-proxy" or "ebpf" (Tern's own load balancer, fed from the API's Services and EndpointSlices)`},
	{"host-services-cgroup", "TERN_HOST_SERVICES_CGROUP", "", `with --services ebpf: the cgroup v2 directory whose processes reach Services through Tern's socket programs (default: the cgroup2 root; "none": not translated)`},
	{"metrics-addr", "TERN_METRICS_ADDR", ":9962", "address of the Prometheus /metrics endpoint (empty: off)"},
	{"health-addr", "TERN_HEALTH_ADDR", ":9963", "address of /healthz and /readyz (empty: off)"},
	{"offline", "TERN_OFFLINE", "false", "file-based mode: no API server; policy comes from ternctl apply"},
	{"uninstall", "", "false", "remove " + ConfFileName + " from the CNI conf dir and exit"},
	{"install-plugin", "", "", "copy this tern plugin binary into the CNI bin dir (atomically) and exit (the DaemonSet's init container)"},
	{"sync-min-interval", "TERN_SYNC_MIN_INTERVAL", "100ms", "minimum time between two datapath syncs (events in between are coalesced)"},
	{"sync-max-interval", "TERN_SYNC_MAX_INTERVAL", "1m", "a full reconcile (and endpoint GC) runs at least this often"},
	{"resync-period", "TERN_RESYNC_PERIOD", "10m", "informer resync period (0: none)"},
	{"gc-grace", "TERN_GC_GRACE", "2m", "an endpoint whose pod is gone is collected once its record is this old"},
	{"log-level", "TERN_LOG_LEVEL", "info", "debug, info, warn or error"},
}

// ParseFlags parses args (without the program name). A flag not given on
// the command line takes its environment variable's value when that is
// set, else its default.
func ParseFlags(args []string, getenv func(string) string, stderr io.Writer) (*Config, error) {
	fs := flag.NewFlagSet("ternd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	for _, f := range Flags {
		usage := f.usage
		if f.env != "" {
			usage += " ($" + f.env + ")"
		}
		if f.def == "false" { // boolean: --offline, not --offline=true
			fs.Bool(f.name, false, usage)
			continue
		}
		fs.String(f.name, f.def, usage)
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	get := func(name string) string {
		for _, f := range Flags {
			if f.name != name {
				continue
			}
			if set[name] {
				return fs.Lookup(name).Value.String()
			}
			if f.env != "" {
				if v := getenv(f.env); v != "" {
					return v
				}
			}
			return f.def
		}
		panic("unknown flag " + name)
	}
	c := &Config{
		Kubeconfig:  get("kubeconfig"),
		NodeName:    get("node-name"),
		CNIConfDir:  get("cni-conf-dir"),
		CNIBinDir:   get("cni-bin-dir"),
		StateDir:    get("state-dir"),
		BPFFSDir:    get("bpffs-dir"),
		Datapath:    get("datapath"),
		ClusterCIDR: get("cluster-cidr"),
		ServiceCIDR: get("service-cidr"),
		PodCIDR:     get("pod-cidr"),
		Network:     get("network-name"),
		CNIVersion:  get("cni-version"),
		Bridge:      get("bridge"),
		Uplink:      get("uplink"),
		Routing:     get("routing"),
		Services:    get("services"),
		HostSvcCgrp: get("host-services-cgroup"),
		MetricsAddr: get("metrics-addr"),
		HealthAddr:  get("health-addr"),
		LogLevel:    get("log-level"),
		InstallFrom: get("install-plugin"),
	}
	var errs []error
	parseBool := func(name string) bool {
		b, err := strconv.ParseBool(get(name))
		if err != nil {
			errs = append(errs, fmt.Errorf("--%s: %w", name, err))
		}
		return b
	}
	parseDur := func(name string) time.Duration {
		d, err := time.ParseDuration(get(name))
		if err != nil || d < 0 {
			errs = append(errs, fmt.Errorf("--%s: %q is not a duration >= 0", name, get(name)))
		}
		return d
	}
	c.Offline = parseBool("offline")
	c.Uninstall = parseBool("uninstall")
	c.Portmap = parseBool("portmap")
	c.MinSync = parseDur("sync-min-interval")
	c.MaxSync = parseDur("sync-max-interval")
	c.ResyncPeriod = parseDur("resync-period")
	c.GCGrace = parseDur("gc-grace")
	mtu, err := strconv.Atoi(get("mtu"))
	if err != nil {
		errs = append(errs, fmt.Errorf("--mtu: %w", err))
	}
	c.MTU = mtu
	if c.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			errs = append(errs, fmt.Errorf("--node-name: unset and no hostname: %w", err))
		}
		c.NodeName = strings.ToLower(h)
	}
	for name, v := range map[string]string{"cluster-cidr": c.ClusterCIDR, "service-cidr": c.ServiceCIDR, "pod-cidr": c.PodCIDR} {
		if v == "" {
			continue
		}
		if _, n, err := net.ParseCIDR(v); err != nil || n.IP.To4() == nil {
			errs = append(errs, fmt.Errorf("--%s: %q is not an IPv4 CIDR", name, v))
		}
	}
	if c.Routing != "native" && c.Routing != "vxlan" {
		errs = append(errs, fmt.Errorf("--routing: %q is not native or vxlan", c.Routing))
	}
	if !slices.Contains(supportedCNIVersions, c.CNIVersion) {
		errs = append(errs, fmt.Errorf("--cni-version: %q is not one of %s", c.CNIVersion, strings.Join(supportedCNIVersions, ", ")))
	}
	if c.Services != "kube-proxy" && c.Services != "ebpf" {
		errs = append(errs, fmt.Errorf("--services: %q is not kube-proxy or ebpf", c.Services))
	}
	if c.Offline && c.PodCIDR == "" && !c.Uninstall {
		errs = append(errs, errors.New("--offline needs --pod-cidr"))
	}
	if c.MaxSync > 0 && c.MaxSync < c.MinSync {
		errs = append(errs, errors.New("--sync-max-interval is shorter than --sync-min-interval"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}
