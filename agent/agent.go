// Package agent is ternd, Tern's node agent: it watches the Kubernetes API
// server (Nodes, Pods, Namespaces, NetworkPolicies; Services and
// EndpointSlices cached for the Services datapath) and keeps this node's
// network in line with it through the same policy store, compiler and
// datapath diff that ternctl and the CNI plugin use (package network). It
// writes the node's CNI configuration once it is ready, serves /healthz,
// /readyz and /metrics, and collects endpoints whose pods are gone.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ternlabs/tern/cni"
	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/loader"
)

// Main is ternd's main: it parses args (flags with environment fallbacks),
// runs until ctx ends and returns the exit status.
func Main(ctx context.Context, args []string, stderr io.Writer) int {
	cfg, err := ParseFlags(args, os.Getenv, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "ternd: %v\n", err)
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		fmt.Fprintf(stderr, "ternd: --log-level: %v\n", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	if cfg.InstallFrom != "" {
		if err := InstallPlugin(cfg.InstallFrom, cfg.CNIBinDir); err != nil {
			log.Error("install the CNI plugin", "err", err)
			return 1
		}
		log.Info("installed the CNI plugin", "file", filepath.Join(cfg.CNIBinDir, "tern"))
		return 0
	}
	if cfg.Uninstall {
		// The routes go first, but a failure there does not keep the
		// conflist: kubelet must stop wiring pods with it either way.
		rerr := teardownRouting(cfg.CNIConfDir)
		if rerr != nil {
			log.Error("uninstall: remove the routes to other nodes", "err", rerr)
		}
		if err := teardownHostServices(cfg.CNIConfDir); err != nil {
			log.Error("uninstall: detach the host services programs", "err", err)
			rerr = errors.Join(rerr, err)
		}
		if err := RemoveConfList(cfg.CNIConfDir); err != nil {
			log.Error("uninstall", "err", err)
			return 1
		}
		if rerr != nil {
			return 1
		}
		log.Info("removed the CNI configuration", "file", filepath.Join(cfg.CNIConfDir, ConfFileName))
		return 0
	}
	if err := Run(ctx, cfg, log); err != nil && !errors.Is(err, context.Canceled) {
		log.Error("ternd failed", "err", err)
		return 1
	}
	return 0
}

// Agent is a running ternd.
type Agent struct {
	cfg     *Config
	log     *slog.Logger
	metrics *metrics
	ctrl    *controller
	synced  atomic.Bool // informer caches synced
	ready   atomic.Bool // caches synced, datapath loadable, conflist written
}

// Run runs the agent until ctx ends: informers (unless offline), first
// reconcile, conflist, then coalesced syncs.
func Run(ctx context.Context, cfg *Config, log *slog.Logger) error {
	a := &Agent{cfg: cfg, log: log, metrics: newMetrics(bpffsFor(cfg), log)}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	if err := a.serve(ctx, cancel); err != nil {
		return err
	}
	log.Info("ternd starting", "node", cfg.NodeName, "datapath", cfg.Datapath, "offline", cfg.Offline)
	if cfg.Offline {
		return a.runOffline(ctx)
	}
	client, err := newClient(cfg.Kubeconfig)
	if err != nil {
		return err
	}
	a.ctrl = newController(client, cfg.NodeName, cfg.Services == cni.ServicesEBPF, cfg.ResyncPeriod, cfg.MinSync, cfg.MaxSync, a.metrics, log)
	if err := a.ctrl.start(ctx); err != nil {
		return err
	}
	a.synced.Store(true)
	log.Info("informer caches synced")

	podCIDR, err := a.waitPodCIDR(ctx)
	if err != nil {
		return err
	}
	if cfg.ServiceCIDR == "" {
		a.discoverServiceCIDR(ctx, client)
	}
	conflist, conf, err := a.netConf(podCIDR)
	if err != nil {
		return err
	}
	nw := conf.Network()
	nw.NodeName = cfg.NodeName // EndpointSlices' nodeName: traffic policy Local
	router, err := newNodeRouter(conf, a.ctrl.localIP())
	if err != nil {
		return err
	}
	defer router.release()
	a.ctrl.router = router
	target := &netTarget{
		replace: nw.Replace,
		collect: func(gone func(*datapath.Endpoint, time.Duration) bool) (int, error) {
			removed, err := conf.Collect(pluginConf(conflist), gone)
			return len(removed), err
		},
		grace: cfg.GCGrace,
	}
	// The first reconcile, by diff against what the datapath holds (pinned
	// maps and the applied rule set): never clear then rebuild.
	if err := a.firstSync(ctx, target); err != nil {
		return err
	}
	if err := a.install(ctx, conf, conflist); err != nil {
		return err
	}
	a.ctrl.setTarget(target)
	a.ctrl.runner.Run(ctx)
	return context.Cause(ctx)
}

// firstSync applies the API server's state before the node is declared
// ready, retrying until it succeeds.
func (a *Agent) firstSync(ctx context.Context, t Target) error {
	for backoff := 500 * time.Millisecond; ; backoff = min(2*backoff, 30*time.Second) {
		a.ctrl.target.Store(&t)
		err := a.ctrl.sync(ctx)
		a.ctrl.target.Store(nil)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(backoff):
		}
	}
}

