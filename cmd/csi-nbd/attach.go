package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/attach"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/all"
)

// defaultAttachStateDir holds attach records: under /run, since the
// devices they describe do not outlive a reboot either.
const defaultAttachStateDir = "/run/csi-nbd/attach"

const attachUsage = `Usage: csi-nbd attach [OPTIONS] SPEC
       csi-nbd attach --resume [--state-dir DIR] [--fd-store PATH]

Attaches the volume SPEC as a local block device served by this process:
/dev/nbdN through the kernel's nbd driver, or /dev/loopN over a FUSE file
where the kernel has no nbd (--fallback). Prints the device path as the
first line on stdout, then serves in the foreground until the device is
detached (csi-nbd detach DEVICE) or SIGTERM, which flushes and detaches.
SIGUSR1 stops serving WITHOUT detaching: the kernel holds I/O for
--dead-conn-timeout while 'csi-nbd attach --resume' takes over. A FUSE+loop
device survives that (and a crash) only with --fd-store: a 'csi-nbd
fdstore' process keeps its /dev/fuse connection, and I/O waits until
--resume serves it again.

--resume re-serves every volume recorded in --state-dir (after a crash or
SIGUSR1), printing each device path as it is re-served.

Options:
`

type attachOptions struct {
	opts       attach.Options
	stateDir   string
	secretsDir string
	id         string
	resume     bool
	mlock      bool
	fdStore    string
}

func runAttach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o attachOptions
	fs := newFlagSet("attach", stderr, "%s", attachUsage)
	fs.IntVar(&o.opts.Connections, "connections", 1, "sockets (kernel queues) per nbd device; >1 needs a multi-conn backend")
	fs.DurationVar(&o.opts.Timeout, "timeout", attach.DefaultTimeout, "kernel per-request timeout; an expired request is requeued on a fresh connection")
	fs.DurationVar(&o.opts.DeadConnTimeout, "dead-conn-timeout", attach.DefaultDeadConnTimeout, "how long the kernel holds I/O while no server is connected (the window for --resume)")
	fs.StringVar(&o.opts.Fallback, "fallback", attach.FallbackAuto, "auto (nbd if the kernel has it, else FUSE+loop), never (nbd only) or always (FUSE+loop)")
	fs.BoolVar(&o.opts.ReadOnly, "readonly", false, "attach read-only")
	fs.StringVar(&o.stateDir, "state-dir", defaultAttachStateDir, "directory recording attached volumes (for --resume and detach)")
	fs.StringVar(&o.secretsDir, "secrets-dir", "", "directory of backend credentials, one file per key")
	fs.StringVar(&o.id, "id", "", "volume ID (the kernel's backend identifier); default derived from SPEC")
	fs.BoolVar(&o.resume, "resume", false, "re-serve every volume recorded in --state-dir")
	fs.StringVar(&o.fdStore, "fd-store", "", "socket of a 'csi-nbd fdstore' keeping FUSE+loop connections: they then survive a crash or SIGUSR1 of this process until --resume")
	fs.BoolVar(&o.mlock, "mlock", false, "lock the process's memory (mlockall) so serving never waits on swap")
	addLogFlags(fs)
	if help, err := parseFlags(fs, args, stdout); help || err != nil {
		return err
	}
	if (o.resume && fs.NArg() != 0) || (!o.resume && fs.NArg() != 1) {
		fmt.Fprintln(stderr, "csi-nbd attach: want exactly one SPEC, or --resume and none")
		fs.Usage()
		return errUsage{errors.New("want exactly one SPEC, or --resume and none")}
	}
	var spec backends.Spec
	if !o.resume {
		var err error
		if spec, err = backends.Parse(fs.Arg(0)); err != nil {
			return err
		}
	}

	// Before any serving thread exists: every thread, and those cloned
	// from them later, may then allocate without waiting on our own I/O.
	if err := attach.SetIOFlusher(); err != nil {
		klog.InfoS("Serving threads not marked as I/O flushers: memory pressure could deadlock", "err", err)
	}
	if o.mlock {
		if err := attach.LockMemory(); err != nil {
			return err
		}
	}
	env := backends.Env{Owner: attachOwner()}
	if o.secretsDir != "" {
		var err error
		if env.Secrets, err = backends.ReadSecretsDir(o.secretsDir); err != nil {
			return fmt.Errorf("--secrets-dir: %w", err)
		}
	}
	m, err := attach.NewManager(o.stateDir, env)
	if err != nil {
		return err
	}
	m.FDStore = o.fdStore
	// Attaching is not interrupted by SIGTERM half-way: the signal is
	// acted on once serving.
	opCtx := context.WithoutCancel(ctx)
	var ids []string
	if o.resume {
		start := time.Now()
		vols, err := m.Resume(opCtx)
		for _, v := range vols {
			fmt.Fprintln(stdout, v.Path)
			ids = append(ids, v.ID)
		}
		if len(vols) > 0 {
			klog.InfoS("Re-served", "volumes", len(vols), "elapsed", time.Since(start))
			fmt.Fprintf(stderr, "re-served %d volume(s) in %v\n", len(vols), time.Since(start).Round(time.Millisecond))
		}
		if err != nil {
			fmt.Fprintf(stderr, "csi-nbd attach: %v\n", err)
		}
		if len(vols) == 0 {
			if err == nil {
				err = fmt.Errorf("no volumes recorded in %s", o.stateDir)
			}
			return err
		}
	} else {
		id := o.id
		if id == "" {
			id = backends.VolumeKey(spec)
		}
		path, err := m.Attach(opCtx, id, spec.String(), env.Secrets, o.opts)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, path)
		ids = []string{id}
	}
	return serveAttached(ctx, m, ids)
}

