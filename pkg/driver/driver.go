// Package driver implements the CSI identity, controller and node services
// of csi-nbd. It turns StorageClass parameters into volume specs and hands
// volumes to an Attacher (kernel nbd or the FUSE+loop fallback); it knows
// nothing of NBD's wire format, and talks to storage only through the
// interfaces below, so every service can be tested with real or fake parts.
package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// DefaultName is the CSI driver name, used by the CSIDriver object, the
// StorageClass provisioner and every key we own.
const DefaultName = "csi-nbd.io"

// Mode selects the services a process serves.
type Mode string

const (
	ModeController Mode = "controller"
	ModeNode       Mode = "node"
	ModeAll        Mode = "all" // one process, one node (csi-sanity, local trials)
)

// Attacher hands volumes to the kernel as block devices on this node. IDs
// are file-name safe keys (backends.VolumeKey of the spec).
type Attacher interface {
	// Attach is idempotent: the same id and spec give the same device.
	// volumeContext is CreateVolume's (PV and PVC names for metrics and
	// live limits).
	Attach(ctx context.Context, id, spec string, secrets, volumeContext map[string]string, readOnly bool) (devicePath string, err error)
	// Detach flushes, detaches and forgets id; unknown ids are not an error.
	Detach(ctx context.Context, id string) error
	// DevicePath returns the device of an attached volume.
	DevicePath(id string) (string, bool)
	// Resize grows an attached volume and its block device.
	Resize(ctx context.Context, id string, size uint64) error
	// Health returns nil while the volume's link to the kernel is alive.
	Health(id string) error
}

// VolumeAdmin does the controller-side work for backends that keep state
// of their own (an s3 volume's objects). Backends without one need none.
type VolumeAdmin interface {
	// Create makes the volume's backing state, optionally copying the
	// content of another volume or snapshot (src non-nil). Idempotent.
	Create(ctx context.Context, spec backends.Spec, src *backends.Spec, secrets map[string]string) error
	// Delete removes everything of the volume; idempotent.
	Delete(ctx context.Context, spec backends.Spec, secrets map[string]string) error
	// Exists tells whether the volume's state is there.
	Exists(ctx context.Context, spec backends.Spec, secrets map[string]string) (bool, error)
	// Expand grows the volume.
	Expand(ctx context.Context, spec backends.Spec, size uint64, secrets map[string]string) error
	// Snapshot copies the volume to snap (a spec of the same backend).
	Snapshot(ctx context.Context, spec, snap backends.Spec, secrets map[string]string) error
}

// Config is everything a Driver needs; the command line fills it in.
type Config struct {
	Name     string // CSI driver name; DefaultName if empty
	Version  string // vendor version, non-empty
	Mode     Mode
	NodeID   string
	Endpoint string // unix:///path/csi.sock
	// StateDir keeps the controller's record of volumes and the node's
	// publish bookkeeping; it must survive restarts.
	StateDir string
	// MaxVolumesPerNode is reported by NodeGetInfo (0: no limit).
	MaxVolumesPerNode int64

	// Node side.
	Attacher Attacher
	Mounter  *mount.SafeFormatAndMount
	// Resume re-serves volumes attached before a restart; it runs before
	// the node reports ready.
	Resume func(ctx context.Context) error

	// Controller side: the backends StorageClasses may use (values of
	// the backend parameter; empty: all), and admins by backend scheme.
	Backends []string
	Admins   map[string]VolumeAdmin
	// RateAlways puts the rate filter in every volume, so limits can be
	// changed live later (default on from the command line).
	RateAlways bool
}

// Driver serves CSI.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	cfg   Config
	ready atomic.Bool
	locks keyLocks
	vols  *volumeStore
	snaps *snapshotStore
}

