// Command ternbench is Tern's benchmark harness: it measures the eBPF and
// iptables datapaths against the reference bridge plugin and the bare
// veth limit on this machine and writes results.json, report.md and
// chart.svg. It needs root. See bench/README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/ternlabs/tern/bench"
)

func main() {
	cfg := bench.Config{}
	fs := flag.NewFlagSet("ternbench", flag.ExitOnError)
	cfg.RegisterFlags(fs)
	list := fs.Bool("list", false, "list the paths and workloads and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: ternbench [flags]   (as root; see bench/README.md)\n")
		fs.PrintDefaults()
	}
	_ = fs.Parse(os.Args[1:])
	if *list {
		bench.PrintCatalog(os.Stdout)
		return
	}
	if _, _, err := bench.Run(context.Background(), cfg); err != nil {
		fmt.Fprintf(os.Stderr, "ternbench: %v\n", err)
		os.Exit(1)
	}
}
