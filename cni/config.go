// Package cni implements the tern CNI plugin's commands (ADD, DEL, CHECK,
// STATUS, GC) as plain functions the thin main in cmd/tern hands to skel.
package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ternlabs/tern/ipam"
	"github.com/ternlabs/tern/loader"
)

// Datapath names accepted in the "datapath" field.
const (
	DatapathEBPF     = "ebpf"
	DatapathIPTables = "iptables"
)

// Service modes accepted in the "services" field.
const (
	// ServicesKubeProxy: kube-proxy (or another netfilter-based Service
	// proxy) translates Services; Tern hands Service traffic and the
	// replies of flows the host stack translated to the host stack.
	ServicesKubeProxy = "kube-proxy"
	// ServicesEBPF: Tern's own eBPF Service load balancer (kube-proxy
	// replacement, bpf/lib/lb.h), fed with the Services and
	// EndpointSlices of the node's state. eBPF datapath only.
	ServicesEBPF = "ebpf"

	// DefaultServiceLoopbackIP is the client address a pod sees when it
	// reaches itself through its own Service (services "ebpf").
	DefaultServiceLoopbackIP = "169.254.42.1"
	// HostServicesNone as hostServicesCgroup leaves the node's own
	// processes untranslated (services "ebpf").
	HostServicesNone = "none"
)

// Routing modes accepted in the "routing" field (package routing).
const (
	RoutingNative = "native"
	RoutingVXLAN  = "vxlan"
)

// Defaults for optional fields.
const (
	DefaultStateDir = "/var/lib/tern"
	DefaultBPFFSDir = "/sys/fs/bpf/tern"
	DefaultBridge   = "tern0"
)

// NetConf is the network configuration Tern reads on stdin.
type NetConf struct {
	types.PluginConf

	Datapath           string   `json:"datapath,omitempty"`
	MTU                int      `json:"mtu,omitempty"`
	ClusterCIDR        string   `json:"clusterCIDR,omitempty"`
	StateDir           string   `json:"stateDir,omitempty"`
	BPFFSDir           string   `json:"bpffsDir,omitempty"`
	Bridge             string   `json:"bridge,omitempty"`
	IPMasq             *bool    `json:"ipMasq,omitempty"`
	NonMasqueradeCIDRs []string `json:"nonMasqueradeCIDRs,omitempty"`
	// Uplink is the node's interface toward the outside: masqueraded pod
	// traffic leaves by it with its first IPv4 address, and its replies are
	// translated back at its tc ingress (eBPF datapath). Default: the
	// interface of the node's IPv4 default route.
	Uplink string `json:"uplink,omitempty"`
	// Services says who translates Kubernetes Services: "kube-proxy"
	// (default) or "ebpf" (Tern's own load balancer, eBPF datapath only).
	Services string `json:"services,omitempty"`
	// ServiceLoopbackIP (services "ebpf") is the source address a pod sees
	// on packets it sent itself through its own Service (hairpin).
	// Default 169.254.42.1; it must be IPv4 and is never a pod's.
	ServiceLoopbackIP string `json:"serviceLoopbackIP,omitempty"`
	// HostServicesCgroup (services "ebpf") is the cgroup v2 directory
	// whose processes reach Services through Tern's socket programs (the
	// node's own: kubelet probes, hostNetwork pods). Default: the cgroup2
	// root, found in /proc/self/mountinfo; "none": host processes are not
	// translated.
	HostServicesCgroup string `json:"hostServicesCgroup,omitempty"`
	// NodePortAcceleration (services "ebpf") translates NodePort and
	// external-IP traffic from outside the node at the uplink's XDP, before
	// the kernel allocates an skb: "none" (default: tc alone), "xdp"
	// (required: ADD fails where the uplink's driver has no native XDP) or
	// "auto" (XDP where the driver has it, tc alone elsewhere).
	NodePortAcceleration string `json:"nodePortAcceleration,omitempty"`
	// ServiceCIDR lists the ranges kube-proxy's ClusterIPs come from. The
	// eBPF datapath hands pod traffic to them to the host stack (where
	// kube-proxy's DNAT is) instead of masquerading or redirecting it;
	// both datapaths drop what kube-proxy left untranslated (no such
	// Service or port) rather than send it off the node.
	ServiceCIDR []string `json:"serviceCIDR,omitempty"`
	// TCAttach forces how programs attach: "auto" (default: TCX, else
	// clsact), "tcx" or "legacy". For kernels and tests that need one.
	TCAttach string `json:"tcAttach,omitempty"`
	// NATPortRange is "min-max", the source ports masqueraded flows get
	// (eBPF datapath). Default 61000-65535.
	NATPortRange string `json:"natPortRange,omitempty"`
	// NATMemoryMiB is the memory budget of the NAT maps (eBPF datapath),
	// which sets how many masqueraded flows the node holds. Default 12
	// (65,536 flows).
	NATMemoryMiB int `json:"natMemoryMiB,omitempty"`
	// PolicyFlowsPerPod bounds the new flows of each kind (TCP; UDP and
	// the rest) one pod may open per minute on the eBPF datapath, so a
	// pod spraying flows cannot recycle the shared policy conntrack;
	// default 0: no limit.
	PolicyFlowsPerPod uint32 `json:"policyFlowsPerPod,omitempty"`
	// Mode is "standalone" (default: Tern creates the interface and
	// allocates the address) or "chained" (another plugin before Tern did
	// both; Tern attaches its datapath to what prevResult names). See
	// chained.go.
	Mode string `json:"mode,omitempty"`
	// Routing is how pods reach pods of other nodes: "native" (default:
	// routes to each remote pod CIDR via that node's InternalIP) or
	// "vxlan" (an overlay between the nodes; pods get the uplink's MTU
	// minus VXLANOverhead unless mtu is set). The routes themselves are
	// the node agent's (package routing); the plugin only needs the mode
	// for the MTU.
	Routing string `json:"routing,omitempty"`

	// Parsed forms, filled by ParseConfig.
	clusterCIDR *net.IPNet
	nonMasq     []net.IPNet
	serviceCIDR []net.IPNet
	lbLoopback  netip.Addr
	attachMode  loader.Mode
	natPortMin  uint16
	natPortMax  uint16
	pool        *ipam.Pool // when ipam.type is tern-ipam
	rawIPAM     ipam.Config
}

