package compile

import (
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/manifest"
)

// Compile computes the rule set of a node. The objects of st are assumed
// valid (manifest.Validate); topo is validated.
//
// prev is the rule set currently installed, or nil. Identities and classes
// that exist in prev keep their numbers, and a number prev uses is never
// given to anything else, so that while Diff(prev, new) is being applied no
// number ever means two things.
func Compile(st *manifest.State, topo *policy.Topology, prev *RuleSet) (*RuleSet, error) {
	if err := topo.Validate(); err != nil {
		return nil, fmt.Errorf("compile: %w", err)
	}
	if topo == nil {
		topo = &policy.Topology{}
	}
	if st == nil {
		st = manifest.NewState()
	}
	c := &compiler{st: st, topo: topo}
	if err := c.parsePolicies(); err != nil {
		return nil, fmt.Errorf("compile: %w", err)
	}
	c.buildPods()
	c.buildIdentities(prev)
	c.buildBlocks()
	c.buildIPCache(prev)
	c.buildPolicy()
	return c.ruleSet(), nil
}

type compiler struct {
	st   *manifest.State
	topo *policy.Topology

	policies []*cpolicy
	pods     []*pod // every endpoint, sorted by IP
	idents   []*ident
	identOf  map[string]*ident // by key
	local    []*ident          // identities with a local endpoint, sorted by ID

	blocks    []*cblock // ipBlocks of relevant policies, IPv4 only, by key
	hosts     map[netip.Addr]bool
	classes   []*class            // allocated classes (id >= 2), sorted by ID
	hostCls   []*class            // classes with Host set
	hostPlain bool                // some host address has ClassHost
	podCls    []*class            // classes of pods
	byBlock   map[string][]*class // classes whose blocks include the key
	ipcache   []IPCacheEntry
	policy    map[PolicyKey]bool
	isolated  map[uint32]*[2]bool
	remotes   map[*crule][]*class // matching classes of a rule, by rule
}

type pod struct {
	ip     netip.Addr
	ns     string
	labels labels.Set
	ports  []NamedPort
	local  bool
	ident  *ident
}

type ident struct {
	id     uint32
	key    string
	ns     string
	labels labels.Set
	ports  []NamedPort
	local  bool
}

type cpolicy struct {
	ns     string
	sel    labels.Selector
	active [2]bool
	rules  [2][]crule
}

type crule struct {
	anyPeer  bool
	peers    []cpeer
	allPorts bool
	ports    []cport
}

type cpeer struct {
	never  bool            // an ipBlock that can never match IPv4
	block  *cblock         // ipBlock peer
	podSel labels.Selector // nil: any pod (namespaceSelector alone)
	nsSel  labels.Selector // nil: the policy's namespace
}

type cblock struct {
	key    string
	cidr   netip.Prefix
	except []netip.Prefix
}

type portKind int

const (
	portAll portKind = iota
	portRange
	portNamed
)

type cport struct {
	proto     uint8
	protoName corev1.Protocol
	kind      portKind
	lo, hi    uint16
	name      string
}

type class struct {
	id     uint32
	key    string
	host   bool
	ident  *ident // nil if not a pod
	blocks map[string]bool
}

