package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"strconv"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/policy/manifest"
)

// Target is where the controller's desired state goes: the node's network
// (network.Network through netTarget) in ternd, a recorder in unit tests.
type Target interface {
	// Replace makes st the desired state and enforces it; it returns
	// the number of local endpoints.
	Replace(st *manifest.State) (int, error)
	// Collect removes the endpoints whose pod is gone: exists reports
	// whether the pod namespace/name exists in the API server's view.
	Collect(exists func(namespace, name string) bool) (int, error)
}

// controller watches the API server through one SharedInformerFactory and
// keeps the Target in line with it, coalescing events with a runner.
type controller struct {
	log      *slog.Logger
	nodeName string
	factory  informers.SharedInformerFactory
	nodes    corelisters.NodeLister
	pods     corelisters.PodLister
	ns       corelisters.NamespaceLister
	policies networkinglisters.NetworkPolicyLister
	services corelisters.ServiceLister
	slices   discoverylisters.EndpointSliceLister
	// balance says the network balances Services itself (services
	// "ebpf"): Services and EndpointSlices go into the desired state.
	balance bool
	// router keeps the routes to the other nodes' pod CIDRs; nil until
	// the network is known. Set before the first sync, read by syncs only.
	router  *nodeRouter
	synced  []cache.InformerSynced
	runner  *runner
	metrics *metrics
	target  atomic.Pointer[Target] // nil until the network is known
	// syncs counts the Target.Replace calls (tests).
	syncs atomic.Int64
	// seenRV is, per resource, the highest resourceVersion of an event
	// the handlers got. A handler runs after the informer's cache holds
	// the event's object (or no longer holds a deleted one), and a
	// resource's watch delivers events in resourceVersion order, so a
	// sync that reads seenRV before it reads the caches applies every
	// change of that resource up to it: what
	// tern_agent_applied_resource_version reports.
	seenRV map[string]*atomic.Int64
}

func newController(client kubernetes.Interface, nodeName string, balance bool, resync, minSync, maxSync time.Duration, m *metrics, log *slog.Logger) *controller {
	c := &controller{log: log, nodeName: nodeName, balance: balance, metrics: m, seenRV: map[string]*atomic.Int64{}}
	c.runner = newRunner(c.sync, minSync, maxSync)
	f := informers.NewSharedInformerFactory(client, resync)
	c.factory = f

	// Every node: this one's pod CIDR, the others' pod CIDRs and
	// InternalIPs for the routes to their pods. Only those are kept in
	// the cache (status heartbeats change nothing routing reads).
	nodeInf := f.Core().V1().Nodes().Informer()
	if err := nodeInf.SetTransform(slimNode); err != nil {
		panic(err)
	}
	// Every pod: local ones carry the labels of this node's endpoints,
	// remote ones the identities of their IPs. Only what policy reads is
	// kept in the cache.
	podInf := f.Core().V1().Pods().Informer()
	if err := podInf.SetTransform(slimPod); err != nil {
		panic(err) // only fails once the informer runs
	}
	nsInf := f.Core().V1().Namespaces().Informer()
	npInf := f.Networking().V1().NetworkPolicies().Informer()
	// Services and EndpointSlices: the load balancer's (services
	// "ebpf"); cached but not synced on otherwise.
	svcInf := f.Core().V1().Services().Informer()
	epsInf := f.Discovery().V1().EndpointSlices().Informer()

	c.handle(nodeInf, "nodes", nodeChanged)
	c.handle(podInf, "pods", podChanged)
	c.handle(nsInf, "namespaces", labelsChanged)
	c.handle(npInf, "networkpolicies", nil)
	lbChanged := func(any, any) bool { return balance }
	c.handle(svcInf, "services", lbChanged)
	c.handle(epsInf, "endpointslices", lbChanged)

	c.nodes = f.Core().V1().Nodes().Lister()
	c.pods = f.Core().V1().Pods().Lister()
	c.ns = f.Core().V1().Namespaces().Lister()
	c.policies = f.Networking().V1().NetworkPolicies().Lister()
	c.services = f.Core().V1().Services().Lister()
	c.slices = f.Discovery().V1().EndpointSlices().Lister()
	for _, inf := range []cache.SharedIndexInformer{nodeInf, podInf, nsInf, npInf, svcInf, epsInf} {
		c.synced = append(c.synced, inf.HasSynced)
	}
	return c
}

