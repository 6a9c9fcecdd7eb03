// Command pause is the pod sandbox image of test/e2e's cluster: containerd
// needs one, and none can be pulled here. Like Kubernetes' own pause, it
// holds the pod's namespaces and exits on SIGTERM or SIGINT.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
