package iptables

// NetworkPolicy enforcement: a compile.RuleSet rendered as ipsets and
// iptables chains with exactly the RuleSet's lookup semantics (see package
// policy/compile), so the iptables and eBPF datapaths give identical
// verdicts.
//
// Per network (<hash> as in ChainNames, <g> the generation, "a" or "b"):
//
//   - ipset TERN-C-<hash>-<g><class>, type hash:net, per remote class that
//     a policy entry names (and class 1, the host, when some ingress is
//     isolated). It holds the class's ipcache prefixes plus, flagged
//     nomatch, every ipcache prefix of another class nested inside one of
//     them. hash:net tests the most specific prefix it holds first and a
//     nomatch entry ends the test negatively, so an address is in the set
//     exactly when its longest matching ipcache prefix has the class.
//   - chain TERN-<hash>-<g>I<id> / TERN-<hash>-<g>E<id> per local identity
//     isolated for ingress / egress: one rule per policy entry (set match
//     on the source for ingress, on the destination for egress, unless the
//     entry is for any remote; -p unless any protocol; --dport lo:hi from
//     the port prefix) returning to the caller, and a final DROP. Ingress
//     chains first return for the host set: the lookup allows ingress from
//     class 1 without an entry.
//   - chain TERN-POL-<hash>, the dispatch chain, jumped to from the
//     network's forward chain right after its conntrack ESTABLISHED,RELATED
//     accept and before its bridge accepts: per isolated endpoint
//     "-s podIP -d podIP -j RETURN" (a pod reaching itself through its
//     Service is never policed), "-s podIP -j <egress chain>" and
//     "-d podIP -j <ingress chain>".
//
// Allowed packets RETURN rather than ACCEPT so that a packet between two
// local pods meets the source's egress chain and then the destination's
// ingress chain; what returns from the dispatch chain is accepted by the
// forward chain as before. Replies and related packets of allowed
// connections never reach the dispatch chain (stateful, like the eBPF
// conntrack).
//
// Bridged pod-to-pod traffic goes through FORWARD with br_netfilter
// (bridge-nf-call-iptables=1), -i/-o naming the bridge, so no physdev match
// is needed; the policy rules match on addresses only. The node's own
// traffic to and from pods goes through OUTPUT and INPUT, never FORWARD, so
// it stays allowed, as policy requires.
//
// An update never opens access for a moment: the new generation's sets are
// created (ipset restore) and its chains created and swapped in with the
// dispatch chain's new rules in one iptables-restore --noflush transaction;
// only then are the old generation's chains and sets removed.

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"

	"github.com/ternlabs/tern/datapath"
	"github.com/ternlabs/tern/policy"
	"github.com/ternlabs/tern/policy/compile"
)

const (
	ipsetBin = "ipset"

	// Kernel limits on names: xt chain names take 28 characters, ipset
	// names 31.
	maxChainLen = 28
	maxSetLen   = 31

	// defaultMaxElem is ipset's default maxelem.
	defaultMaxElem = 65536
)

// Generations alternate between these two.
const (
	genA byte = 'a'
	genB byte = 'b'
)

// Policy enforces compiled NetworkPolicy on one network's pods. Datapath
// embeds one; NewPolicy makes one for callers that have no pod subnet at
// hand (policy changes on a node without pods).
type Policy struct {
	names policyNames
}

var (
	_ datapath.PolicyEnforcer = (*Policy)(nil)
	_ datapath.PolicyEnforcer = (*Datapath)(nil)
)

// NewPolicy returns the policy enforcer of a network. It touches nothing.
func NewPolicy(network string) (*Policy, error) {
	if network == "" {
		return nil, errors.New("iptables policy: network name is empty")
	}
	return &Policy{names: newPolicyNames(network)}, nil
}

// policyNames are the names of one network's policy objects.
type policyNames struct {
	dispatch    string // TERN-POL-<hash>
	chainPrefix string // TERN-<hash>-, then generation, direction, identity
	setPrefix   string // TERN-C-<hash>-, then generation, class
}

