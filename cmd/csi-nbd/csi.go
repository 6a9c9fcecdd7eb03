package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/csi-nbd/csi-nbd/pkg/attach"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/all"
	"github.com/csi-nbd/csi-nbd/pkg/driver"
	"github.com/csi-nbd/csi-nbd/pkg/kube"
	"github.com/csi-nbd/csi-nbd/pkg/metrics"
)

func init() {
	for _, m := range []driver.Mode{driver.ModeController, driver.ModeNode, driver.ModeAll} {
		mode := m
		summary := map[driver.Mode]string{
			driver.ModeController: "serve the CSI controller service (volume creation, attach bookkeeping, expansion, snapshots)",
			driver.ModeNode:       "serve the CSI node service: attach volumes as block devices, format, mount",
			driver.ModeAll:        "serve identity, controller and node on one socket (csi-sanity, local trials)",
		}[mode]
		commands[string(mode)] = command{summary, func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
			return runCSI(ctx, mode, args, stdout, stderr)
		}}
	}
}

type csiOptions struct {
	endpoint        string
	nodeID          string
	stateDir        string
	driverName      string
	maxVolumes      int64
	registrationDir string
	kubeletEndpoint string
	rateAlways      bool
	backends        string
	metricsAddr     string
	kubeconfig      string
	attach          attachFlags
}

const csiUsage = `Usage: csi-nbd %s [OPTIONS]

Serves CSI v1 on a unix socket. Volume IDs are volume specs (see csi-nbd
serve --help); StorageClass parameters are documented in the README.

Options:
`

func runCSI(ctx context.Context, mode driver.Mode, args []string, stdout, stderr io.Writer) error {
	var o csiOptions
	host, _ := os.Hostname()
	fs := newFlagSet(string(mode), stderr, csiUsage, mode)
	fs.StringVar(&o.endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint: unix:///path/to/csi.sock")
	fs.StringVar(&o.driverName, "driver-name", driver.DefaultName, "CSI driver name")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/csi-nbd", "directory for state that must survive restarts (volume records, attached volumes)")
	fs.StringVar(&o.backends, "backends", "memory,s3,http,nbd,file", "comma-separated backends StorageClasses may use")
	fs.StringVar(&o.metricsAddr, "metrics-address", "", "serve /metrics, /healthz and /readyz on this address (e.g. :9809); empty: don't")
	fs.BoolVar(&o.rateAlways, "rate-always", true, "put the rate filter in every new volume so limits can be changed live later")
	if mode != driver.ModeController {
		fs.StringVar(&o.nodeID, "node-id", host, "this node's name (Kubernetes node name)")
		fs.Int64Var(&o.maxVolumes, "max-volumes", 0, "volumes this node accepts (0: no limit)")
		fs.StringVar(&o.registrationDir, "kubelet-registration-dir", "", "serve the kubelet plugin registration socket in this directory (e.g. /var/lib/kubelet/plugins_registry); empty: don't")
		fs.StringVar(&o.kubeletEndpoint, "kubelet-endpoint", "", "the CSI socket path as the kubelet sees it (default: the --endpoint path)")
		fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig for following PVs (live rate limits); default: in-cluster config when running in a pod, else none")
		o.attach.register(fs)
	}
	addLogFlags(fs)
	if help, err := parseFlags(fs, args, stdout); help || err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return errUsage{fmt.Errorf("unexpected arguments %q", fs.Args())}
	}

	cfg := driver.Config{
		Name: o.driverName, Version: Version(), Mode: mode, NodeID: o.nodeID,
		Endpoint: o.endpoint, StateDir: o.stateDir, MaxVolumesPerNode: o.maxVolumes,
		RateAlways: o.rateAlways,
		Backends:   strings.Split(o.backends, ","),
		Admins:     volumeAdmins(),
	}
	var closeNode func() error
	var att *nodeAttacher
	if mode != driver.ModeController {
		var err error
		if att, err = newNodeAttacher(o.stateDir, o.nodeID, o.attach); err != nil {
			return err
		}
		closeNode = att.Close
		cfg.Attacher = att
		cfg.Resume = att.Resume
		cfg.Mounter = &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}
		if err := startLimitsWatcher(ctx, o, att); err != nil {
			return err
		}
	}
	d, err := driver.New(cfg)
	if err != nil {
		return err
	}
	var reg *driver.Registration
	if o.registrationDir != "" {
		ep := o.kubeletEndpoint
		if ep == "" {
			u, _ := url.Parse(o.endpoint)
			ep = u.Path
		}
		reg = &driver.Registration{Name: o.driverName, Endpoint: ep}
	}
	if o.metricsAddr != "" {
		checks := []metrics.Check{{Name: "csi", Check: d.Ready}}
		if reg != nil {
			checks = append(checks, metrics.Check{Name: "kubelet-registration", Check: reg.Registered})
		}
		if att != nil {
			checks = append(checks,
				metrics.Check{Name: "links", Check: att.Healthy},
				metrics.Check{Name: "volumes", Check: metrics.Default.Stalled(30 * time.Second)})
		}
		if err := serveMetrics(ctx, o.metricsAddr, metrics.Handler(metrics.HandlerOptions{Ready: checks, Timeout: 5 * time.Second})); err != nil {
			return err
		}
	}
	ln, err := driver.Listen(o.endpoint)
	if err != nil {
		return err
	}
	if reg != nil {
		go func() {
			if err := driver.ServeRegistration(ctx, o.registrationDir, reg); err != nil && ctx.Err() == nil {
				klog.ErrorS(err, "Kubelet plugin registration stopped")
			}
		}()
	}
	err = d.Run(ctx, ln)
	if closeNode != nil {
		// Stop serving without detaching: volumes stay attached and a
		// restarted node plugin re-serves them (attach --resume's path).
		if cerr := closeNode(); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}
	return err
}

