package ctl

import (
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"

	"github.com/ternlabs/tern/cni"
	"github.com/ternlabs/tern/policy/store"
	"github.com/ternlabs/tern/services"
)

// getServices prints the Service table last applied to the network's load
// balancer (services "ebpf"): one line per frontend.
func getServices(conf *cni.NetConf, output string, w io.Writer) error {
	tab, err := store.New(conf.StateDir).AppliedServices(conf.Name)
	if err != nil {
		return err
	}
	if tab == nil {
		tab = &services.Table{Entries: []services.Entry{}}
	}
	if output == "json" {
		return writeJSON(w, tab)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FRONTEND\tSCOPE\tSERVICE\tPORT NAME\tAFFINITY\tBACKENDS")
	for _, e := range tab.Entries {
		backends := make([]string, 0, len(e.Backends))
		for _, b := range e.Backends {
			s := netip.AddrPortFrom(b.IP, b.Port).String()
			if b.Terminating {
				s += "(terminating)"
			}
			backends = append(backends, s)
		}
		bs := strings.Join(backends, ",")
		if bs == "" {
			bs = "<" + e.NoBackends + ">"
		}
		aff := "-"
		if e.AffinityTimeout != 0 {
			aff = fmt.Sprintf("ClientIP %ds", e.AffinityTimeout)
		}
		pn := e.PortName
		if pn == "" {
			pn = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", e.Frontend, e.Scope, e.Service, pn, aff, bs)
	}
	for _, c := range tab.Conflicts {
		fmt.Fprintf(tw, "# conflict: %s\n", c)
	}
	return tw.Flush()
}