// install waits until the datapath is loadable and the plugin binary is
// installed, then writes the conflist: only then may kubelet wire pods.
func (a *Agent) install(ctx context.Context, conf *cni.NetConf, conflist []byte) error {
	for {
		err := conf.CheckDatapath()
		if err == nil {
			err = a.pluginsInstalled()
		}
		if err == nil {
			break
		}
		a.log.Warn("not ready to install the CNI configuration", "err", err)
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(2 * time.Second):
		}
	}
	if a.cfg.Services == cni.ServicesKubeProxy && a.cfg.Datapath == "ebpf" && a.cfg.ServiceCIDR == "" {
		a.log.Warn("no --service-cidr beside kube-proxy: egress NetworkPolicy decides traffic to ClusterIPs before kube-proxy's DNAT, as traffic to the outside world")
	}
	if err := WriteConfList(a.cfg.CNIConfDir, conflist); err != nil {
		return err
	}
	a.ready.Store(true)
	a.log.Info("ready: CNI configuration written", "file", filepath.Join(a.cfg.CNIConfDir, ConfFileName))
	return nil
}

// discoverServiceCIDR fills in --service-cidr, when it was not given, from
// the cluster's default ServiceCIDR object ("kubernetes", which the API
// server makes from its --service-cluster-ip-range): its first IPv4 range.
// Beside kube-proxy the eBPF datapath needs it (ConfList); a cluster
// without the object or a role without access keeps the flag empty, and
// install warns.
func (a *Agent) discoverServiceCIDR(ctx context.Context, client kubernetes.Interface) {
	obj, err := client.NetworkingV1().ServiceCIDRs().Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		a.log.Info("no --service-cidr, and the default ServiceCIDR is not readable", "err", err)
		return
	}
	for _, s := range obj.Spec.CIDRs {
		if ip, _, err := parseCIDR(s); err == nil && ip.To4() != nil {
			cfg := *a.cfg
			cfg.ServiceCIDR = s
			a.cfg = &cfg
			a.log.Info("service CIDR from the API's default ServiceCIDR", "serviceCIDR", s)
			return
		}
	}
}

// pluginsInstalled says whether every plugin of the conflist is in the
// CNI bin dir: tern (the init container's), and portmap with --portmap.
func (a *Agent) pluginsInstalled() error {
	plugins := []string{"tern"}
	if a.cfg.Portmap {
		plugins = append(plugins, "portmap")
	}
	for _, p := range plugins {
		if _, err := os.Stat(filepath.Join(a.cfg.CNIBinDir, p)); err != nil {
			return fmt.Errorf("plugin %s not installed: %w", p, err)
		}
	}
	return nil
}

// runOffline is the file-based mode: no API server; policy comes from
// ternctl apply (which enforces it itself, as CNI ADD and DEL do). ternd
// installs the conflist for --pod-cidr once the datapath is loadable and
// serves health and metrics.
func (a *Agent) runOffline(ctx context.Context) error {
	conflist, conf, err := a.netConf(a.cfg.PodCIDR)
	if err != nil {
		return err
	}
	a.synced.Store(true)
	if err := a.install(ctx, conf, conflist); err != nil {
		return err
	}
	<-ctx.Done()
	return context.Cause(ctx)
}

