package main

import (
	"flag"
	"fmt"
	"io"

	"k8s.io/klog/v2"
)

// newFlagSet returns a subcommand's flag set: errors and usage go to
// stderr, and the usage is header (a format string, with args) followed
// by the flags' defaults.
func newFlagSet(name string, stderr io.Writer, header string, args ...any) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), header, args...)
		fs.PrintDefaults()
	}
	return fs
}

// addLogFlags adds klog's verbosity flags (-v, -vmodule) to fs.
func addLogFlags(fs *flag.FlagSet) {
	klogFlags := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(klogFlags)
	klogFlags.VisitAll(func(f *flag.Flag) {
		if f.Name == "v" || f.Name == "vmodule" {
			fs.Var(f.Value, f.Name, f.Usage)
		}
	})
}

// parseFlags parses args. A help flag anywhere prints the usage on stdout
// and reports help; a bad flag is an errUsage (already explained).
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) (help bool, err error) {
	for _, a := range args {
		if a == "-h" || a == "--help" || a == "-help" {
			fs.SetOutput(stdout)
			fs.Usage()
			return true, nil
		}
	}
	if err := fs.Parse(args); err != nil {
		return false, errUsage{err}
	}
	return false, nil
}