func (c *compiler) parsePolicies() error {
	blocks := map[string]*cblock{}
	for _, obj := range c.st.Objects() {
		np, ok := obj.(*networkingv1.NetworkPolicy)
		if !ok {
			continue
		}
		p := &cpolicy{ns: np.Namespace}
		var err error
		if p.sel, err = metav1.LabelSelectorAsSelector(&np.Spec.PodSelector); err != nil {
			return fmt.Errorf("NetworkPolicy %s/%s: spec.podSelector: %w", np.Namespace, np.Name, err)
		}
		if len(np.Spec.PolicyTypes) == 0 {
			p.active[Ingress] = true
			p.active[Egress] = len(np.Spec.Egress) > 0
		}
		for _, t := range np.Spec.PolicyTypes {
			switch t {
			case networkingv1.PolicyTypeIngress:
				p.active[Ingress] = true
			case networkingv1.PolicyTypeEgress:
				p.active[Egress] = true
			}
		}
		for _, r := range np.Spec.Ingress {
			cr, err := parseRule(r.From, r.Ports, blocks)
			if err != nil {
				return fmt.Errorf("NetworkPolicy %s/%s: %w", np.Namespace, np.Name, err)
			}
			p.rules[Ingress] = append(p.rules[Ingress], cr)
		}
		for _, r := range np.Spec.Egress {
			cr, err := parseRule(r.To, r.Ports, blocks)
			if err != nil {
				return fmt.Errorf("NetworkPolicy %s/%s: %w", np.Namespace, np.Name, err)
			}
			p.rules[Egress] = append(p.rules[Egress], cr)
		}
		c.policies = append(c.policies, p)
	}
	return nil
}

func parseRule(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort, blocks map[string]*cblock) (crule, error) {
	var r crule
	r.anyPeer = len(peers) == 0
	for _, peer := range peers {
		var cp cpeer
		var err error
		switch {
		case peer.IPBlock != nil:
			b, err := parseBlock(peer.IPBlock)
			if err != nil {
				return r, err
			}
			if b == nil {
				cp.never = true
			} else {
				if old, ok := blocks[b.key]; ok {
					b = old
				}
				blocks[b.key] = b
				cp.block = b
			}
		default:
			if peer.PodSelector != nil {
				if cp.podSel, err = metav1.LabelSelectorAsSelector(peer.PodSelector); err != nil {
					return r, err
				}
			}
			if peer.NamespaceSelector != nil {
				if cp.nsSel, err = metav1.LabelSelectorAsSelector(peer.NamespaceSelector); err != nil {
					return r, err
				}
			}
			if cp.podSel == nil && cp.nsSel == nil {
				return r, fmt.Errorf("peer with neither selector nor ipBlock")
			}
		}
		r.peers = append(r.peers, cp)
	}
	r.allPorts = len(ports) == 0
	for _, p := range ports {
		cp := cport{protoName: corev1.ProtocolTCP}
		if p.Protocol != nil {
			cp.protoName = *p.Protocol
		}
		switch cp.protoName {
		case corev1.ProtocolTCP:
			cp.proto = policy.ProtoTCP
		case corev1.ProtocolUDP:
			cp.proto = policy.ProtoUDP
		case corev1.ProtocolSCTP:
			cp.proto = policy.ProtoSCTP
		default:
			return r, fmt.Errorf("unsupported protocol %q", cp.protoName)
		}
		switch {
		case p.Port == nil:
			cp.kind = portAll
		case p.Port.Type == intstr.Int:
			lo, hi := p.Port.IntVal, p.Port.IntVal
			if p.EndPort != nil {
				hi = *p.EndPort
			}
			if lo < 1 || hi > 65535 || hi < lo {
				return r, fmt.Errorf("invalid port range %d-%d", lo, hi)
			}
			cp.kind, cp.lo, cp.hi = portRange, uint16(lo), uint16(hi)
		default:
			cp.kind, cp.name = portNamed, p.Port.StrVal
		}
		r.ports = append(r.ports, cp)
	}
	return r, nil
}