// waitPodCIDR returns --pod-cidr, else the Node's pod CIDR, waiting for
// the controller manager to allocate one.
func (a *Agent) waitPodCIDR(ctx context.Context) (string, error) {
	if a.cfg.PodCIDR != "" {
		return a.cfg.PodCIDR, nil
	}
	for logged := false; ; {
		cidr, err := a.ctrl.podCIDR()
		if err == nil && cidr != "" {
			a.log.Info("node pod CIDR", "podCIDR", cidr)
			return cidr, nil
		}
		if !logged {
			a.log.Info("waiting for the node's spec.podCIDRs", "node", a.cfg.NodeName, "err", err)
			logged = true
		}
		select {
		case <-ctx.Done():
			return "", context.Cause(ctx)
		case <-time.After(time.Second):
		}
	}
}

// ConfList builds the conflist ternd installs for the node's pod subnet.
func ConfList(cfg *Config, podCIDR string) ([]byte, error) {
	plugin := map[string]any{
		"type":     "tern",
		"datapath": cfg.Datapath,
		"stateDir": cfg.StateDir,
		"bpffsDir": cfg.BPFFSDir,
		"ipam":     map[string]any{"type": "tern-ipam", "subnet": podCIDR},
	}
	if cfg.ClusterCIDR != "" {
		plugin["clusterCIDR"] = cfg.ClusterCIDR
	}
	if cfg.ServiceCIDR != "" {
		// serviceCIDR, not nonMasqueradeCIDRs: beside kube-proxy the eBPF
		// datapath must hand pod traffic to these addresses to the host
		// stack untouched, so that policy is decided after kube-proxy's
		// DNAT on the backend, not on the ClusterIP as the outside world.
		plugin["serviceCIDR"] = []string{cfg.ServiceCIDR}
	}
	if cfg.MTU != 0 {
		plugin["mtu"] = cfg.MTU
	}
	if cfg.Uplink != "" {
		plugin["uplink"] = cfg.Uplink
	}
	if cfg.Routing != "" {
		plugin["routing"] = cfg.Routing
	}
	if cfg.Services != "" {
		plugin["services"] = cfg.Services
	}
	if cfg.HostSvcCgrp != "" && cfg.Services == cni.ServicesEBPF {
		plugin["hostServicesCgroup"] = cfg.HostSvcCgrp
	}
	if cfg.Bridge != "" {
		plugin["bridge"] = cfg.Bridge
	}
	plugins := []any{plugin}
	if cfg.Portmap {
		// hostPort: the runtime hands portMappings to portmap, which
		// DNATs node-IP:hostPort to the pod (README, Chaining).
		plugins = append(plugins, map[string]any{
			"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true,
		})
	}
	return json.MarshalIndent(map[string]any{
		"cniVersion": cfg.CNIVersion,
		"name":       cfg.Network,
		"plugins":    plugins,
	}, "", "  ")
}

