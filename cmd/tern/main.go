// Command tern is the Tern CNI plugin.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/version"

	ternbpf "github.com/ternlabs/tern/bpf"
	"github.com/ternlabs/tern/cni"
)

func main() {
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    cni.CmdAdd,
		Del:    cni.CmdDel,
		Check:  cni.CmdCheck,
		GC:     cni.CmdGC,
		Status: cni.CmdStatus,
	}, version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"),
		// Run without CNI_COMMAND it prints this: the BPF objects it would
		// load, by version (ternbench checks them against its own).
		"tern: eBPF CNI plugin, "+ternbpf.AboutObjects())
}
