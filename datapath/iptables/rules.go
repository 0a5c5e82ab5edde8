package iptables

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	iptablesBin        = "iptables"
	iptablesRestoreBin = "iptables-restore"

	// maxCommentLen is the longest comment the xt_comment match takes.
	maxCommentLen = 255

	multicastCIDR = "224.0.0.0/4"
)

var (
	errEEXIST   = syscall.EEXIST
	errNotFound = errors.New("not found")

	// lockName is the abstract unix socket whose bind serialises Tern's
	// iptables changes across plugin processes and goroutines.
	// iptables-nft takes no lock of its own, so check-then-add would
	// otherwise race. Abstract sockets belong to a network namespace, as
	// iptables tables do, so the lock is exactly as wide as the rules it
	// guards; the kernel releases it when its holder exits, and it leaves
	// no file behind.
	lockName    = "@tern-iptables-lock"
	lockTimeout = time.Minute
)

// ChainNames returns the filter and nat chains of a network:
// TERN-FWD-<hash> and TERN-NAT-<hash>, <hash> being the first 8 hex digits
// of the SHA-256 of the name.
func ChainNames(network string) (fwd, nat string) {
	h := networkHash(network)
	return "TERN-FWD-" + h, "TERN-NAT-" + h
}

// networkHash is the first 8 hex digits of the SHA-256 of a network name.
func networkHash(network string) string {
	sum := sha256.Sum256([]byte(network))
	return hex.EncodeToString(sum[:4])
}

// chain is one of our chains with the rules it must hold, each rule as the
// arguments after "-A <chain>", spelled the way iptables -S prints them so
// that an unchanged chain is recognised and left alone (keeping counters).
type chain struct {
	table string
	name  string
	rules [][]string
}

// jump is the rule that sends a built-in chain's traffic to one of ours.
type jump struct {
	table  string
	parent string
	target string
	spec   []string // rule arguments, ending in -j target
	insert bool     // insert at position 1 instead of appending
}

func (d *Datapath) fwdChainSpec() chain {
	br := d.cfg.Bridge
	rules := [][]string{{"-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"}}
	// kube-proxy's DNAT ran in PREROUTING: a pod's packet still addressed
	// to a Service range here had no rule (Config.ServiceCIDRs).
	for _, n := range d.cfg.ServiceCIDRs {
		rules = append(rules, []string{"-i", br, "-d", n.String(), "-j", "DROP"})
	}
	rules = append(rules,
		[]string{"-j", d.pol.names.dispatch}, // NetworkPolicy of new connections (policy.go)
		[]string{"-i", br, "-j", "ACCEPT"},
		[]string{"-o", br, "-j", "ACCEPT"},
	)
	return chain{table: "filter", name: d.fwdChain, rules: rules}
}

func (d *Datapath) natChainSpec() chain {
	var dsts []string
	if cc := d.cfg.ClusterCIDR; cc != nil {
		dsts = append(dsts, cc.String())
		if !cidrContains(cc, &d.cfg.Subnet) {
			dsts = append(dsts, d.cfg.Subnet.String())
		}
	} else {
		dsts = append(dsts, d.cfg.Subnet.String())
	}
	for _, n := range d.cfg.NonMasqueradeCIDRs {
		dsts = append(dsts, n.String())
	}
	var rules [][]string
	for _, dst := range dsts {
		rules = append(rules, []string{"-d", dst, "-j", "RETURN"})
	}
	rules = append(rules, []string{"!", "-d", multicastCIDR, "-j", "MASQUERADE"})
	return chain{table: "nat", name: d.natChain, rules: rules}
}

// cidrContains reports whether outer contains all of inner.
func cidrContains(outer, inner *net.IPNet) bool {
	oOnes, _ := outer.Mask.Size()
	iOnes, _ := inner.Mask.Size()
	return oOnes <= iOnes && outer.Contains(inner.IP)
}

func (d *Datapath) fwdJump() jump {
	return jump{
		table: "filter", parent: "FORWARD", target: d.fwdChain, insert: true,
		spec: []string{"-m", "comment", "--comment", d.comment, "-j", d.fwdChain},
	}
}

func (d *Datapath) natJump() jump {
	return jump{
		table: "nat", parent: "POSTROUTING", target: d.natChain,
		spec: []string{"-s", d.cfg.Subnet.String(), "-m", "comment", "--comment", d.comment, "-j", d.natChain},
	}
}

