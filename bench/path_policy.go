package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// ternctlTimeout bounds one `ternctl apply` or `ternctl delete`. Like a CNI
// plugin, ternctl is never killed half-way through an update when the run
// is interrupted: only this bounds it.
const ternctlTimeout = 3 * time.Minute

// PolicyApplied describes one rule set put in force.
type PolicyApplied struct {
	Took time.Duration // wall time of the update (ternctl apply: decode, compile, datapath update, state saved)
	// Entries is the number of policy entries of the compiled rule set
	// the node's policy store recorded as applied; -1 if unknown.
	Entries int
	// ChainRules is, on the iptables datapath, the number of rules in the
	// server pod's ingress chain, which a new flow walks until one returns;
	// -1 elsewhere.
	ChainRules int
}

// unavailableError marks a workload that cannot run on a path, found out
// only when it tried (the datapath does not implement what it needs). The
// run reports the workload unavailable on that path with the reason, does
// not count it as a failure and does not try again.
type unavailableError struct{ reason string }

func (e *unavailableError) Error() string { return e.reason }

// ternPolicy applies the sweep's rule sets to a Tern network exactly as an
// operator would: `ternctl --cni-conf <the network's conflist> apply -f
// <manifests>` run in the node namespace, which goes through the node's
// policy store (decode, compile against the network's endpoints, the
// datapath's ApplyPolicy, state saved) before it returns.
type ternPolicy struct {
	ternctl  string
	conf     string // the network's conflist, as written for libcni
	network  string
	stateDir string
	datapath string
	dir      string // manifests written here
	t        *Topology
	// node is where ternctl runs: the server pod's node (t.Node on a
	// single node, the second node on a cross-node path).
	node *Netns
	// remoteClient: the client pod is on another node, so its Pod object
	// carries its IP (status.podIPs), as the API gives remote pods theirs.
	remoteClient bool

	podsApplied bool
	applied     string // manifest of the policies in force, "" when none
}

func (r *runner) newTernPolicy(t *Topology, path, datapath, stateDir string, conflist map[string]any) (*ternPolicy, error) {
	return r.newTernPolicyOn(t, t.Node, datapath, path, stateDir, conflist)
}

// newTernPolicyOn is newTernPolicy for the network named after path on
// node (the server pod's node).
func (r *runner) newTernPolicyOn(t *Topology, node *Netns, datapath, path, stateDir string, conflist map[string]any) (*ternPolicy, error) {
	dir := filepath.Join(r.tmp, "policy-"+path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(conflist, "", "  ")
	if err != nil {
		return nil, err
	}
	conf := filepath.Join(dir, "tern.conflist")
	if err := os.WriteFile(conf, b, 0o600); err != nil {
		return nil, err
	}
	return &ternPolicy{
		ternctl:  r.ternctl,
		conf:     conf,
		network:  r.netName(path),
		stateDir: stateDir,
		datapath: datapath,
		dir:      dir,
		t:        t,
		node:     node,
	}, nil
}

// run runs ternctl verb -f file in the node namespace.
func (p *ternPolicy) run(ctx context.Context, verb, file string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ternctlTimeout)
	defer cancel()
	_, err := p.node.Run(ctx, p.ternctl, "--cni-conf", p.conf, verb, "-f", file)
	if err != nil && strings.Contains(strings.ToLower(err.Error()), "not implemented") {
		msg := err.Error()
		if i := strings.LastIndex(msg, "ternctl: "); i >= 0 {
			msg = msg[i:] // what ternctl said, without its command line
		}
		return &unavailableError{reason: fmt.Sprintf("the %s datapath does not enforce NetworkPolicy yet (ternctl %s: %s)", p.datapath, verb, oneLine(msg))}
	}
	return err
}

func (p *ternPolicy) write(name string, data []byte) (string, error) {
	f := filepath.Join(p.dir, name)
	return f, os.WriteFile(f, data, 0o600)
}