// pluginConf is the tern plugin's configuration of a conflist, with the
// list's name and version, as the plugin gets it on stdin.
func pluginConf(conflist []byte) []byte {
	var l struct {
		CNIVersion string           `json:"cniVersion"`
		Name       string           `json:"name"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(conflist, &l); err != nil || len(l.Plugins) == 0 {
		return nil
	}
	p := l.Plugins[0]
	p["cniVersion"], p["name"] = l.CNIVersion, l.Name
	b, _ := json.Marshal(p)
	return b
}

func (a *Agent) netConf(podCIDR string) ([]byte, *cni.NetConf, error) {
	conflist, err := ConfList(a.cfg, podCIDR)
	if err != nil {
		return nil, nil, err
	}
	conf, err := cni.ParseConfig(pluginConf(conflist))
	if err != nil {
		return nil, nil, fmt.Errorf("network configuration: %w", err)
	}
	return conflist, conf, nil
}

// WriteConfList installs conflist as <dir>/10-tern.conflist atomically:
// a temporary file in dir, synced, renamed over the old one. A runtime
// never reads a partial file.
func WriteConfList(dir string, conflist []byte) error {
	return replaceFile(dir, ConfFileName, 0o644, func(w io.Writer) error {
		_, err := w.Write(append(conflist, '\n'))
		return err
	})
}

// InstallPlugin copies the plugin binary src to <binDir>/tern: a temporary
// file in binDir renamed over the old binary, so a runtime executing it
// during an upgrade runs the old or the new one, never a partial file.
func InstallPlugin(src, binDir string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	return replaceFile(binDir, "tern", 0o755, func(w io.Writer) error {
		_, err := io.Copy(w, in)
		return err
	})
}

// replaceFile makes <dir>/name, with mode, hold what fill writes: a
// temporary file in dir (created with dir if missing), filled, synced and
// renamed over name. A reader sees the old file or the new one, never a
// partial one; on failure the temporary file goes.
func replaceFile(dir, name string, mode os.FileMode, fill func(io.Writer) error) (err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+name+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err = fill(f); err != nil {
		return err
	}
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), filepath.Join(dir, name))
}

// installedConf is the tern plugin's configuration in the conflist ternd
// installed in dir; nil, and no error, without a conflist.
func installedConf(dir string) (*cni.NetConf, error) {
	conflist, err := os.ReadFile(filepath.Join(dir, ConfFileName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	conf, err := cni.ParseConfig(pluginConf(conflist))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ConfFileName, err)
	}
	return conf, nil
}

// teardownHostServices detaches the socket programs through which the
// node's own processes reach Services (services "ebpf", attached at the
// cgroup2 root by the plugin): uninstalled, Tern no longer keeps their
// maps, and the node's processes go back to whatever else translates
// Services.
func teardownHostServices(dir string) error {
	conf, err := installedConf(dir)
	if err != nil || conf == nil {
		return err
	}
	if conf.Datapath != cni.DatapathEBPF || conf.Services != cni.ServicesEBPF {
		return nil
	}
	return loader.New(conf.BPFFSDir, conf.StateDir).DetachCgroup()
}

// teardownRouting removes the routes to other nodes (and the VXLAN device,
// and the datapath's table entries) that the installed conflist's routing
// made; nothing to do without a conflist.
func teardownRouting(dir string) error {
	conf, err := installedConf(dir)
	if err != nil || conf == nil {
		return err
	}
	teardown := func(conf *cni.NetConf) error {
		r, err := newNodeRouter(conf, nil)
		if err != nil {
			return err
		}
		defer r.release()
		return r.r.Teardown()
	}
	err = teardown(conf)
	if err == nil || conf.Datapath != cni.DatapathEBPF {
		return err
	}
	// The datapath's table could not be opened or cleared: the kernel
	// routes (and the VXLAN device) go all the same.
	conf.Datapath = cni.DatapathIPTables
	return errors.Join(err, teardown(conf))
}

// RemoveConfList removes the conflist ternd installed (uninstall); a
// missing file is not an error.
func RemoveConfList(dir string) error {
	err := os.Remove(filepath.Join(dir, ConfFileName))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return err
}

func newClient(kubeconfig string) (kubernetes.Interface, error) {
	var (
		rc  *rest.Config
		err error
	)
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("API server client: %w", err)
	}
	rc.UserAgent = "ternd"
	// Protobuf is cheaper to decode than JSON for the built-in types.
	rc.ContentType = "application/vnd.kubernetes.protobuf"
	rc.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	return kubernetes.NewForConfig(rc)
}

// bpffsFor is the bpffs directory whose maps /metrics reads ("" for the
// iptables datapath, whose counters live in iptables).
func bpffsFor(cfg *Config) string {
	if cfg.Datapath == cni.DatapathEBPF {
		return cfg.BPFFSDir
	}
	return ""
}

// serve starts the health and metrics servers; a server that fails after
// starting cancels the agent.
func (a *Agent) serve(ctx context.Context, cancel context.CancelCauseFunc) error {
	health := http.NewServeMux()
	health.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	health.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		switch {
		case a.ready.Load():
			io.WriteString(w, "ok\n")
		case a.synced.Load():
			http.Error(w, "not ready: datapath or CNI configuration not installed yet", http.StatusServiceUnavailable)
		default:
			http.Error(w, "not ready: informer caches not synced", http.StatusServiceUnavailable)
		}
	})
	metricsMux := http.NewServeMux()
	metricsMux.Handle("/metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{}))
	for _, s := range []struct {
		name, addr string
		h          http.Handler
	}{{"health", a.cfg.HealthAddr, health}, {"metrics", a.cfg.MetricsAddr, metricsMux}} {
		if s.addr == "" {
			continue
		}
		l, err := net.Listen("tcp", s.addr)
		if err != nil {
			return fmt.Errorf("%s server: %w", s.name, err)
		}
		srv := &http.Server{Handler: s.h, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				cancel(fmt.Errorf("%s server: %w", s.name, err))
			}
		}()
		go func() {
			<-ctx.Done()
			srv.Close()
		}()
		a.log.Info("serving", "server", s.name, "addr", l.Addr().String())
	}
	return nil
}

func parseCIDR(s string) (net.IP, *net.IPNet, error) { return net.ParseCIDR(strings.TrimSpace(s)) }