// ensureRules brings our chains and jump rules to the configured state. It
// rewrites a chain only when its rules differ, in one iptables-restore
// transaction, and leaves exactly one jump rule per chain.
func (d *Datapath) ensureRules() error {
	unlock, err := lockIptables()
	if err != nil {
		return err
	}
	defer unlock()

	chains := []chain{d.fwdChainSpec()}
	if d.cfg.IPMasq {
		chains = append(chains, d.natChainSpec())
	}
	// The forward chain jumps to the policy dispatch chain, which must
	// exist first; it is created empty and never flushed here (its rules
	// are ApplyPolicy's).
	if err := d.pol.ensureDispatch(); err != nil {
		return err
	}
	var stale []chain
	for _, c := range chains {
		cur, exists, err := listChain(c.table, c.name)
		if err != nil {
			return err
		}
		if !exists || !slices.Equal(cur, c.lines()) {
			stale = append(stale, c)
		}
	}
	if len(stale) > 0 {
		if err := restoreChains(stale); err != nil {
			return err
		}
	}

	if err := ensureJump(d.fwdJump()); err != nil {
		return err
	}
	if d.cfg.IPMasq {
		return ensureJump(d.natJump())
	}
	// Masquerading is off: drop what an earlier configuration left.
	return removeChain(d.natJump())
}

// checkRules reports the first of our chains or jump rules that is missing.
func (d *Datapath) checkRules() error {
	jumps := []jump{d.fwdJump()}
	if d.cfg.IPMasq {
		jumps = append(jumps, d.natJump())
	}
	for _, j := range jumps {
		_, exists, err := listChain(j.table, j.target)
		if err != nil {
			return err
		}
		if !exists {
			return fmt.Errorf("iptables chain %s in table %s does not exist", j.target, j.table)
		}
		ok, err := ruleExists(j.table, j.parent, j.spec)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("iptables jump rule from %s to %s in table %s is missing", j.parent, j.target, j.table)
		}
	}
	if _, exists, err := listChain("filter", d.pol.names.dispatch); err != nil || !exists {
		if err == nil {
			err = fmt.Errorf("iptables policy chain %s does not exist", d.pol.names.dispatch)
		}
		return err
	}
	return nil
}

// removeRules deletes every jump to our chains, the chains themselves, the
// anti-spoofing table and the network's policy chains and sets.
func (d *Datapath) removeRules() error {
	unlock, err := lockIptables()
	if err != nil {
		return err
	}
	defer unlock()
	for _, j := range []jump{d.fwdJump(), d.natJump()} {
		if err := removeChain(j); err != nil {
			return err
		}
	}
	if err := d.removeAntispoofTable(); err != nil {
		return err
	}
	return d.pol.release()
}

// lines returns the chain's rules as iptables -S prints them.
func (c chain) lines() []string {
	out := make([]string, 0, len(c.rules))
	for _, r := range c.rules {
		out = append(out, "-A "+c.name+" "+strings.Join(r, " "))
	}
	return out
}

// restoreChains creates or replaces the given chains atomically per table:
// with --noflush, declaring a chain creates it or flushes it, and nothing
// else in the table is touched.
func restoreChains(chains []chain) error {
	var buf bytes.Buffer
	for _, table := range []string{"filter", "nat"} {
		var in []chain
		for _, c := range chains {
			if c.table == table {
				in = append(in, c)
			}
		}
		if len(in) == 0 {
			continue
		}
		fmt.Fprintf(&buf, "*%s\n", table)
		for _, c := range in {
			fmt.Fprintf(&buf, ":%s - [0:0]\n", c.name)
		}
		for _, c := range in {
			for _, l := range c.lines() {
				buf.WriteString(l)
				buf.WriteByte('\n')
			}
		}
		buf.WriteString("COMMIT\n")
	}
	input := buf.String()
	cmd := exec.Command(iptablesRestoreBin, "-w", "--noflush")
	cmd.Stdin = strings.NewReader(input)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("iptables-restore --noflush: %w: %s (input:\n%s)", err, strings.TrimSpace(string(out)), input)
	}
	return nil
}

// ensureJump leaves exactly one copy of j in its parent chain and no other
// rule jumping to j.target. The new rule goes in before stale ones come
// out, so traffic never finds the parent chain without a jump.
func ensureJump(j jump) error {
	found, err := jumpsTo(j.table, j.parent, j.target)
	if err != nil {
		return err
	}
	ok, err := ruleExists(j.table, j.parent, j.spec)
	if err != nil {
		return err
	}
	if ok && len(found) == 1 {
		return nil
	}
	add := append([]string{"-t", j.table, "-A", j.parent}, j.spec...)
	if j.insert {
		add = append([]string{"-t", j.table, "-I", j.parent, "1"}, j.spec...)
	}
	if _, err := runIptables(add...); err != nil {
		return err
	}
	// Each found rule is either stale or a duplicate of the one just added;
	// deleting one match per found rule leaves exactly the desired one.
	for _, spec := range found {
		if err := deleteRule(j.table, j.parent, spec); err != nil {
			return err
		}
	}
	return nil
}