// ApplyPolicyRules puts SweepPolicies(n) in force and removes any other
// sweep policy. The first call also applies the Pod objects (SweepPods)
// the rules refer to, untimed.
func (p *ternPolicy) ApplyPolicyRules(ctx context.Context, n int) (PolicyApplied, error) {
	res := PolicyApplied{Entries: -1, ChainRules: -1}
	if !p.podsApplied {
		pods := SweepPods()
		if p.remoteClient {
			// The client pod is no endpoint of the server's node: the
			// node knows it by the IP its Pod object carries.
			ip := p.t.Client.IP.String()
			pods[0].Spec.NodeName = sweepClientNode
			pods[0].Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}}
		}
		data, err := manifestJSON(pods)
		if err != nil {
			return res, err
		}
		f, err := p.write("pods.json", data)
		if err != nil {
			return res, err
		}
		if err := p.run(ctx, "apply", f); err != nil {
			return res, fmt.Errorf("apply the sweep's pods: %w", err)
		}
		p.podsApplied = true
	}
	if p.applied != "" {
		if _, err := p.RemovePolicyRules(ctx); err != nil {
			return res, err
		}
	}
	data, err := manifestJSON(SweepPolicies(n))
	if err != nil {
		return res, err
	}
	f, err := p.write(fmt.Sprintf("rules-%d.json", n), data)
	if err != nil {
		return res, err
	}
	start := time.Now()
	err = p.run(ctx, "apply", f)
	res.Took = time.Since(start)
	if err != nil {
		var un *unavailableError
		if !errors.As(err, &un) {
			// It may have been applied in part: remove what is there.
			p.applied = f
		}
		return res, err
	}
	p.applied = f
	if res.Entries, err = p.appliedEntries(); err != nil {
		return res, err
	}
	if p.datapath == PathIptables {
		if res.ChainRules, err = p.ingressChainRules(ctx); err != nil {
			return res, err
		}
	}
	return res, nil
}

// RemovePolicyRules deletes the sweep's policies (ternctl delete): the
// server pod is no longer isolated. The Pod objects stay.
func (p *ternPolicy) RemovePolicyRules(ctx context.Context) (time.Duration, error) {
	if p.applied == "" {
		return 0, nil
	}
	start := time.Now()
	err := p.run(ctx, "delete", p.applied)
	took := time.Since(start)
	if err != nil {
		return took, fmt.Errorf("remove the sweep's policies: %w", err)
	}
	p.applied = ""
	return took, nil
}

// appliedEntries reads the number of policy entries of the rule set the
// store recorded as applied to the network (policy/store:
// <stateDir>/policy/applied-<network>.json, compile.RuleSet's JSON).
func (p *ternPolicy) appliedEntries() (int, error) {
	f := filepath.Join(p.stateDir, "policy", "applied-"+p.network+".json")
	b, err := os.ReadFile(f)
	if err != nil {
		return -1, fmt.Errorf("the policy store recorded no applied rule set: %w", err)
	}
	var rs struct {
		Policy []json.RawMessage `json:"policy"`
	}
	if err := json.Unmarshal(b, &rs); err != nil {
		return -1, fmt.Errorf("decode %s: %w", f, err)
	}
	return len(rs.Policy), nil
}

// ingressChainRules counts the rules of the chain Tern's policy dispatch
// chain (TERN-POL-*) sends new flows to the server pod to.
func (p *ternPolicy) ingressChainRules(ctx context.Context) (int, error) {
	out, err := p.node.Run(ctx, "iptables-save", "-t", "filter")
	if err != nil {
		return -1, err
	}
	_, rules := parseIptablesSave(string(out))
	return countIngressChainRules(rules, p.t.Server.IP.String())
}

func countIngressChainRules(rules []iptRule, serverIP string) (int, error) {
	chain := ""
	for _, r := range rules {
		if !strings.HasPrefix(r.Chain, "TERN-POL-") {
			continue
		}
		f := strings.Fields(r.Spec)
		if len(f) == 4 && f[0] == "-d" && f[1] == serverIP+"/32" && f[2] == "-j" {
			chain = f[3]
		}
	}
	if chain == "" {
		return -1, fmt.Errorf("no TERN-POL-* rule sends traffic to %s to an ingress chain: the server pod is not isolated", serverIP)
	}
	n := 0
	for _, r := range rules {
		if r.Chain == chain {
			n++
		}
	}
	return n, nil
}

// PolicyApplier returns the path's NetworkPolicy support, or nil (the
// limit and the reference plugins have none).
func (t *Topology) PolicyApplier() PolicyApplier {
	if t.policy == nil {
		return nil
	}
	return t.policy
}