// attachFlags are the node's kernel attach settings.
type attachFlags struct {
	connections     int
	timeout         time.Duration
	deadConnTimeout time.Duration
	fallback        string
	fdStore         string
}

func (a *attachFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&a.connections, "connections", 2, "NBD connections per volume (one socketpair and kernel queue each)")
	fs.DurationVar(&a.timeout, "timeout", 30*time.Second, "kernel request timeout: requests in flight are requeued after it")
	fs.DurationVar(&a.deadConnTimeout, "dead-conn-timeout", 10*time.Minute, "how long the kernel holds I/O for a restarted server to reconnect")
	fs.StringVar(&a.fallback, "fallback", attach.FallbackAuto, "FUSE+loop fallback when the kernel has no nbd: auto, never or always")
	fs.StringVar(&a.fdStore, "fd-store", "", "socket of a 'csi-nbd fdstore' that outlives this process: FUSE+loop volumes then survive its restart")
}

func (a attachFlags) check() error {
	switch a.fallback {
	case attach.FallbackAuto, attach.FallbackNever, attach.FallbackAlways:
	default:
		return fmt.Errorf("--fallback=%q: want auto, never or always", a.fallback)
	}
	if a.connections < 1 || a.connections > attach.MaxConnections {
		return fmt.Errorf("--connections=%d: want 1 to %d", a.connections, attach.MaxConnections)
	}
	return nil
}

// startLimitsWatcher follows the PVs of staged volumes for live rate
// limits (VolumeAttributesClass, PVC annotations) when there is a cluster
// to follow: in a pod, or with --kubeconfig.
func startLimitsWatcher(ctx context.Context, o csiOptions, att *nodeAttacher) error {
	if o.kubeconfig == "" && os.Getenv("KUBERNETES_SERVICE_HOST") == "" {
		klog.InfoS("Not in a Kubernetes cluster and no --kubeconfig: rate limits come from volume specs only")
		return nil
	}
	cs, err := kube.NewClient(o.kubeconfig, "csi-nbd/"+Version())
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	w := kube.New(cs, o.nodeID, o.driverName, att)
	att.tracker = w
	go func() {
		if err := w.Run(ctx); err != nil && ctx.Err() == nil {
			klog.ErrorS(err, "Following PVs for live rate limits stopped")
		}
	}()
	return nil
}

// serveMetrics serves h on addr until ctx ends.
func serveMetrics(ctx context.Context, addr string, h http.Handler) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--metrics-address: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			klog.ErrorS(err, "Metrics server stopped")
		}
	}()
	klog.InfoS("Serving metrics and health", "address", ln.Addr().String())
	return nil
}