// removeChain deletes every rule jumping to j.target from j.parent, then
// flushes and deletes the chain. Whatever is already gone is skipped.
func removeChain(j jump) error {
	found, err := jumpsTo(j.table, j.parent, j.target)
	if err != nil {
		return err
	}
	for _, spec := range found {
		if err := deleteRule(j.table, j.parent, spec); err != nil {
			return err
		}
	}
	_, exists, err := listChain(j.table, j.target)
	if err != nil || !exists {
		return err
	}
	// A chain that vanished meanwhile fails -F/-X with status 1, as does a
	// chain some other rule still references (iptables-legacy); only the
	// first is fine.
	_, ferr := runIptables("-t", j.table, "-F", j.target)
	_, xerr := runIptables("-t", j.table, "-X", j.target)
	if xerr == nil {
		return nil
	}
	if _, exists, err := listChain(j.table, j.target); err != nil || exists {
		return errors.Join(ferr, xerr, err)
	}
	return nil
}

// deleteRule runs iptables -D; a rule that is already gone (exit status 1)
// is not an error.
func deleteRule(table, parent string, spec []string) error {
	_, err := runIptables(append([]string{"-t", table, "-D", parent}, spec...)...)
	if err != nil && exitCode(err) != 1 {
		return err
	}
	return nil
}

// jumpsTo returns the rules of table/parent that jump to target, each as
// the arguments after "-A <parent>".
func jumpsTo(table, parent, target string) ([][]string, error) {
	out, err := runIptables("-t", table, "-S", parent)
	if err != nil {
		return nil, err
	}
	var found [][]string
	for _, line := range strings.Split(out, "\n") {
		words, err := splitWords(line)
		if err != nil {
			return nil, fmt.Errorf("parse iptables -t %s -S %s line %q: %w", table, parent, line, err)
		}
		if len(words) < 2 || words[0] != "-A" || words[1] != parent {
			continue
		}
		rule := words[2:]
		for i := 0; i+1 < len(rule); i++ {
			if rule[i] == "-j" && rule[i+1] == target {
				found = append(found, rule)
				break
			}
		}
	}
	return found, nil
}

// listChain returns a chain's rules as iptables -S prints them, without its
// -N line, and whether the chain exists.
func listChain(table, name string) ([]string, bool, error) {
	out, err := runIptables("-t", table, "-S", name)
	if err != nil {
		if exitCode(err) == 1 {
			return nil, false, nil
		}
		return nil, false, err
	}
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "-N ") {
			lines = append(lines, l)
		}
	}
	return lines, true, nil
}

// ruleExists runs iptables -C.
func ruleExists(table, parent string, spec []string) (bool, error) {
	_, err := runIptables(append([]string{"-t", table, "-C", parent}, spec...)...)
	if err == nil {
		return true, nil
	}
	if exitCode(err) == 1 {
		return false, nil
	}
	return false, err
}

// iptablesError is a failed iptables run.
type iptablesError struct {
	args   []string
	stderr string
	err    error
}

func (e *iptablesError) Error() string {
	return fmt.Sprintf("iptables %s: %v: %s", strings.Join(e.args, " "), e.err, e.stderr)
}

func (e *iptablesError) Unwrap() error { return e.err }

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// runIptables runs iptables -w with args and returns its standard output.
func runIptables(args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(iptablesBin, append([]string{"-w"}, args...)...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", &iptablesError{args: args, stderr: strings.TrimSpace(stderr.String()), err: err}
	}
	return stdout.String(), nil
}

// splitWords splits an iptables -S line into arguments, undoing the double
// quotes and backslash escapes iptables puts around comments.
func splitWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord, inQuote := false, false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			inWord = true
		case c == '"':
			inQuote = !inQuote
			inWord = true
		case (c == ' ' || c == '\t') && !inQuote:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inQuote {
		return nil, errors.New("unterminated quote")
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// lockIptables binds lockName in the calling thread's network namespace,
// polling until lockTimeout, and returns the function that releases it.
func lockIptables() (func(), error) {
	deadline := time.Now().Add(lockTimeout)
	wait := time.Millisecond
	for {
		fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("iptables lock socket: %w", err)
		}
		err = unix.Bind(fd, &unix.SockaddrUnix{Name: lockName})
		if err == nil {
			return func() { unix.Close(fd) }, nil
		}
		unix.Close(fd)
		if !errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("iptables lock %s: %w", lockName, err)
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("iptables lock %s: still held by another process after %s", lockName, lockTimeout)
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// isLinkNotFound reports whether err says the link does not exist.
func isLinkNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}
