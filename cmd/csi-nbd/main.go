// Command csi-nbd is the one binary of csi-nbd: an NBD server for volume
// specs (serve), and later the CSI controller and node plugin.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"sort"
	"syscall"

	"k8s.io/klog/v2"
)

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = ""

// command is one subcommand.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

var commands = map[string]command{
	"serve":   {"serve volumes to any NBD client over TCP or unix sockets", runServe},
	"attach":  {"attach a volume as a local block device (/dev/nbdN) and serve it", runAttach},
	"detach":  {"detach a device attached by csi-nbd attach", runDetach},
	"fdstore": {"keep /dev/fuse descriptors so FUSE+loop volumes survive a restart of their server", runFDStore},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	klog.Flush()
	os.Exit(code)
}

// errUsage marks errors already explained by a usage message.
type errUsage struct{ error }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	switch args[0] {
	case "--version", "-version", "version":
		fmt.Fprintf(stdout, "csi-nbd %s\n", Version())
		return 0
	case "--help", "-help", "-h", "help":
		usage(stdout)
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "csi-nbd: unknown command %q\n\n", args[0])
		usage(stderr)
		return 2
	}
	if err := cmd.run(ctx, args[1:], stdout, stderr); err != nil {
		if _, ok := err.(errUsage); ok {
			return 2
		}
		fmt.Fprintf(stderr, "csi-nbd %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "csi-nbd %s: block volumes over NBD\n\nUsage: csi-nbd COMMAND [OPTIONS]\n\nCommands:\n", Version())
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(w, "\nRun 'csi-nbd COMMAND --help' for a command's options; 'csi-nbd --version' for the version.\n")
}

// Version is the stamped version, else what the Go toolchain recorded.
func Version() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	rev, dirty := "", ""
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if rev != "" {
		if len(rev) > 12 {
			rev = rev[:12]
		}
		return "devel-" + rev + dirty
	}
	return "devel"
}
