package routing

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// vxlanFilterChain holds, on a node whose datapath has no table of its own
// (the iptables datapath), the filter that makes the VXLAN port accept
// only the other nodes: INPUT sends UDP to the VXLAN port here, the chain
// returns for each node's InternalIP and drops the rest. (The eBPF
// datapath checks more in tern_from_tunnel: that the outer source owns the
// inner source's pod CIDR.)
const vxlanFilterChain = "TERN-VXLAN-IN"

func iptables(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "iptables", append([]string{"-w", "5"}, args...)...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// jumpArgs is INPUT's rule to the chain, after the chain name (and, for
// -I, the position).
func (r *Reconciler) jumpArgs() []string {
	return []string{"-p", "udp", "--dport", strconv.Itoa(r.cfg.Port), "-j", vxlanFilterChain}
}

// syncVXLANFilter replaces the chain's rules with one RETURN per node IP
// and a final DROP in a single iptables-restore transaction (never an
// empty or open chain in between), then makes sure INPUT jumps to it.
func (r *Reconciler) syncVXLANFilter(nodeIPs []net.IP) error {
	var b strings.Builder
	b.WriteString("*filter\n:" + vxlanFilterChain + " - [0:0]\n")
	for _, ip := range nodeIPs {
		fmt.Fprintf(&b, "-A %s -s %s/32 -j RETURN\n", vxlanFilterChain, ip)
	}
	fmt.Fprintf(&b, "-A %s -j DROP\nCOMMIT\n", vxlanFilterChain)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "iptables-restore", "-w", "5", "--noflush")
	cmd.Stdin = strings.NewReader(b.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("iptables-restore %s: %w: %s", vxlanFilterChain, err, strings.TrimSpace(string(out)))
	}
	if _, err := iptables(append([]string{"-C", "INPUT"}, r.jumpArgs()...)...); err == nil {
		return nil
	}
	_, err := iptables(append([]string{"-I", "INPUT", "1"}, r.jumpArgs()...)...)
	return err
}

// removeVXLANFilter removes the jump and the chain; missing is fine.
func (r *Reconciler) removeVXLANFilter() error {
	for {
		if _, err := iptables(append([]string{"-D", "INPUT"}, r.jumpArgs()...)...); err != nil {
			break // no (more) jump
		}
	}
	if _, err := iptables("-L", vxlanFilterChain, "-n"); err != nil {
		return nil // no chain
	}
	if _, err := iptables("-F", vxlanFilterChain); err != nil {
		return err
	}
	_, err := iptables("-X", vxlanFilterChain)
	return err
}
