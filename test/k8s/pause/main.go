// Command pause is the sandbox process of the real-node harness's pods: it
// holds the pod's namespaces, reaps orphans (it is PID 1 when the pod shares
// its PID namespace) and exits on SIGINT or SIGTERM, as registry.k8s.io/pause
// does. Built static (CGO_ENABLED=0) so the image needs no libraries.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 4)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sig {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