func newPolicyNames(network string) policyNames {
	h := networkHash(network)
	return policyNames{dispatch: "TERN-POL-" + h, chainPrefix: "TERN-" + h + "-", setPrefix: "TERN-C-" + h + "-"}
}

// DispatchChain returns the name of a network's policy dispatch chain.
func DispatchChain(network string) string { return newPolicyNames(network).dispatch }

func (n policyNames) chain(gen byte, d compile.Direction, id uint32) string {
	dir := "I"
	if d == compile.Egress {
		dir = "E"
	}
	return n.chainPrefix + string(gen) + dir + strconv.FormatUint(uint64(id), 10)
}

func (n policyNames) set(gen byte, class uint32) string {
	return n.setPrefix + string(gen) + strconv.FormatUint(uint64(class), 10)
}

// genOf returns the generation of one of our chain or set names, 0 if the
// name is not ours.
func (n policyNames) genOf(name string) byte {
	for _, p := range []string{n.chainPrefix, n.setPrefix} {
		if strings.HasPrefix(name, p) && len(name) > len(p) {
			if g := name[len(p)]; g == genA || g == genB {
				return g
			}
		}
	}
	return 0
}

// setEntry is one element of a hash:net set.
type setEntry struct {
	prefix  netip.Prefix
	nomatch bool
}

func (e setEntry) String() string {
	if e.nomatch {
		return e.prefix.String() + " nomatch"
	}
	return e.prefix.String()
}

// classSets returns, for every class of the ipcache, the hash:net entries
// whose membership test is "the longest ipcache prefix containing the
// address has this class": the class's prefixes, and every prefix of
// another class nested strictly inside one of them as nomatch. hash:net
// cannot hold /0, so a /0 becomes its two /1 halves, minus a half that is
// itself an ipcache prefix (which then decides its addresses).
func classSets(ipcache []compile.IPCacheEntry) (map[uint32][]setEntry, error) {
	classOf := make(map[netip.Prefix]uint32, len(ipcache))
	for _, e := range ipcache {
		p, err := ipcachePrefix(e)
		if err != nil {
			return nil, err
		}
		if _, dup := classOf[p]; dup {
			return nil, fmt.Errorf("ipcache: prefix %s given twice", p)
		}
		classOf[p] = e.Class
	}
	sets := map[uint32]map[netip.Prefix]bool{} // class -> prefix -> nomatch
	add := func(cls uint32, p netip.Prefix, nomatch bool) {
		if sets[cls] == nil {
			sets[cls] = map[netip.Prefix]bool{}
		}
		sets[cls][p] = nomatch
	}
	for p, cls := range classOf {
		if p.Bits() == 0 {
			for _, half := range []netip.Prefix{netip.MustParsePrefix("0.0.0.0/1"), netip.MustParsePrefix("128.0.0.0/1")} {
				if _, taken := classOf[half]; !taken {
					add(cls, half, false)
				}
			}
		} else {
			add(cls, p, false)
		}
		// Nested inside prefixes of other classes: nomatch there.
		for bits := p.Bits() - 1; bits >= 0; bits-- {
			anc := netip.PrefixFrom(p.Addr(), bits).Masked()
			if c, ok := classOf[anc]; ok && c != cls {
				add(c, p, true)
			}
		}
	}
	out := make(map[uint32][]setEntry, len(sets))
	for cls, m := range sets {
		entries := make([]setEntry, 0, len(m))
		for p, nm := range m {
			entries = append(entries, setEntry{prefix: p, nomatch: nm})
		}
		slices.SortFunc(entries, func(a, b setEntry) int { return comparePrefix(a.prefix, b.prefix) })
		out[cls] = entries
	}
	return out, nil
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func ipcachePrefix(e compile.IPCacheEntry) (netip.Prefix, error) {
	ip := e.Prefix.IP.To4()
	ones, bits := e.Prefix.Mask.Size()
	if ip == nil || bits != 32 {
		return netip.Prefix{}, fmt.Errorf("ipcache: %v is not an IPv4 prefix", e.Prefix.String())
	}
	p := netip.PrefixFrom(netip.AddrFrom4([4]byte(ip)), ones)
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("ipcache: %s has host bits set", p)
	}
	return p, nil
}

