// Command ternctl shows what a node's Tern datapath does.
package main

import (
	"fmt"
	"os"

	"github.com/ternlabs/tern/ctl"
)

func main() {
	if err := ctl.Run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "ternctl:", err)
		os.Exit(1)
	}
}