// handle requests a sync on every add and delete, and on updates that
// changed (relevant says which; nil: any change). Resyncs (same
// resourceVersion) are only counted: the runner's periodic sync covers them.
func (c *controller) handle(inf cache.SharedIndexInformer, resource string, relevant func(old, new any) bool) {
	seen := &atomic.Int64{}
	c.seenRV[resource] = seen
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) {
			noteRV(seen, obj)
			c.metrics.events.WithLabelValues(resource).Inc()
			if relevant == nil || relevant(nil, nil) {
				c.runner.Request()
			}
		},
		UpdateFunc: func(old, new any) {
			noteRV(seen, new)
			if o, ok := old.(metav1.Object); ok {
				if n, ok := new.(metav1.Object); ok && o.GetResourceVersion() != "" && o.GetResourceVersion() == n.GetResourceVersion() {
					c.metrics.resyncs.WithLabelValues(resource).Inc()
					return
				}
			}
			c.metrics.events.WithLabelValues(resource).Inc()
			if relevant == nil || relevant(old, new) {
				c.runner.Request()
			}
		},
		DeleteFunc: func(obj any) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj // its last known state; the relist that found it gone is not seen here
			}
			noteRV(seen, obj)
			c.metrics.events.WithLabelValues(resource).Inc()
			if relevant == nil || relevant(nil, nil) {
				c.runner.Request()
			}
		},
	})
	if err != nil {
		panic(err) // only fails on a stopped informer
	}
}

// noteRV raises seen to obj's resourceVersion. The API server's
// resourceVersions are etcd revisions (integers, growing across all
// resources); one that does not parse is left out.
func noteRV(seen *atomic.Int64, obj any) {
	o, ok := obj.(metav1.Object)
	if !ok {
		return
	}
	rv, err := strconv.ParseInt(o.GetResourceVersion(), 10, 64)
	if err != nil {
		return
	}
	for {
		cur := seen.Load()
		if rv <= cur || seen.CompareAndSwap(cur, rv) {
			return
		}
	}
}

// start starts the informers and waits until their caches hold a full
// list.
func (c *controller) start(ctx context.Context) error {
	c.factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return fmt.Errorf("informer caches not synced: %w", context.Cause(ctx))
	}
	return nil
}

// setTarget sets where syncs go and requests the first one.
func (c *controller) setTarget(t Target) {
	c.target.Store(&t)
	c.runner.Request()
}

// sync computes the desired state from the caches and hands it to the
// target, then collects endpoints whose pod is gone.
func (c *controller) sync(ctx context.Context) error {
	tp := c.target.Load()
	if tp == nil {
		return nil
	}
	t := *tp
	if c.router != nil {
		nodes, _ := c.nodes.List(labels.Everything())
		rn := routingNodes(nodes, c.nodeName)
		if err := c.router.r.Sync(rn); err != nil {
			c.metrics.syncs.WithLabelValues("error").Inc()
			c.log.Error("routing sync failed", "err", err)
			return err
		}
		c.log.Debug("routes synced", "nodes", len(rn))
	}
	// Before the caches are read: the sync applies at least these.
	seen := make(map[string]int64, len(c.seenRV))
	for r, v := range c.seenRV {
		seen[r] = v.Load()
	}
	st, skipped := c.desiredState()
	for _, err := range skipped {
		c.log.Warn("object left out of the policy state", "err", err)
	}
	start := time.Now()
	n, err := t.Replace(st)
	c.syncs.Add(1)
	if err != nil {
		c.metrics.syncs.WithLabelValues("error").Inc()
		c.log.Error("policy sync failed", "err", err)
		return err
	}
	elapsed := time.Since(start)
	c.metrics.applySeconds.Observe(elapsed.Seconds())
	c.metrics.syncs.WithLabelValues("ok").Inc()
	c.metrics.endpoints.Set(float64(n))
	for r, v := range seen {
		c.metrics.appliedRV.WithLabelValues(r).Set(float64(v))
	}
	c.log.Debug("policy synced", "endpoints", n, "pods", len(st.Pods), "policies", len(st.Policies), "duration", elapsed)

	removed, err := t.Collect(func(namespace, name string) bool {
		_, err := c.pods.Pods(namespace).Get(name)
		return err == nil
	})
	c.metrics.collected.Add(float64(removed))
	if removed > 0 {
		c.log.Info("collected endpoints of deleted pods", "count", removed)
	}
	if err != nil {
		c.log.Error("endpoint GC failed", "err", err)
		return err
	}
	return nil
}

// desiredState is the policy state as the API server has it: every
// namespace, pod and NetworkPolicy in the caches. Objects the policy
// validation rejects are left out (and returned as errors) rather than
// failing the whole state.
func (c *controller) desiredState() (*manifest.State, []error) {
	st := manifest.NewState()
	var skipped []error
	nss, _ := c.ns.List(labels.Everything())
	for _, ns := range nss {
		if err := manifest.Validate(ns); err != nil {
			skipped = append(skipped, err)
			continue
		}
		st.Namespaces[ns.Name] = ns
	}
	pods, _ := c.pods.List(labels.Everything())
	for _, p := range pods {
		if p.Spec.HostNetwork {
			continue // its addresses are the node's
		}
		if err := manifest.Validate(p); err != nil {
			skipped = append(skipped, err)
			continue
		}
		st.Pods[types.NamespacedName{Namespace: p.Namespace, Name: p.Name}] = p
	}
	nps, _ := c.policies.List(labels.Everything())
	for _, np := range nps {
		if err := manifest.Validate(np); err != nil {
			skipped = append(skipped, err)
			continue
		}
		st.Policies[types.NamespacedName{Namespace: np.Namespace, Name: np.Name}] = np
	}
	if !c.balance {
		return st, skipped
	}
	svcs, _ := c.services.List(labels.Everything())
	for _, svc := range svcs {
		if err := manifest.Validate(svc); err != nil {
			skipped = append(skipped, err)
			continue
		}
		st.Services[types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}] = svc
	}
	eps, _ := c.slices.List(labels.Everything())
	for _, es := range eps {
		if err := manifest.Validate(es); err != nil {
			skipped = append(skipped, err)
			continue
		}
		st.EndpointSlices[types.NamespacedName{Namespace: es.Namespace, Name: es.Name}] = es
	}
	return st, skipped
}