// serveAttached serves until every volume is detached from outside, a
// SIGTERM/SIGINT (detach all) or a SIGUSR1 (stop without detaching).
func serveAttached(ctx context.Context, m *attach.Manager, ids []string) error {
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
	allGone := make(chan struct{})
	go func() {
		for _, id := range ids {
			<-m.Done(id)
		}
		close(allGone)
	}()
	select {
	case <-allGone:
		klog.InfoS("Every volume was detached")
		return m.Close()
	case <-usr1:
		klog.InfoS("SIGUSR1: stopping without detaching; run 'csi-nbd attach --resume' to take over")
		return m.Close()
	case <-ctx.Done():
	}
	klog.InfoS("Detaching")
	dctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	for _, v := range m.List() {
		if err := m.Detach(dctx, v.ID); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(append(errs, m.Close())...)
}

func attachOwner() string {
	h, err := os.Hostname()
	if err != nil {
		h = "unknown-host"
	}
	return fmt.Sprintf("csi-nbd-attach@%s/%d", h, os.Getpid())
}

const detachUsage = `Usage: csi-nbd detach [--state-dir DIR] DEVICE

Detaches DEVICE (/dev/nbdN or /dev/loopN) attached by 'csi-nbd attach':
asks the serving process recorded in --state-dir to flush and detach, and
waits for it. An nbd device with no live serving process is disconnected
through the kernel directly.

Options:
`

func runDetach(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("detach", stderr, "%s", detachUsage)
	stateDir := fs.String("state-dir", defaultAttachStateDir, "directory recording attached volumes")
	fdStore := fs.String("fd-store", "", "the fd store the volume was attached with, if any (to release what it keeps)")
	wait := fs.Duration("timeout", 2*time.Minute, "how long to wait for the serving process to detach")
	if help, err := parseFlags(fs, args, stdout); help || err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(stderr, "csi-nbd detach: want one DEVICE")
		fs.Usage()
		return errUsage{errors.New("want one DEVICE")}
	}
	dev := fs.Arg(0)
	dctx, cancel := context.WithTimeout(ctx, *wait)
	defer cancel()
	id, pid, err := attach.FindByPath(*stateDir, dev)
	if err == nil && pid > 0 && pid != os.Getpid() && syscall.Kill(pid, 0) == nil {
		// The server detaches: it flushes what it holds and closes the
		// volume properly.
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			return fmt.Errorf("signal serving process %d: %w", pid, err)
		}
		for {
			if _, _, err := attach.FindByPath(*stateDir, dev); errors.Is(err, os.ErrNotExist) {
				return nil
			}
			if syscall.Kill(pid, 0) != nil {
				break // it died without forgetting: finish below
			}
			select {
			case <-dctx.Done():
				return fmt.Errorf("serving process %d did not detach %s: %w", pid, dev, dctx.Err())
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	if id != "" {
		m, err := attach.NewManager(*stateDir, backends.Env{})
		if err != nil {
			return err
		}
		m.FDStore = *fdStore
		defer m.Close()
		return m.Detach(dctx, id)
	}
	idx, ok := attach.ParseNBDPath(dev)
	if !ok {
		return fmt.Errorf("%s is not recorded in %s and is not an nbd device", dev, *stateDir)
	}
	return attach.Disconnect(dctx, idx)
}