// ipset is one set to create.
type ipset struct {
	name    string
	entries []setEntry
}

// policyRules is a rule set rendered for one generation.
type policyRules struct {
	gen      byte
	sets     []ipset    // sorted by name
	chains   []chain    // per identity and direction, sorted by name
	dispatch [][]string // rules of the dispatch chain
}

// renderPolicy renders a rule set as ipsets and filter chains of
// generation gen.
func renderPolicy(rs *compile.RuleSet, names policyNames, gen byte) (*policyRules, error) {
	r := &policyRules{gen: gen}
	if rs == nil {
		return r, nil
	}
	// Which (identity, direction) needs a chain.
	type chainKey struct {
		d  compile.Direction
		id uint32
	}
	need := map[chainKey]bool{}
	ips := slices.Sorted(maps.Keys(rs.Endpoints))
	slices.SortFunc(ips, func(a, b string) int { return compareAddr(a, b) })
	for _, ip := range ips {
		a, err := netip.ParseAddr(ip)
		if err != nil || !a.Is4() {
			return nil, fmt.Errorf("endpoint %q: not an IPv4 address", ip)
		}
		ep := rs.Endpoints[ip]
		if ep.LocalID == compile.NoIdentity && (ep.EgressIsolated || ep.IngressIsolated) {
			return nil, fmt.Errorf("endpoint %s: isolated without an identity", ip)
		}
		if ep.EgressIsolated || ep.IngressIsolated {
			// A pod reaching itself (through its own Service: the
			// bridge hairpins it back after the DNAT) cannot be
			// blocked by its policy.
			r.dispatch = append(r.dispatch, []string{"-s", a.String() + "/32", "-d", a.String() + "/32", "-j", "RETURN"})
		}
		if ep.EgressIsolated {
			need[chainKey{compile.Egress, ep.LocalID}] = true
			r.dispatch = append(r.dispatch, []string{"-s", a.String() + "/32", "-j", names.chain(gen, compile.Egress, ep.LocalID)})
		}
		if ep.IngressIsolated {
			need[chainKey{compile.Ingress, ep.LocalID}] = true
			r.dispatch = append(r.dispatch, []string{"-d", a.String() + "/32", "-j", names.chain(gen, compile.Ingress, ep.LocalID)})
		}
	}

	all, err := classSets(rs.IPCache)
	if err != nil {
		return nil, err
	}
	usedSets := map[uint32]bool{}
	rules := map[chainKey][][]string{}
	hostRule := len(all[compile.ClassHost]) > 0
	for k := range need {
		if k.d == compile.Ingress && hostRule {
			usedSets[compile.ClassHost] = true
			rules[k] = append(rules[k], []string{"-m", "set", "--match-set", names.set(gen, compile.ClassHost), "src", "-j", "RETURN"})
		}
	}
	for _, e := range rs.Policy {
		k := chainKey{e.Key.Dir, e.Key.LocalID}
		if e.Verdict != compile.VerdictAllow {
			return nil, fmt.Errorf("policy entry %v: unknown verdict %d", e.Key, e.Verdict)
		}
		if k.d != compile.Ingress && k.d != compile.Egress {
			return nil, fmt.Errorf("policy entry %v: bad direction", e.Key)
		}
		if !need[k] {
			continue // no endpoint of this identity is isolated this way
		}
		rule, err := entryRule(e.Key, names, gen)
		if err != nil {
			return nil, err
		}
		if e.Key.RemoteClass != compile.ClassAny {
			usedSets[e.Key.RemoteClass] = true
		}
		rules[k] = append(rules[k], rule)
	}
	for k := range need {
		r.chains = append(r.chains, chain{table: "filter", name: names.chain(gen, k.d, k.id), rules: append(rules[k], []string{"-j", "DROP"})})
	}
	slices.SortFunc(r.chains, func(a, b chain) int { return strings.Compare(a.name, b.name) })
	for cls := range usedSets {
		r.sets = append(r.sets, ipset{name: names.set(gen, cls), entries: all[cls]})
	}
	slices.SortFunc(r.sets, func(a, b ipset) int { return strings.Compare(a.name, b.name) })
	for _, c := range r.chains {
		if len(c.name) > maxChainLen {
			return nil, fmt.Errorf("chain name %s is longer than %d characters", c.name, maxChainLen)
		}
	}
	for _, s := range r.sets {
		if len(s.name) > maxSetLen {
			return nil, fmt.Errorf("set name %s is longer than %d characters", s.name, maxSetLen)
		}
	}
	return r, nil
}

