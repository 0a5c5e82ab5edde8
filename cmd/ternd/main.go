// Command ternd is Tern's node agent (package agent).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/ternlabs/tern/agent"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(agent.Main(ctx, os.Args[1:], os.Stderr))
}
