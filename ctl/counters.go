package ctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ternlabs/tern/cni"
	ebpfdp "github.com/ternlabs/tern/datapath/ebpf"
	iptdp "github.com/ternlabs/tern/datapath/iptables"
)

// counter is one row of `get counters`: a named count of packets and their
// bytes, summed over CPUs (eBPF) or read from an iptables rule.
type counter struct {
	Name        string `json:"name"`
	Packets     uint64 `json:"packets"`
	Bytes       uint64 `json:"bytes"`
	Description string `json:"description"`
	// Rates, in --watch output only: per second over the last interval.
	PacketsPerSecond *float64 `json:"packetsPerSecond,omitempty"`
	BytesPerSecond   *float64 `json:"bytesPerSecond,omitempty"`
}

// readCounters reads the network's datapath counters: the eBPF metrics map
// summed over CPUs, or the packet and byte counters of the network's
// iptables rules.
func readCounters(conf *cni.NetConf) ([]counter, error) {
	if conf.IsEBPF() {
		return readEBPFCounters(conf)
	}
	return readIptablesCounters(conf.Name)
}

func readEBPFCounters(conf *cni.NetConf) ([]counter, error) {
	m, err := ebpf.LoadPinnedMap(conf.BPFFSDir+"/maps/tern_metrics", &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open metrics map (no pod was added on this node yet?): %w", err)
	}
	defer m.Close()
	vals, err := ebpfdp.ReadMetrics(m)
	if err != nil {
		return nil, err
	}
	rows := make([]counter, 0, len(vals))
	for name, v := range vals {
		desc, _ := ebpfdp.MetricDescription(name)
		rows = append(rows, counter{Name: name, Packets: v.Packets, Bytes: v.Bytes, Description: desc})
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].Name < rows[j].Name })
	return rows, nil
}

// readIptablesCounters reads the counters of the network's rules from
// `iptables-save -c` (run in the caller's network namespace).
func readIptablesCounters(network string) ([]counter, error) {
	var dump strings.Builder
	for _, table := range []string{"filter", "nat"} {
		out, err := exec.Command("iptables-save", "-c", "-t", table).Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				err = fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
			}
			return nil, fmt.Errorf("iptables-save -c -t %s: %w", table, err)
		}
		dump.Write(out)
	}
	return iptablesCounters(network, dump.String())
}

// iptablesRule matches a rule line of `iptables-save -c`:
// "[packets:bytes] -A CHAIN args...".
var iptablesRule = regexp.MustCompile(`^\[(\d+):(\d+)\] -A (\S+) (.*)$`)