func compareAddr(a, b string) int {
	x, errx := netip.ParseAddr(a)
	y, erry := netip.ParseAddr(b)
	if errx != nil || erry != nil {
		return strings.Compare(a, b)
	}
	return x.Compare(y)
}

// entryRule renders one policy entry as the arguments of a RETURN rule,
// spelled as iptables -S prints them.
func entryRule(k compile.PolicyKey, names policyNames, gen byte) ([]string, error) {
	var rule []string
	var match string // the protocol's port match
	switch k.Proto {
	case compile.ProtoAny:
		if k.PortBits != 0 {
			return nil, fmt.Errorf("policy entry %v: any protocol with port bits", k)
		}
	case policy.ProtoTCP:
		rule, match = append(rule, "-p", "tcp"), "tcp"
	case policy.ProtoUDP:
		rule, match = append(rule, "-p", "udp"), "udp"
	case policy.ProtoSCTP:
		rule, match = append(rule, "-p", "sctp"), "sctp"
	default:
		rule = append(rule, "-p", strconv.Itoa(int(k.Proto)))
	}
	if k.RemoteClass == compile.ClassWorld {
		// "No ipcache entry" cannot be a set; the compiler never names
		// the world (only ClassAny matches it).
		return nil, fmt.Errorf("policy entry %v: remote class world cannot be matched", k)
	}
	if k.RemoteClass != compile.ClassAny {
		dir := "src"
		if k.Dir == compile.Egress {
			dir = "dst"
		}
		rule = append(rule, "-m", "set", "--match-set", names.set(gen, k.RemoteClass), dir)
	}
	if k.PortBits > 16 {
		return nil, fmt.Errorf("policy entry %v: port bits > 16", k)
	}
	if k.PortBits > 0 {
		if match == "" {
			return nil, fmt.Errorf("policy entry %v: ports of protocol %d cannot be matched", k, k.Proto)
		}
		mask := ^uint16(0) << (16 - k.PortBits)
		if k.Port&^mask != 0 {
			return nil, fmt.Errorf("policy entry %v: port has bits beyond the prefix", k)
		}
		lo, hi := k.Port, k.Port|^mask
		ports := strconv.Itoa(int(lo))
		if hi != lo {
			ports += ":" + strconv.Itoa(int(hi))
		}
		rule = append(rule, "-m", match, "--dport", ports)
	}
	return append(rule, "-j", "RETURN"), nil
}

// ipsetRestore renders the sets as ipset restore input that creates them.
func (r *policyRules) ipsetRestore() string {
	var b strings.Builder
	for _, s := range r.sets {
		fmt.Fprintf(&b, "create %s hash:net family inet maxelem %d\n", s.name, max(defaultMaxElem, len(s.entries)))
		for _, e := range s.entries {
			fmt.Fprintf(&b, "add %s %s\n", s.name, e)
		}
	}
	return b.String()
}