// localIP is this node's InternalIP, nil when its Node object has none.
func (c *controller) localIP() net.IP {
	node, err := c.nodes.Get(c.nodeName)
	if err != nil {
		return nil
	}
	return internalIP(node)
}

// podCIDR returns the node's first IPv4 pod CIDR, "" when the controller
// manager has not allocated one yet.
func (c *controller) podCIDR() (string, error) {
	node, err := c.nodes.Get(c.nodeName)
	if err != nil {
		return "", err
	}
	cidrs := node.Spec.PodCIDRs
	if len(cidrs) == 0 && node.Spec.PodCIDR != "" {
		cidrs = []string{node.Spec.PodCIDR}
	}
	for _, s := range cidrs {
		if ip, _, err := parseCIDR(s); err == nil && ip.To4() != nil {
			return s, nil
		}
	}
	return "", nil
}

// slimNode keeps what the agent reads of a node: name, pod CIDRs and
// InternalIPs.
func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil // a tombstone
	}
	out := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: n.UID, ResourceVersion: n.ResourceVersion},
		Spec:       corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs},
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			out.Status.Addresses = append(out.Status.Addresses, a)
		}
	}
	return out, nil
}

// nodeChanged reports whether an update changed a pod CIDR or an
// InternalIP (what the slim node keeps).
func nodeChanged(old, new any) bool {
	o, ok1 := old.(*corev1.Node)
	n, ok2 := new.(*corev1.Node)
	if !ok1 || !ok2 {
		return true
	}
	return !reflect.DeepEqual(o.Spec, n.Spec) || !reflect.DeepEqual(o.Status.Addresses, n.Status.Addresses)
}

// slimPod keeps what policy reads of a pod: identity, labels, node,
// container port names and numbers, phase and addresses.
func slimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a tombstone
	}
	out := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:            p.Name,
			Namespace:       p.Namespace,
			UID:             p.UID,
			ResourceVersion: p.ResourceVersion,
			Labels:          p.Labels,
		},
		Spec: corev1.PodSpec{
			NodeName:       p.Spec.NodeName,
			HostNetwork:    p.Spec.HostNetwork,
			Containers:     slimContainers(p.Spec.Containers),
			InitContainers: slimContainers(p.Spec.InitContainers),
		},
		Status: corev1.PodStatus{Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs},
	}
	return out, nil
}

func slimContainers(cs []corev1.Container) []corev1.Container {
	if len(cs) == 0 {
		return nil
	}
	out := make([]corev1.Container, len(cs))
	for i, c := range cs {
		out[i] = corev1.Container{Name: c.Name, Ports: c.Ports}
	}
	return out
}

// podChanged reports whether an update changed what policy reads (status
// conditions and the like change often and do not matter).
func podChanged(old, new any) bool {
	o, ok1 := old.(*corev1.Pod)
	n, ok2 := new.(*corev1.Pod)
	if !ok1 || !ok2 {
		return true
	}
	o2, n2 := o.DeepCopy(), n.DeepCopy()
	o2.ResourceVersion, n2.ResourceVersion = "", ""
	return !reflect.DeepEqual(o2, n2)
}

func labelsChanged(old, new any) bool {
	o, ok1 := old.(metav1.Object)
	n, ok2 := new.(metav1.Object)
	if !ok1 || !ok2 {
		return true
	}
	return !reflect.DeepEqual(o.GetLabels(), n.GetLabels())
}

// endpointsTarget is the Target of one network of this node.
type netTarget struct {
	replace func(*manifest.State) (int, error)
	collect func(gone func(*datapath.Endpoint, time.Duration) bool) (int, error)
	grace   time.Duration
}

func (t *netTarget) Replace(st *manifest.State) (int, error) { return t.replace(st) }

func (t *netTarget) Collect(exists func(namespace, name string) bool) (int, error) {
	return t.collect(func(ep *datapath.Endpoint, age time.Duration) bool {
		// Attachments without a pod name are not Kubernetes pods (cnitool,
		// tests): not ours to collect. A record younger than the grace
		// period may belong to a pod the cache has not seen yet.
		return ep.PodNamespace != "" && ep.PodName != "" && age >= t.grace && !exists(ep.PodNamespace, ep.PodName)
	})
}