// New checks cfg and returns a driver.
func New(cfg Config) (*Driver, error) {
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	if cfg.Version == "" {
		return nil, errors.New("driver: a vendor version is required")
	}
	switch cfg.Mode {
	case ModeController, ModeNode, ModeAll:
	default:
		return nil, fmt.Errorf("driver: unknown mode %q", cfg.Mode)
	}
	if cfg.serveNode() {
		if cfg.NodeID == "" {
			return nil, errors.New("driver: --node-id is required for the node service")
		}
		if cfg.Attacher == nil || cfg.Mounter == nil {
			return nil, errors.New("driver: the node service needs an attacher and a mounter")
		}
	}
	if cfg.StateDir == "" {
		return nil, errors.New("driver: a state directory is required")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("driver: state directory: %w", err)
	}
	for _, b := range cfg.Backends {
		if !slices.Contains(backendNames, b) {
			return nil, fmt.Errorf("driver: unknown backend %q (want some of %s)", b, strings.Join(backendNames, ", "))
		}
	}
	if len(cfg.Backends) == 0 {
		cfg.Backends = backendNames
	}
	admins := map[string]VolumeAdmin{}
	for scheme, a := range cfg.Admins {
		if slices.Contains(cfg.Backends, scheme) {
			admins[scheme] = a
		}
	}
	cfg.Admins = admins
	d := &Driver{cfg: cfg}
	var err error
	if cfg.serveController() {
		if d.vols, err = openVolumeStore(filepath.Join(cfg.StateDir, "volumes.json")); err != nil {
			return nil, err
		}
		if d.snaps, err = openSnapshotStore(filepath.Join(cfg.StateDir, "snapshots.json")); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func (c *Config) serveController() bool { return c.Mode == ModeController || c.Mode == ModeAll }
func (c *Config) serveNode() bool       { return c.Mode == ModeNode || c.Mode == ModeAll }

// Listen opens the endpoint's unix socket, removing a stale one.
func Listen(endpoint string) (net.Listener, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" || (u.Path == "" && u.Host == "") {
		return nil, fmt.Errorf("endpoint %q: want unix:///path/to/csi.sock", endpoint)
	}
	p := u.Path
	if u.Host != "" { // unix://relative/path
		p = u.Host + u.Path
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	if st, err := os.Lstat(p); err == nil && st.Mode()&os.ModeSocket != 0 {
		_ = os.Remove(p)
	}
	ln, err := net.Listen("unix", p)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	return ln, nil
}

// Ready is nil once the driver is ready (the node has re-served the
// volumes it had before a restart): the readiness probe.
func (d *Driver) Ready(context.Context) error {
	if !d.ready.Load() {
		return errors.New("not ready: re-serving volumes staged before the restart")
	}
	return nil
}

// Run serves CSI on ln until ctx ends. The node first re-serves volumes
// that were attached before a restart and only then reports ready.
func (d *Driver) Run(ctx context.Context, ln net.Listener) error {
	srv := grpc.NewServer(grpc.UnaryInterceptor(d.logCalls))
	csi.RegisterIdentityServer(srv, d)
	if d.cfg.serveController() {
		csi.RegisterControllerServer(srv, d)
	}
	if d.cfg.serveNode() {
		csi.RegisterNodeServer(srv, d)
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	klog.InfoS("Serving CSI", "driver", d.cfg.Name, "mode", d.cfg.Mode, "endpoint", ln.Addr().String(), "version", d.cfg.Version)

	if d.cfg.serveNode() && d.cfg.Resume != nil {
		// A volume that cannot come back has been detached (its I/O
		// fails, and NodeGetVolumeStats reports it abnormal): the node
		// itself is ready once every recorded volume was dealt with.
		if err := d.cfg.Resume(ctx); err != nil {
			klog.ErrorS(err, "Re-serving volumes staged before the restart")
		}
	}
	d.ready.Store(true)

	select {
	case <-ctx.Done():
		srv.GracefulStop()
		return nil
	case err := <-errc:
		return err
	}
}

// logCalls logs every call and its outcome; requests are not logged
// whole because they carry secrets.
func (d *Driver) logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := info.FullMethod[strings.LastIndexByte(info.FullMethod, '/')+1:]
	kv := []any{"method", method}
	if r, ok := req.(interface{ GetVolumeId() string }); ok && r.GetVolumeId() != "" {
		kv = append(kv, "volumeID", r.GetVolumeId())
	}
	if r, ok := req.(interface{ GetName() string }); ok && r.GetName() != "" {
		kv = append(kv, "name", r.GetName())
	}
	klog.V(4).InfoS("CSI call", kv...)
	resp, err := handler(ctx, req)
	if err != nil {
		klog.InfoS("CSI call failed", append(kv, "err", err)...)
	} else {
		klog.V(4).InfoS("CSI call done", kv...)
	}
	return resp, err
}

// keyLocks serialises calls for one volume: the CO may retry a call while
// the first is still running, and two stages of one volume must not race.
type keyLocks struct {
	mu   sync.Mutex
	held map[string]bool
}

// tryLock returns false if key is busy (the caller answers Aborted, as
// the CSI spec asks for an operation already in progress).
func (l *keyLocks) tryLock(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held == nil {
		l.held = map[string]bool{}
	}
	if l.held[key] {
		return false
	}
	l.held[key] = true
	return true
}

func (l *keyLocks) unlock(key string) {
	l.mu.Lock()
	delete(l.held, key)
	l.mu.Unlock()
}

func (d *Driver) lock(key string) (func(), error) {
	if !d.locks.tryLock(key) {
		return nil, status.Errorf(codes.Aborted, "an operation on %q is already in progress", key)
	}
	return func() { d.locks.unlock(key) }, nil
}

// arg is one required request field: its name and whether it was given.
type arg struct {
	name  string
	given bool
}

// required returns InvalidArgument naming the first field not given.
func required(args ...arg) error {
	for _, a := range args {
		if !a.given {
			return status.Errorf(codes.InvalidArgument, "missing %s", a.name)
		}
	}
	return nil
}