// iptablesRestore renders the swap transaction: the generation's chains
// created with their rules, and the dispatch chain flushed and refilled.
func (r *policyRules) iptablesRestore(names policyNames) string {
	var b strings.Builder
	b.WriteString("*filter\n")
	fmt.Fprintf(&b, ":%s - [0:0]\n", names.dispatch)
	for _, c := range r.chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c.name)
	}
	for _, c := range r.chains {
		for _, l := range c.lines() {
			b.WriteString(l)
			b.WriteByte('\n')
		}
	}
	for _, l := range (chain{name: names.dispatch, rules: r.dispatch}).lines() {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// ApplyPolicy implements datapath.PolicyEnforcer (see Policy.ApplyPolicy).
func (d *Datapath) ApplyPolicy(prev, next *compile.RuleSet) error {
	return d.pol.ApplyPolicy(prev, next)
}

// ApplyPolicy makes next the rule set in force. The iptables datapath does
// not depend on prev: it renders next in full as a new generation, swaps it
// in atomically and removes everything else of the network's policy
// objects, so it also repairs what an earlier failure or a manual edit
// left. On error the rule set in force is the one before the call.
func (p *Policy) ApplyPolicy(_, next *compile.RuleSet) error {
	unlock, err := lockIptables()
	if err != nil {
		return err
	}
	defer unlock()
	if err := p.apply(next); err != nil {
		return fmt.Errorf("iptables policy: %w", err)
	}
	return nil
}

func (p *Policy) apply(next *compile.RuleSet) error {
	cur, err := p.objects()
	if err != nil {
		return err
	}
	gen := genA
	if cur.live == genA {
		gen = genB
	}
	r, err := renderPolicy(next, p.names, gen)
	if err != nil {
		return err
	}
	// Leftovers of the generation about to be built (a failed earlier
	// update) are unreferenced: clear them first.
	if err := p.remove(cur, func(g byte) bool { return g == gen }); err != nil {
		return err
	}
	if !cur.dispatch && len(r.dispatch) == 0 {
		// Nothing enforced before or now: no dispatch chain to create,
		// only stray objects to remove.
		return p.remove(cur, func(g byte) bool { return g != gen })
	}
	if len(r.sets) > 0 {
		if err := runIPSetRestore(r.ipsetRestore()); err != nil {
			return errors.Join(err, p.removeGen(gen))
		}
	}
	if err := runIptablesRestore(r.iptablesRestore(p.names)); err != nil {
		return errors.Join(err, p.removeGen(gen))
	}
	// The new generation is in force. What is left of the old one is
	// unreferenced: failing to remove it changes no verdict, and the next
	// update or ReleaseNode retries, so it is reported but not an error
	// (an error would tell the caller that the old rule set is in force).
	after, err := p.objects()
	if err == nil {
		err = p.remove(after, func(g byte) bool { return g != gen })
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "tern: iptables policy: removing the previous generation: %v\n", err)
	}
	return nil
}

// removeGen removes one generation's chains and sets (undo of a failed
// update).
func (p *Policy) removeGen(gen byte) error {
	cur, err := p.objects()
	if err != nil {
		return err
	}
	return p.remove(cur, func(g byte) bool { return g == gen })
}

// Release removes every policy object of the network: the dispatch chain,
// both generations' chains and sets. The caller must already have removed
// the forward chain's jump to the dispatch chain (or the whole forward
// chain).
func (p *Policy) Release() error {
	unlock, err := lockIptables()
	if err != nil {
		return err
	}
	defer unlock()
	return p.release()
}

func (p *Policy) release() error {
	cur, err := p.objects()
	if err != nil {
		return err
	}
	if cur.dispatch {
		cur.chains = append(cur.chains, p.names.dispatch)
	}
	if err := p.remove(cur, func(byte) bool { return true }); err != nil {
		return fmt.Errorf("iptables policy: %w", err)
	}
	return nil
}

// policyObjects are the network's policy objects that exist.
type policyObjects struct {
	dispatch bool     // the dispatch chain exists
	live     byte     // generation the dispatch chain jumps to, 0 if none
	chains   []string // per-identity chains (not the dispatch chain)
	sets     []string
}