// iptablesCounters turns the rules of a network (datapath/iptables) in
// an `iptables-save -c` dump into named counters. Every counter exists even
// when its rule does not (no pod yet, no policy): it is then zero.
func iptablesCounters(network, dump string) ([]counter, error) {
	fwd, nat := iptdp.ChainNames(network)
	dispatch := iptdp.DispatchChain(network)
	policyPrefix := "TERN-" + strings.TrimPrefix(fwd, "TERN-FWD-") + "-"
	rows := []counter{
		{Name: "forward", Description: "FORWARD -> " + fwd + ": every packet of the network's pods the host forwards"},
		{Name: "accept_established", Description: fwd + " rule 1: replies and later packets of accepted connections (conntrack)"},
		{Name: "accept_new_from_pods", Description: fwd + ": new connections from pods, accepted after policy"},
		{Name: "accept_new_to_pods", Description: fwd + ": new connections to pods from outside the bridge, accepted after policy"},
		{Name: "allow_policy_ingress", Description: policyPrefix + "*I* RETURN rules: new connections a pod's ingress rules allow"},
		{Name: "allow_policy_egress", Description: policyPrefix + "*E* RETURN rules: new connections a pod's egress rules allow"},
		{Name: "drop_policy_ingress", Description: "dropped: NetworkPolicy, the destination pod's ingress rules deny the flow (" + policyPrefix + "*I* DROP)"},
		{Name: "drop_policy_egress", Description: "dropped: NetworkPolicy, the source pod's egress rules deny the flow (" + policyPrefix + "*E* DROP)"},
		{Name: "masquerade", Description: nat + " MASQUERADE: connections leaving the cluster, masqueraded (nat sees each connection's first packet)"},
		{Name: "nat_exempt", Description: nat + " RETURN: connections to the cluster or non-masquerade CIDRs, not masqueraded (first packets)"},
	}
	add := func(name string, pk, by uint64) {
		for i := range rows {
			if rows[i].Name == name {
				rows[i].Packets += pk
				rows[i].Bytes += by
				return
			}
		}
	}
	sc := bufio.NewScanner(strings.NewReader(dump))
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		m := iptablesRule.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		pk, err1 := strconv.ParseUint(m[1], 10, 64)
		by, err2 := strconv.ParseUint(m[2], 10, 64)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("iptables-save: bad counters in %q", sc.Text())
		}
		chain, rule := m[3], " "+m[4]+" "
		switch {
		case chain == "FORWARD" && strings.HasSuffix(rule, " -j "+fwd+" "):
			add("forward", pk, by)
		case chain == fwd && strings.Contains(rule, " --ctstate "):
			add("accept_established", pk, by)
		case chain == fwd && strings.Contains(rule, " -i ") && strings.HasSuffix(rule, " -j ACCEPT "):
			add("accept_new_from_pods", pk, by)
		case chain == fwd && strings.Contains(rule, " -o ") && strings.HasSuffix(rule, " -j ACCEPT "):
			add("accept_new_to_pods", pk, by)
		case chain == nat && strings.HasSuffix(rule, " -j MASQUERADE "):
			add("masquerade", pk, by)
		case chain == nat && strings.HasSuffix(rule, " -j RETURN "):
			add("nat_exempt", pk, by)
		case chain != dispatch && strings.HasPrefix(chain, policyPrefix) && len(chain) > len(policyPrefix)+1:
			// TERN-<hash>-<generation><I|E><identity>
			dir := "ingress"
			if chain[len(policyPrefix)+1] == 'E' {
				dir = "egress"
			}
			switch {
			case strings.HasSuffix(rule, " -j DROP "):
				add("drop_policy_"+dir, pk, by)
			case strings.HasSuffix(rule, " -j RETURN "):
				add("allow_policy_"+dir, pk, by)
			}
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].Name < rows[j].Name })
	return rows, nil
}

// countersOptions are the flags of `get counters`.
type countersOptions struct {
	output   string
	all      bool
	watch    bool
	interval time.Duration
	count    int // --watch: stop after this many samples; 0 = until interrupted
	// legacyJSON prints -o json as `get metrics` did before counters
	// existed: every counter, {"name": {"packets": n, "bytes": n}}.
	legacyJSON bool
}

// Bounds of --interval: below 100 ms the rates are mostly noise and the
// reads cost CPU; above a minute nobody is watching.
const (
	minWatchInterval = 100 * time.Millisecond
	maxWatchInterval = time.Minute
)

func (o countersOptions) validate() error {
	if o.watch && (o.interval < minWatchInterval || o.interval > maxWatchInterval) {
		return fmt.Errorf("--interval %v: must be between %v and %v", o.interval, minWatchInterval, maxWatchInterval)
	}
	if o.count < 0 {
		return fmt.Errorf("--count %d: must not be negative", o.count)
	}
	return nil
}

// getCounters prints the counters once, or with --watch every interval
// with the rates over it, until ctx ends or count samples are printed.
func getCounters(ctx context.Context, conf *cni.NetConf, o countersOptions, w io.Writer) error {
	read := func() ([]counter, error) { return readCounters(conf) }
	if !o.watch {
		rows, err := read()
		if err != nil {
			return err
		}
		if o.legacyJSON && o.output == "json" {
			out := map[string]map[string]uint64{}
			for _, r := range rows {
				out[r.Name] = map[string]uint64{"packets": r.Packets, "bytes": r.Bytes}
			}
			return writeJSON(w, out)
		}
		return printCounters(w, visible(rows, o.all), o.output, conf)
	}
	return watchCounters(ctx, read, o, w)
}

