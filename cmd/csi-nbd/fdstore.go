package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/fdstore"
)

const fdstoreUsage = `Usage: csi-nbd fdstore --socket PATH

Keeps open file descriptors for other csi-nbd processes, by name, over a
unix socket: the node plugin (and 'csi-nbd attach --fd-store PATH') puts
the /dev/fuse descriptor of each FUSE+loop volume here, so that when it is
restarted the kernel's FUSE connection stays up and the new process serves
it in place. Run it as a process (or container) that outlives the server's
restarts. SIGTERM closes every descriptor it holds: FUSE+loop volumes whose
server is not running at that moment then fail.

Options:
`

func runFDStore(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("fdstore", stderr, "%s", fdstoreUsage)
	socket := fs.String("socket", "", "unix socket to listen on (created with mode 0600)")
	addLogFlags(fs)
	if help, err := parseFlags(fs, args, stdout); help || err != nil {
		return err
	}
	if *socket == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "csi-nbd fdstore: --socket is required, and no arguments")
		fs.Usage()
		return errUsage{errors.New("--socket is required")}
	}
	l, err := fdstore.Listen(*socket)
	if err != nil {
		return err
	}
	s := fdstore.NewServer()
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	klog.InfoS("fd store listening", "socket", *socket, "pid", os.Getpid())
	<-ctx.Done()
	l.Close()
	<-done
	if n := s.Len(); n > 0 {
		klog.InfoS("fd store stopping: closing the descriptors it holds", "count", n)
	}
	os.Remove(*socket)
	return s.Close()
}