func (p *Policy) objects() (*policyObjects, error) {
	o := &policyObjects{}
	out, err := runIptables("-t", "filter", "-S")
	if err != nil {
		return nil, err
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "-N" && f[1] == p.names.dispatch:
			o.dispatch = true
		case len(f) == 2 && f[0] == "-N" && p.names.genOf(f[1]) != 0 && strings.HasPrefix(f[1], p.names.chainPrefix):
			o.chains = append(o.chains, f[1])
		case len(f) >= 4 && f[0] == "-A" && f[1] == p.names.dispatch && f[len(f)-2] == "-j":
			if g := p.names.genOf(f[len(f)-1]); g != 0 {
				o.live = g
			}
		}
	}
	if o.sets, err = p.listSets(); err != nil {
		return nil, err
	}
	return o, nil
}

// listSets lists the network's sets. Without the ipset tool there are
// none of ours (we could not have made any).
func (p *Policy) listSets() ([]string, error) {
	if _, err := exec.LookPath(ipsetBin); err != nil {
		return nil, nil
	}
	out, err := runIPSet("list", "-n")
	if err != nil {
		return nil, err
	}
	var sets []string
	for _, name := range strings.Fields(out) {
		if strings.HasPrefix(name, p.names.setPrefix) && p.names.genOf(name) != 0 {
			sets = append(sets, name)
		}
	}
	return sets, nil
}

// remove deletes the chains and then the sets of o whose generation
// matches (the dispatch chain, if listed in o.chains, always). Chains go
// in one transaction: declaring them flushes them, so references between
// them are gone before they are deleted.
func (p *Policy) remove(o *policyObjects, which func(gen byte) bool) error {
	var chains, sets []string
	for _, c := range o.chains {
		if c == p.names.dispatch || which(p.names.genOf(c)) {
			chains = append(chains, c)
		}
	}
	for _, s := range o.sets {
		if which(p.names.genOf(s)) {
			sets = append(sets, s)
		}
	}
	if len(chains) > 0 {
		var b strings.Builder
		b.WriteString("*filter\n")
		for _, c := range chains {
			fmt.Fprintf(&b, ":%s - [0:0]\n", c)
		}
		for _, c := range chains {
			fmt.Fprintf(&b, "-X %s\n", c)
		}
		b.WriteString("COMMIT\n")
		if err := runIptablesRestore(b.String()); err != nil {
			return err
		}
	}
	if len(sets) > 0 {
		var b strings.Builder
		for _, s := range sets {
			fmt.Fprintf(&b, "destroy %s\n", s)
		}
		if err := runIPSetRestore(b.String()); err != nil {
			return err
		}
	}
	return nil
}

// ensureDispatch creates the dispatch chain if it does not exist, without
// touching its rules (the forward chain jumps to it).
func (p *Policy) ensureDispatch() error {
	_, exists, err := listChain("filter", p.names.dispatch)
	if err != nil || exists {
		return err
	}
	_, err = runIptables("-t", "filter", "-N", p.names.dispatch)
	return err
}

// runIptablesRestore feeds input to iptables-restore --noflush.
func runIptablesRestore(input string) error {
	cmd := exec.Command(iptablesRestoreBin, "-w", "--noflush")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("iptables-restore --noflush: %w: %s (input:\n%s)", err, strings.TrimSpace(string(out)), truncateLines(input, 50))
	}
	return nil
}

// runIPSetRestore feeds input to ipset restore.
func runIPSetRestore(input string) error {
	if _, err := exec.LookPath(ipsetBin); err != nil {
		return fmt.Errorf("NetworkPolicy in iptables mode needs the ipset tool: %w", err)
	}
	cmd := exec.Command(ipsetBin, "restore")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ipset restore: %w: %s (input:\n%s)", err, strings.TrimSpace(string(out)), truncateLines(input, 50))
	}
	return nil
}

// runIPSet runs ipset with args and returns its standard output.
func runIPSet(args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(ipsetBin, args...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("ipset %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// truncateLines keeps error messages readable for large inputs.
func truncateLines(s string, n int) string {
	lines := strings.SplitAfter(s, "\n")
	if len(lines) <= n {
		return s
	}
	return strings.Join(lines[:n], "") + fmt.Sprintf("... (%d more lines)\n", len(lines)-n)
}