// watchCounters prints, every interval, the counters with their rates over
// the interval (per second, from the monotonic clock).
func watchCounters(ctx context.Context, read func() ([]counter, error), o countersOptions, w io.Writer) error {
	prev, err := read()
	if err != nil {
		return err
	}
	prevAt := time.Now()
	tick := time.NewTicker(o.interval)
	defer tick.Stop()
	for n := 0; o.count == 0 || n < o.count; n++ {
		select {
		case <-ctx.Done():
			return nil // Ctrl-C ends a watch; it is not an error
		case <-tick.C:
		}
		cur, err := read()
		if err != nil {
			return err
		}
		now := time.Now()
		secs := now.Sub(prevAt).Seconds()
		rows := withRates(prev, cur, secs)
		prev, prevAt = cur, now
		if err := printWatchSample(w, visible(rows, o.all), o.output, now, secs); err != nil {
			return err
		}
	}
	return nil
}

// withRates returns cur with per-second rates against prev. A counter that
// went backwards (iptables policy chains are replaced on every policy
// update, starting again from zero) gets its current value as the delta.
func withRates(prev, cur []counter, secs float64) []counter {
	before := map[string]counter{}
	for _, c := range prev {
		before[c.Name] = c
	}
	out := make([]counter, len(cur))
	for i, c := range cur {
		p := before[c.Name]
		dp, db := c.Packets, c.Bytes
		if c.Packets >= p.Packets && c.Bytes >= p.Bytes {
			dp, db = c.Packets-p.Packets, c.Bytes-p.Bytes
		}
		pps, bps := float64(dp)/secs, float64(db)/secs
		c.PacketsPerSecond, c.BytesPerSecond = &pps, &bps
		out[i] = c
	}
	return out
}

// visible drops the rows that are zero, unless all.
func visible(rows []counter, all bool) []counter {
	if all {
		return rows
	}
	out := rows[:0:0]
	for _, r := range rows {
		if r.Packets != 0 || r.Bytes != 0 {
			out = append(out, r)
		}
	}
	return out
}

func printCounters(w io.Writer, rows []counter, output string, conf *cni.NetConf) error {
	if output == "json" {
		return writeJSON(w, rows)
	}
	if len(rows) == 0 {
		_, err := fmt.Fprintf(w, "all counters of network %s are zero (--all lists them)\n", conf.Name)
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "COUNTER\tPACKETS\tBYTES\tDESCRIPTION")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\n", r.Name, r.Packets, humanBytes(float64(r.Bytes)), r.Description)
	}
	return tw.Flush()
}

// watchSample is one --watch sample in JSON (one object per line).
type watchSample struct {
	Time     time.Time `json:"time"`
	Seconds  float64   `json:"seconds"`
	Counters []counter `json:"counters"`
}

func printWatchSample(w io.Writer, rows []counter, output string, at time.Time, secs float64) error {
	if output == "json" {
		return writeJSONLine(w, watchSample{Time: at.UTC(), Seconds: secs, Counters: rows})
	}
	fmt.Fprintf(w, "%s  rates over %.1fs\n", at.Format("15:04:05"), secs)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "COUNTER\tPACKETS/S\tBITS/S\tPACKETS\tBYTES")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%.1f\t%s\t%d\t%s\n", r.Name, *r.PacketsPerSecond, humanBits(*r.BytesPerSecond*8), r.Packets, humanBytes(float64(r.Bytes)))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintln(w)
	return err
}

// humanBytes prints a byte count with a binary unit: 1.5 KiB, 3.2 GiB.
func humanBytes(b float64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	i := 0
	for b >= 1024 && i < len(units)-1 {
		b /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f B", b)
	}
	return fmt.Sprintf("%.1f %s", b, units[i])
}

// humanBits prints a bit rate with a decimal unit, as network rates are
// given: 940.2 Mbit/s.
func humanBits(b float64) string {
	units := []string{"bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"}
	i := 0
	for b >= 1000 && i < len(units)-1 {
		b /= 1000
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f bit/s", b)
	}
	return fmt.Sprintf("%.1f %s", b, units[i])
}