// parseBlock returns nil, nil for an IPv6 block (it never matches IPv4).
func parseBlock(b *networkingv1.IPBlock) (*cblock, error) {
	cidr, err := manifest.ParseCIDR(b.CIDR)
	if err != nil {
		return nil, fmt.Errorf("ipBlock cidr %q: %w", b.CIDR, err)
	}
	if !cidr.Addr().Is4() {
		return nil, nil
	}
	cb := &cblock{cidr: cidr}
	for _, e := range b.Except {
		ex, err := manifest.ParseCIDR(e)
		if err != nil {
			return nil, fmt.Errorf("ipBlock except %q: %w", e, err)
		}
		if ex.Addr().Is4() && !slices.Contains(cb.except, ex) {
			cb.except = append(cb.except, ex)
		}
	}
	slices.SortFunc(cb.except, comparePrefix)
	cb.key = cidr.String()
	if len(cb.except) > 0 {
		s := make([]string, len(cb.except))
		for i, e := range cb.except {
			s[i] = e.String()
		}
		cb.key += " except " + strings.Join(s, ",")
	}
	return cb, nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// contains reports whether the block contains every address of p.
func (b *cblock) contains(p netip.Prefix) bool {
	if !subPrefix(p, b.cidr) {
		return false
	}
	for _, e := range b.except {
		if subPrefix(p, e) {
			return false
		}
	}
	return true
}

// subPrefix reports whether p is inside q.
func subPrefix(p, q netip.Prefix) bool {
	return q.Bits() <= p.Bits() && q.Contains(p.Addr())
}

func (c *compiler) buildPods() {
	for _, ipStr := range slices.Sorted(maps.Keys(c.topo.Endpoints)) {
		ep := c.topo.Endpoints[ipStr]
		p := &pod{ip: netip.MustParseAddr(ipStr), ns: ep.Namespace, labels: labels.Set{}, local: ep.Local}
		if obj := c.st.Pods[types.NamespacedName{Namespace: ep.Namespace, Name: ep.Name}]; obj != nil {
			p.labels = labels.Set(obj.Labels)
			p.ports = namedPorts(obj)
		}
		c.pods = append(c.pods, p)
	}
}

func namedPorts(pod *corev1.Pod) []NamedPort {
	var out []NamedPort
	for _, ctr := range pod.Spec.Containers {
		for _, cp := range ctr.Ports {
			if cp.Name == "" || cp.ContainerPort < 1 || cp.ContainerPort > 65535 {
				continue
			}
			proto := cp.Protocol
			if proto == "" {
				proto = corev1.ProtocolTCP
			}
			np := NamedPort{Name: cp.Name, Protocol: proto, Port: uint16(cp.ContainerPort)}
			if !slices.Contains(out, np) {
				out = append(out, np)
			}
		}
	}
	slices.SortFunc(out, func(a, b NamedPort) int {
		return cmp.Or(strings.Compare(a.Name, b.Name), strings.Compare(string(a.Protocol), string(b.Protocol)), cmp.Compare(a.Port, b.Port))
	})
	return out
}

func identityKey(ns string, l map[string]string, ports []NamedPort) string {
	kv := make([][2]string, 0, len(l))
	for _, k := range slices.Sorted(maps.Keys(l)) {
		kv = append(kv, [2]string{k, l[k]})
	}
	b, _ := json.Marshal(struct {
		NS     string
		Labels [][2]string
		Ports  []NamedPort
	}{ns, kv, ports})
	return string(b)
}

func (c *compiler) buildIdentities(prev *RuleSet) {
	c.identOf = map[string]*ident{}
	for _, p := range c.pods {
		key := identityKey(p.ns, p.labels, p.ports)
		id := c.identOf[key]
		if id == nil {
			id = &ident{key: key, ns: p.ns, labels: p.labels, ports: p.ports}
			c.identOf[key] = id
		}
		id.local = id.local || p.local
		p.ident = id
	}
	prevIDs, taken := map[string]uint32{}, map[uint32]bool{}
	if prev != nil {
		for _, pi := range prev.Identities {
			prevIDs[identityKey(pi.Namespace, pi.Labels, pi.NamedPorts)] = pi.ID
			taken[pi.ID] = true
		}
		for _, ep := range prev.Endpoints {
			taken[ep.LocalID] = true
		}
	}
	keys := slices.Sorted(maps.Keys(c.identOf))
	ids := allocate(keys, prevIDs, taken, firstIdentity, NoIdentity)
	for _, k := range keys {
		id := c.identOf[k]
		id.id = ids[k]
		c.idents = append(c.idents, id)
	}
	slices.SortFunc(c.idents, func(a, b *ident) int { return cmp.Compare(a.id, b.id) })
	for _, id := range c.idents {
		if id.local {
			c.local = append(c.local, id)
		}
	}
}

// allocate gives each key a number: its number in prev if it has one,
// otherwise the lowest number >= first that is not taken (used by the
// installed rule set) and not reserved.
func allocate(keys []string, prev map[string]uint32, taken map[uint32]bool, first, reserved uint32) map[string]uint32 {
	out := make(map[string]uint32, len(keys))
	taken = maps.Clone(taken)
	if taken == nil {
		taken = map[uint32]bool{}
	}
	var fresh []string
	for _, k := range keys {
		if id, ok := prev[k]; ok && id >= first && id != ClassAny && id != reserved {
			out[k] = id
		} else {
			fresh = append(fresh, k)
		}
	}
	next := first
	for _, k := range fresh {
		for taken[next] || next == reserved || next == ClassAny {
			next++
		}
		out[k] = next
		taken[next] = true
	}
	return out
}

// selects reports whether p selects identity id in direction d.
func (p *cpolicy) selects(id *ident, d Direction) bool {
	return p.active[d] && p.ns == id.ns && p.sel.Matches(id.labels)
}

// buildBlocks keeps the ipBlocks of the rules that apply to some local
// identity; the others need no ipcache entries.
func (c *compiler) buildBlocks() {
	seen := map[string]*cblock{}
	for _, p := range c.policies {
		for d := Ingress; d <= Egress; d++ {
			relevant := false
			for _, id := range c.local {
				if p.selects(id, d) {
					relevant = true
					break
				}
			}
			if !relevant {
				continue
			}
			for _, r := range p.rules[d] {
				for _, peer := range r.peers {
					if peer.block != nil {
						seen[peer.block.key] = peer.block
					}
				}
			}
		}
	}
	for _, k := range slices.Sorted(maps.Keys(seen)) {
		c.blocks = append(c.blocks, seen[k])
	}
}

func classKey(host bool, id *ident, blocks []string) string {
	identKey := ""
	if id != nil {
		identKey = id.key
	}
	b, _ := json.Marshal(struct {
		Host   bool
		Ident  string
		Blocks []string
	}{host, identKey, blocks})
	return string(b)
}

func (c *compiler) buildIPCache(prev *RuleSet) {
	c.hosts = map[netip.Addr]bool{}
	for _, h := range c.topo.Hosts {
		a, _ := policy.Addr(h)
		c.hosts[a] = true
	}
	podAt := map[netip.Addr]*pod{}
	prefixes := map[netip.Prefix]bool{}
	for _, b := range c.blocks {
		prefixes[b.cidr] = true
		for _, e := range b.except {
			prefixes[e] = true
		}
	}
	for _, p := range c.pods {
		podAt[p.ip] = p
		prefixes[netip.PrefixFrom(p.ip, 32)] = true
	}
	for h := range c.hosts {
		prefixes[netip.PrefixFrom(h, 32)] = true
	}

	// The class of each prefix, as a descriptor.
	type desc struct {
		host   bool
		ident  *ident
		blocks []string
	}
	byCIDR := map[netip.Prefix][]*cblock{}
	for _, b := range c.blocks {
		byCIDR[b.cidr] = append(byCIDR[b.cidr], b)
	}
	descs := map[netip.Prefix]desc{}
	for p := range prefixes {
		var d desc
		// A block containing p has one of p's ancestors as its cidr.
		for bits := 0; bits <= p.Bits(); bits++ {
			for _, b := range byCIDR[netip.PrefixFrom(p.Addr(), bits).Masked()] {
				if b.contains(p) {
					d.blocks = append(d.blocks, b.key)
				}
			}
		}
		slices.Sort(d.blocks)
		if p.IsSingleIP() {
			if pd := podAt[p.Addr()]; pd != nil {
				d.ident = pd.ident
			} else if c.hosts[p.Addr()] {
				d.host = true
				c.hostPlain = c.hostPlain || len(d.blocks) == 0
			}
		}
		descs[p] = d
	}

	// Number the classes.
	byKey := map[string]*class{}
	for _, d := range descs {
		if d.ident == nil && len(d.blocks) == 0 {
			continue // world or host: reserved
		}
		k := classKey(d.host, d.ident, d.blocks)
		if byKey[k] == nil {
			bs := map[string]bool{}
			for _, b := range d.blocks {
				bs[b] = true
			}
			byKey[k] = &class{key: k, host: d.host, ident: d.ident, blocks: bs}
		}
	}
	prevIDs, taken := map[string]uint32{}, map[uint32]bool{}
	if prev != nil {
		identKeys := map[uint32]string{}
		for _, pi := range prev.Identities {
			identKeys[pi.ID] = identityKey(pi.Namespace, pi.Labels, pi.NamedPorts)
		}
		for _, pc := range prev.Classes {
			taken[pc.ID] = true
			var id *ident
			if pc.Identity != NoIdentity {
				k, ok := identKeys[pc.Identity]
				if !ok {
					continue // inconsistent: never reuse its meaning
				}
				id = &ident{key: k}
			}
			prevIDs[classKey(pc.Host, id, pc.Blocks)] = pc.ID
		}
		for _, e := range prev.IPCache {
			taken[e.Class] = true
		}
	}
	keys := slices.Sorted(maps.Keys(byKey))
	ids := allocate(keys, prevIDs, taken, firstClass, ClassHost)
	for _, k := range keys {
		cl := byKey[k]
		cl.id = ids[k]
		c.classes = append(c.classes, cl)
	}
	slices.SortFunc(c.classes, func(a, b *class) int { return cmp.Compare(a.id, b.id) })
	c.byBlock = map[string][]*class{}
	for _, cl := range c.classes {
		if cl.host {
			c.hostCls = append(c.hostCls, cl)
		}
		if cl.ident != nil {
			c.podCls = append(c.podCls, cl)
		}
		for b := range cl.blocks {
			c.byBlock[b] = append(c.byBlock[b], cl)
		}
	}

	classOf := func(p netip.Prefix) uint32 {
		d := descs[p]
		switch {
		case d.ident == nil && len(d.blocks) == 0 && d.host:
			return ClassHost
		case d.ident == nil && len(d.blocks) == 0:
			return ClassWorld
		}
		return byKey[classKey(d.host, d.ident, d.blocks)].id
	}
	// Drop entries that have the class their parent (the longest shorter
	// prefix in the set, or the world) would give: longest-prefix match
	// finds the same class without them.
	for _, p := range slices.SortedFunc(maps.Keys(prefixes), comparePrefix) {
		cls := classOf(p)
		parent := ClassWorld
		for bits := p.Bits() - 1; bits >= 0; bits-- {
			q := netip.PrefixFrom(p.Addr(), bits).Masked()
			if prefixes[q] {
				parent = classOf(q)
				break
			}
		}
		if cls == parent {
			continue
		}
		c.ipcache = append(c.ipcache, IPCacheEntry{Prefix: ipNet(p), Class: cls})
	}
}

// matches reports whether remote class cl matches peer of policy p.
func (c *compiler) matches(p *cpolicy, peer *cpeer, cl *class) bool {
	switch {
	case peer.never:
		return false
	case peer.block != nil:
		return cl.blocks[peer.block.key]
	case cl.ident == nil:
		return false
	case peer.nsSel != nil:
		if !peer.nsSel.Matches(c.st.NamespaceLabels(cl.ident.ns)) {
			return false
		}
	case cl.ident.ns != p.ns:
		return false
	}
	return peer.podSel == nil || peer.podSel.Matches(cl.ident.labels)
}

// ruleRemotes returns the classes matching at least one peer of a rule
// (for a rule with peers). It does not depend on the local identity, so it
// is computed once per rule.
func (c *compiler) ruleRemotes(p *cpolicy, r *crule) []*class {
	if cls, ok := c.remotes[r]; ok {
		return cls
	}
	seen := map[*class]bool{}
	var out []*class
	for i := range r.peers {
		peer := &r.peers[i]
		cands := c.podCls // selectors match pods only
		if peer.block != nil {
			cands = c.byBlock[peer.block.key]
		}
		for _, cl := range cands {
			if !seen[cl] && c.matches(p, peer, cl) {
				seen[cl] = true
				out = append(out, cl)
			}
		}
	}
	c.remotes[r] = out
	return out
}

func (c *compiler) buildPolicy() {
	c.remotes = map[*crule][]*class{}
	c.policy = map[PolicyKey]bool{}
	c.isolated = map[uint32]*[2]bool{}
	for _, L := range c.local {
		iso := &[2]bool{}
		c.isolated[L.id] = iso
		for d := Ingress; d <= Egress; d++ {
			for _, p := range c.policies {
				if !p.selects(L, d) {
					continue
				}
				iso[d] = true
				for i := range p.rules[d] {
					c.emitRule(d, L, p, &p.rules[d][i])
				}
			}
		}
		if iso[Ingress] {
			// Host addresses inside ipBlocks have classes of their own;
			// ClassHost itself is allowed by the lookup algorithm.
			for _, h := range c.hostCls {
				c.add(PolicyKey{Dir: Ingress, Proto: ProtoAny, LocalID: L.id, RemoteClass: h.id})
			}
		}
		if iso[Egress] {
			// Egress to the node is always allowed: explicit entries, so
			// the lookup needs no special case (see the package docs).
			if c.hostPlain {
				c.add(PolicyKey{Dir: Egress, Proto: ProtoAny, LocalID: L.id, RemoteClass: ClassHost})
			}
			for _, h := range c.hostCls {
				c.add(PolicyKey{Dir: Egress, Proto: ProtoAny, LocalID: L.id, RemoteClass: h.id})
			}
		}
	}
	c.prune()
}

func (c *compiler) emitRule(d Direction, L *ident, p *cpolicy, r *crule) {
	var remotes []*class // matching classes, when !r.anyPeer
	if !r.anyPeer {
		remotes = c.ruleRemotes(p, r)
	}
	emit := func(proto uint8, port uint16, bits uint8) {
		if r.anyPeer {
			c.add(PolicyKey{Dir: d, Proto: proto, LocalID: L.id, RemoteClass: ClassAny, Port: port, PortBits: bits})
			return
		}
		for _, cl := range remotes {
			c.add(PolicyKey{Dir: d, Proto: proto, LocalID: L.id, RemoteClass: cl.id, Port: port, PortBits: bits})
		}
	}
	if r.allPorts {
		emit(ProtoAny, 0, 0)
		return
	}
	for _, pt := range r.ports {
		switch pt.kind {
		case portAll:
			emit(pt.proto, 0, 0)
		case portRange:
			for _, blk := range portBlocks(pt.lo, pt.hi) {
				emit(pt.proto, blk.port, blk.bits)
			}
		case portNamed:
			if d == Ingress {
				// Resolved on the destination: the local pod.
				for _, np := range L.ports {
					if np.Name == pt.name && np.Protocol == pt.protoName {
						emit(pt.proto, np.Port, 16)
					}
				}
				continue
			}
			// Egress: resolved on the remote pod, so per pod class; never
			// matches a destination that is not a pod.
			cands := remotes
			if r.anyPeer {
				cands = c.podCls
			}
			for _, cl := range cands {
				if cl.ident == nil {
					continue
				}
				for _, np := range cl.ident.ports {
					if np.Name == pt.name && np.Protocol == pt.protoName {
						c.add(PolicyKey{Dir: d, Proto: pt.proto, LocalID: L.id, RemoteClass: cl.id, Port: np.Port, PortBits: 16})
					}
				}
			}
		}
	}
}

func (c *compiler) add(k PolicyKey) {
	k.Port &= portMask(k.PortBits)
	c.policy[k] = true
}

// prune drops entries whose traffic a broader entry already allows: a
// shorter port prefix, the any-remote entry, or the any-protocol entries.
func (c *compiler) prune() {
	covered := func(k PolicyKey) bool {
		for _, r := range []uint32{k.RemoteClass, ClassAny} {
			for bits := uint8(0); bits <= k.PortBits; bits++ {
				q := PolicyKey{Dir: k.Dir, Proto: k.Proto, LocalID: k.LocalID, RemoteClass: r, Port: k.Port & portMask(bits), PortBits: bits}
				if q != k && c.policy[q] {
					return true
				}
			}
			if k.Proto != ProtoAny {
				q := PolicyKey{Dir: k.Dir, Proto: ProtoAny, LocalID: k.LocalID, RemoteClass: r}
				if c.policy[q] {
					return true
				}
			}
		}
		return false
	}
	var drop []PolicyKey
	for k := range c.policy {
		if covered(k) {
			drop = append(drop, k)
		}
	}
	// Coverage is by strictly broader keys, and broader-than is transitive,
	// so dropping all covered keys at once keeps every broadest one.
	for _, k := range drop {
		delete(c.policy, k)
	}
}

type portBlock struct {
	port uint16
	bits uint8
}

// portBlocks splits [lo, hi] into the fewest prefix-aligned blocks.
func portBlocks(lo, hi uint16) []portBlock {
	var out []portBlock
	for cur := uint32(lo); cur <= uint32(hi); {
		size := uint32(1) << 16
		if cur != 0 {
			size = cur & -cur // alignment of cur
		}
		for cur+size-1 > uint32(hi) {
			size >>= 1
		}
		bits := uint8(16)
		for s := size; s > 1; s >>= 1 {
			bits--
		}
		out = append(out, portBlock{port: uint16(cur), bits: bits})
		cur += size
	}
	return out
}

func (c *compiler) ruleSet() *RuleSet {
	rs := &RuleSet{
		Endpoints:  map[string]EndpointPolicy{},
		IPCache:    c.ipcache,
		Policy:     make([]PolicyEntry, 0, len(c.policy)),
		Identities: make([]Identity, 0, len(c.idents)),
		Classes:    make([]Class, 0, len(c.classes)),
	}
	if rs.IPCache == nil {
		rs.IPCache = []IPCacheEntry{}
	}
	for _, p := range c.pods {
		if !p.local {
			continue
		}
		iso := c.isolated[p.ident.id]
		rs.Endpoints[p.ip.String()] = EndpointPolicy{LocalID: p.ident.id, IngressIsolated: iso[Ingress], EgressIsolated: iso[Egress]}
	}
	for k := range c.policy {
		rs.Policy = append(rs.Policy, PolicyEntry{Key: k, Verdict: VerdictAllow})
	}
	slices.SortFunc(rs.Policy, func(a, b PolicyEntry) int { return comparePolicyKey(a.Key, b.Key) })
	for _, id := range c.idents {
		var l map[string]string
		if len(id.labels) > 0 {
			l = maps.Clone(map[string]string(id.labels))
		}
		rs.Identities = append(rs.Identities, Identity{ID: id.id, Namespace: id.ns, Labels: l, NamedPorts: slices.Clone(id.ports)})
	}
	for _, cl := range c.classes {
		out := Class{ID: cl.id, Host: cl.host, Blocks: slices.Sorted(maps.Keys(cl.blocks))}
		if cl.ident != nil {
			out.Identity = cl.ident.id
		}
		rs.Classes = append(rs.Classes, out)
	}
	return rs
}