// ConfigError is a missing or invalid field; it maps to CNI error code 7.
type ConfigError struct {
	Field string
	Msg   string
}

func (e *ConfigError) Error() string {
	return fmt.Sprintf("invalid network config: %s: %s", e.Field, e.Msg)
}

func fieldErr(field, format string, args ...any) *ConfigError {
	return &ConfigError{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// cniError converts an error into the *types.Error skel prints, keeping
// codes already chosen (also when wrapped with context, e.g. a delegated
// IPAM plugin's error) and mapping config errors to 7.
func cniError(err error) error {
	if err == nil {
		return nil
	}
	if e, ok := err.(*types.Error); ok {
		return e
	}
	var ce *ConfigError
	if errors.As(err, &ce) {
		return types.NewError(types.ErrInvalidNetworkConfig, err.Error(), "")
	}
	var te *types.Error
	if errors.As(err, &te) {
		// err.Error() already holds te's msg and details.
		return types.NewError(te.Code, err.Error(), "")
	}
	return types.NewError(types.ErrInternal, err.Error(), "")
}

// ParseConfig decodes and validates stdin, filling defaults.
func ParseConfig(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "failed to decode network config", err.Error())
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, fieldErr("prevResult", "%v", err)
	}
	if conf.Name == "" {
		return nil, fieldErr("name", "missing")
	}
	if conf.Datapath == "" {
		conf.Datapath = DatapathEBPF
	}
	if conf.Datapath != DatapathEBPF && conf.Datapath != DatapathIPTables {
		return nil, fieldErr("datapath", "%q is not one of %q, %q", conf.Datapath, DatapathEBPF, DatapathIPTables)
	}
	if conf.Routing == "" {
		conf.Routing = RoutingNative
	}
	if conf.Routing != RoutingNative && conf.Routing != RoutingVXLAN {
		return nil, fieldErr("routing", "%q is not one of %q, %q", conf.Routing, RoutingNative, RoutingVXLAN)
	}
	if conf.MTU < 0 || (conf.MTU != 0 && (conf.MTU < 576 || conf.MTU > 65535)) {
		return nil, fieldErr("mtu", "%d is outside 576-65535", conf.MTU)
	}
	if conf.ClusterCIDR != "" {
		_, n, err := net.ParseCIDR(conf.ClusterCIDR)
		if err != nil || n.IP.To4() == nil {
			return nil, fieldErr("clusterCIDR", "%q is not an IPv4 CIDR", conf.ClusterCIDR)
		}
		conf.clusterCIDR = n
	}
	for i, s := range conf.NonMasqueradeCIDRs {
		_, n, err := net.ParseCIDR(s)
		if err != nil || n.IP.To4() == nil {
			return nil, fieldErr(fmt.Sprintf("nonMasqueradeCIDRs[%d]", i), "%q is not an IPv4 CIDR", s)
		}
		conf.nonMasq = append(conf.nonMasq, *n)
	}
	switch conf.Services {
	case "":
		conf.Services = ServicesKubeProxy
	case ServicesKubeProxy:
	case ServicesEBPF:
		if conf.Datapath != DatapathEBPF {
			return nil, fieldErr("services", "%q (Tern's own eBPF Service load balancer) needs the eBPF datapath; with datapath %q use %q with kube-proxy", ServicesEBPF, conf.Datapath, ServicesKubeProxy)
		}
	default:
		return nil, fieldErr("services", "%q is not one of %q, %q", conf.Services, ServicesKubeProxy, ServicesEBPF)
	}
	if conf.ServiceLoopbackIP != "" && conf.Services != ServicesEBPF {
		return nil, fieldErr("serviceLoopbackIP", "only used with services %q", ServicesEBPF)
	}
	if conf.HostServicesCgroup != "" {
		if conf.Services != ServicesEBPF {
			return nil, fieldErr("hostServicesCgroup", "only used with services %q", ServicesEBPF)
		}
		if conf.HostServicesCgroup != HostServicesNone && !strings.HasPrefix(conf.HostServicesCgroup, "/") {
			return nil, fieldErr("hostServicesCgroup", "%q is not an absolute path or %q", conf.HostServicesCgroup, HostServicesNone)
		}
	}
	if conf.Services == ServicesEBPF {
		lo := conf.ServiceLoopbackIP
		if lo == "" {
			lo = DefaultServiceLoopbackIP
		}
		a, err := netip.ParseAddr(lo)
		if err != nil || !a.Is4() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() {
			return nil, fieldErr("serviceLoopbackIP", "%q is not a unicast IPv4 address", lo)
		}
		if conf.clusterCIDR != nil && conf.clusterCIDR.Contains(a.AsSlice()) {
			return nil, fieldErr("serviceLoopbackIP", "%s is inside clusterCIDR %s (it must never be a pod's)", a, conf.clusterCIDR)
		}
		conf.lbLoopback = a
	}
	switch conf.NodePortAcceleration {
	case "", "none", "xdp", "auto":
	default:
		return nil, fieldErr("nodePortAcceleration", "%q is not one of \"none\", \"xdp\", \"auto\"", conf.NodePortAcceleration)
	}
	if conf.NodePortAcceleration != "" && conf.NodePortAcceleration != "none" && conf.Services != ServicesEBPF {
		return nil, fieldErr("nodePortAcceleration", "%q needs services %q (Tern's own load balancer)", conf.NodePortAcceleration, ServicesEBPF)
	}
	for i, s := range conf.ServiceCIDR {
		_, n, err := net.ParseCIDR(s)
		if err != nil || n.IP.To4() == nil {
			return nil, fieldErr(fmt.Sprintf("serviceCIDR[%d]", i), "%q is not an IPv4 CIDR", s)
		}
		conf.serviceCIDR = append(conf.serviceCIDR, *n)
	}
	if conf.StateDir == "" {
		conf.StateDir = DefaultStateDir
	}
	if !strings.HasPrefix(conf.StateDir, "/") {
		return nil, fieldErr("stateDir", "%q is not an absolute path", conf.StateDir)
	}
	if conf.BPFFSDir == "" {
		conf.BPFFSDir = DefaultBPFFSDir
	}
	if !strings.HasPrefix(conf.BPFFSDir, "/") {
		return nil, fieldErr("bpffsDir", "%q is not an absolute path", conf.BPFFSDir)
	}
	if conf.Bridge == "" {
		conf.Bridge = DefaultBridge
	}
	if len(conf.Bridge) > 15 || strings.ContainsAny(conf.Bridge, "/ \t") {
		return nil, fieldErr("bridge", "%q is not a valid interface name", conf.Bridge)
	}
	if conf.Uplink != "" && !validIfname(conf.Uplink) {
		return nil, fieldErr("uplink", "%q is not a valid interface name", conf.Uplink)
	}
	if conf.NATPortRange != "" {
		lo, hi, ok := strings.Cut(conf.NATPortRange, "-")
		min, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
		max, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
		if !ok || err1 != nil || err2 != nil || min < 1024 || min > max {
			return nil, fieldErr("natPortRange", "%q is not a port range min-max with 1024 <= min <= max <= 65535", conf.NATPortRange)
		}
		conf.natPortMin, conf.natPortMax = uint16(min), uint16(max)
	}
	if conf.NATMemoryMiB != 0 && (conf.NATMemoryMiB < ebpfMinNATMemoryMiB || conf.NATMemoryMiB > ebpfMaxNATMemoryMiB) {
		return nil, fieldErr("natMemoryMiB", "%d is outside %d-%d", conf.NATMemoryMiB, ebpfMinNATMemoryMiB, ebpfMaxNATMemoryMiB)
	}
	mode, err := loader.ParseMode(conf.TCAttach)
	if err != nil {
		return nil, fieldErr("tcAttach", "%v", err)
	}
	conf.attachMode = mode

	if err := conf.parseMode(); err != nil {
		return nil, err
	}
	if conf.chained() {
		return conf, nil // no IPAM: the plugin before Tern allocated
	}
	if conf.IPAM.Type == "" {
		return nil, fieldErr("ipam.type", "missing")
	}
	if conf.IPAM.Type == ipam.TypeName {
		var raw struct {
			IPAM ipam.Config `json:"ipam"`
		}
		if err := json.Unmarshal(stdin, &raw); err != nil {
			return nil, fieldErr("ipam", "%v", err)
		}
		pool, err := ipam.ParseConfig(raw.IPAM)
		if err != nil {
			var fe *ipam.FieldError
			if errors.As(err, &fe) {
				return nil, fieldErr(fe.Field, "%s", fe.Msg)
			}
			return nil, fieldErr("ipam", "%v", err)
		}
		conf.pool = pool
		conf.rawIPAM = raw.IPAM
	}
	return conf, nil
}

// validIfname applies the kernel's rules for interface names
// (dev_valid_name): 1-15 bytes, not "." or "..", no '/', ':' or space.
func validIfname(s string) bool {
	if s == "" || len(s) > 15 || s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		if r == '/' || r == ':' || r <= ' ' || r == 0x7f {
			return false
		}
	}
	return true
}

// masquerade reports whether pod traffic leaving the cluster is SNATed.
// In chained mode the default is off: the plugin before Tern owns the
// pod's addressing, and masquerading with it.
func (c *NetConf) masquerade() bool {
	if c.IPMasq == nil {
		return !c.chained()
	}
	return *c.IPMasq
}

// K8sArgs are the CNI_ARGS a Kubernetes runtime passes.
type K8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI_ARGS key
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

func parseArgs(s string) (*K8sArgs, error) {
	a := &K8sArgs{}
	if err := types.LoadArgs(s, a); err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "invalid CNI_ARGS", err.Error())
	}
	return a, nil
}
