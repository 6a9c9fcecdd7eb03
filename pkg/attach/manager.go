// Package attach hands volumes to the kernel as block devices served by
// this process: /dev/nbdN through the nbd driver's netlink interface, with
// one socketpair per connection whose other end the NBD server serves
// (no handshake), or, where the kernel has no nbd, a loop device over a
// FUSE file (package fuseloop).
//
// Every attached volume is recorded in a state directory, so a restarted
// process re-serves the same devices (Resume): the kernel keeps the device
// and its queued requests for DeadConnTimeout after the old server died,
// and RECONFIGURE hands it fresh sockets. Applications see no error.
package attach

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
	"github.com/csi-nbd/csi-nbd/pkg/nbd/netlink"
)

// Kinds of attachment.
const (
	KindNBD      = "nbd"
	KindFuseLoop = "fuseloop"
)

// Fallback policies (Options.Fallback).
const (
	FallbackAuto   = "auto"   // nbd when the kernel has it (loading the module), else fuseloop
	FallbackNever  = "never"  // nbd or fail
	FallbackAlways = "always" // fuseloop even when nbd is there
)

// Options tune one attachment.
type Options struct {
	// Connections is the number of sockets (kernel queues) for nbd;
	// more than one needs a backend that can serve several connections
	// consistently (Caps.MultiConn). Default 1. The kernel makes one
	// hardware queue per connection but no more than there are CPUs, and
	// sends requests on the socket of their queue: on one CPU the extra
	// connections only stand by for a dead one.
	Connections int `json:"connections"`
	// Timeout is the kernel's per-request timeout; when it expires the
	// connection is dropped and the request requeued (then re-served on
	// a repaired connection). Default 60 s.
	Timeout time.Duration `json:"timeout"`
	// DeadConnTimeout is how long the kernel holds requests while no
	// connection is alive (a restart of this process) before failing
	// them. Default 120 s.
	DeadConnTimeout time.Duration `json:"deadConnTimeout"`
	ReadOnly        bool          `json:"readOnly,omitempty"`
	// Fallback is FallbackAuto (default), FallbackNever or FallbackAlways.
	Fallback string `json:"fallback,omitempty"`
}

// Defaults for Options.
const (
	DefaultTimeout         = 60 * time.Second
	DefaultDeadConnTimeout = 120 * time.Second
	MaxConnections         = 64
)

func (o Options) withDefaults() (Options, error) {
	if o.Connections == 0 {
		o.Connections = 1
	}
	if o.Connections < 1 || o.Connections > MaxConnections {
		return o, fmt.Errorf("attach: connections %d out of range 1..%d", o.Connections, MaxConnections)
	}
	if o.Timeout == 0 {
		o.Timeout = DefaultTimeout
	}
	if o.DeadConnTimeout == 0 {
		o.DeadConnTimeout = DefaultDeadConnTimeout
	}
	if o.Timeout < 0 || o.DeadConnTimeout < 0 {
		return o, errors.New("attach: timeouts must not be negative")
	}
	switch o.Fallback {
	case "":
		o.Fallback = FallbackAuto
	case FallbackAuto, FallbackNever, FallbackAlways:
	default:
		return o, fmt.Errorf("attach: fallback %q is not auto, never or always", o.Fallback)
	}
	return o, nil
}

// Volume describes an attached volume.
type Volume struct {
	ID   string
	Spec string
	Path string // /dev/nbdN or /dev/loopN
	Kind string // KindNBD or KindFuseLoop
}

// ErrNotAttached is returned for volume IDs the Manager does not serve.
var ErrNotAttached = errors.New("volume not attached")

// Manager attaches volumes and serves them. Its methods are safe for
// concurrent use; operations on one volume ID are serialised.
type Manager struct {
	stateDir string
	env      backends.Env
	st       *store

	// WrapDevice, if set before the first Attach or Resume, wraps every
	// opened volume stack (the node plugin adds metrics outermost). The
	// result is what is served and what Device returns.
	WrapDevice func(id string, dev backends.Device) backends.Device

	// FDStore, if set before the first Attach or Resume, is the socket
	// of an fd store (csi-nbd fdstore, package fdstore) that outlives
	// this process. FUSE+loop attachments then put their /dev/fuse and
	// loop descriptors there, Resume serves them again in place, and
	// Close leaves them attached for the next process, as it does nbd
	// devices. Without it a FUSE+loop attachment dies with its server.
	FDStore string

	openKernel func(context.Context) (kernel, error)
	loop       loopFallback

	mu      sync.Mutex
	k       kernel
	vols    map[string]*volume
	locks   map[string]*idLock
	watchMu sync.Mutex
	watch   context.CancelFunc
	kick    chan struct{}
	closed  bool
}

type idLock struct {
	mu sync.Mutex
	n  int
}

// volume is one attached volume being served.
type volume struct {
	rec  record
	dev  backends.Device
	srv  *nbd.Server
	exp  *nbd.Export
	loop loopAttachment
	// kept: the fd store holds the FUSE+loop attachment's descriptors.
	kept bool

	ctx    context.Context
	cancel context.CancelFunc
	live   atomic.Int32 // connections being served
	connMu sync.Mutex
	conns  map[net.Conn]struct{} // our ends, being served

	detaching atomic.Bool
	gone      chan struct{}
	goneOnce  sync.Once

	mu         sync.Mutex
	discSeen   bool      // the kernel sent NBD_CMD_DISC: it is disconnecting
	repairedAt time.Time // last RECONFIGURE with fresh sockets
	failures   int       // repairs in a row that did not bring every connection back
	err        error     // last health problem seen by the watcher
}

func (v *volume) info() Volume {
	return Volume{ID: v.rec.ID, Spec: v.rec.Spec, Path: v.rec.Path, Kind: v.rec.Kind}
}

// NewManager returns a Manager keeping its records under stateDir and
// opening volumes with env (env.Secrets is replaced per volume by the
// secrets given to Attach, when there are any).
func NewManager(stateDir string, env backends.Env) (*Manager, error) {
	if stateDir == "" {
		return nil, errors.New("attach: a state directory is required")
	}
	st, err := newStore(stateDir)
	if err != nil {
		return nil, err
	}
	if env.StateDir == "" {
		env.StateDir = stateDir
	}
	return &Manager{
		stateDir:   stateDir,
		env:        env,
		st:         st,
		openKernel: openNetlink,
		loop:       fuseloopAdapter{},
		vols:       map[string]*volume{},
		locks:      map[string]*idLock{},
		kick:       make(chan struct{}, 1),
	}, nil
}

func (m *Manager) lockID(id string) (unlock func()) {
	m.mu.Lock()
	l := m.locks[id]
	if l == nil {
		l = &idLock{}
		m.locks[id] = l
	}
	l.n++
	m.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		m.mu.Lock()
		if l.n--; l.n == 0 {
			delete(m.locks, id)
		}
		m.mu.Unlock()
	}
}

func (m *Manager) lookup(id string) *volume {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.vols[id]
}

// kernel returns the nbd driver's interface, opening it once.
func (m *Manager) kernel(ctx context.Context) (kernel, error) {
	m.mu.Lock()
	k := m.k
	m.mu.Unlock()
	if k != nil {
		return k, nil
	}
	k, err := m.openKernel(ctx)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	if m.k == nil {
		m.k = k
	}
	k = m.k
	m.mu.Unlock()
	return k, nil
}

// chooseKind applies the fallback policy.
func (m *Manager) chooseKind(ctx context.Context, o Options) (string, error) {
	loopErr := errors.New("the FUSE+loop fallback is disabled")
	if m.loop != nil {
		loopErr = m.loop.Available()
	}
	switch o.Fallback {
	case FallbackAlways:
		if loopErr != nil {
			return "", fmt.Errorf("attach: fallback=always: %w", loopErr)
		}
		return KindFuseLoop, nil
	case FallbackNever:
		if _, err := m.kernel(ctx); err != nil {
			return "", fmt.Errorf("attach: fallback=never: %w", err)
		}
		return KindNBD, nil
	}
	_, err := m.kernel(ctx)
	if err == nil {
		return KindNBD, nil
	}
	if loopErr == nil {
		klog.InfoS("attach: kernel nbd unavailable; using the FUSE+loop fallback", "reason", err)
		return KindFuseLoop, nil
	}
	return "", fmt.Errorf("attach: no way to attach: %w; fallback: %v", err, loopErr)
}

// Attach attaches the volume spec names as id and returns its device path.
// It is idempotent: the same id and spec already attached give the same
// path; the same id with another spec is an error. The volume is recorded
// in the state directory before Attach returns.
func (m *Manager) Attach(ctx context.Context, id, spec string, secrets map[string]string, o Options) (string, error) {
	if id == "" {
		return "", errors.New("attach: empty volume ID")
	}
	if len(id) > netlink.MaxBackendIdentifier || strings.ContainsRune(id, 0) {
		return "", fmt.Errorf("attach: volume ID %.40q… is too long or holds a NUL byte", id)
	}
	o, err := o.withDefaults()
	if err != nil {
		return "", err
	}
	sp, err := backends.Parse(spec)
	if err != nil {
		return "", err
	}
	canon := sp.String()
	unlock := m.lockID(id)
	defer unlock()
	if v := m.lookup(id); v != nil {
		if v.rec.Spec != canon {
			return "", fmt.Errorf("attach: volume %q is already attached at %s with another spec", id, v.rec.Path)
		}
		return v.rec.Path, nil
	}
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return "", errors.New("attach: manager closed")
	}
	kind, err := m.chooseKind(ctx, o)
	if err != nil {
		return "", err
	}
	dev, err := m.open(ctx, id, sp, secrets)
	if err != nil {
		return "", fmt.Errorf("attach: %w", err)
	}
	v := m.newVolume(record{ID: id, Spec: canon, Kind: kind, Index: -1, Backend: id, Options: o, PID: os.Getpid()}, dev)
	switch kind {
	case KindNBD:
		err = m.attachNBD(ctx, v, secrets)
	default:
		err = m.attachLoop(ctx, v, secrets)
	}
	if err != nil {
		v.cancel()
		return "", errors.Join(err, dev.Close())
	}
	m.mu.Lock()
	m.vols[id] = v
	m.mu.Unlock()
	klog.InfoS("attach: volume attached", "volume", id, "device", v.rec.Path, "kind", kind, "connections", o.Connections)
	return v.rec.Path, nil
}

// open opens a volume's stack with the volume's secrets (when there are
// any), wrapped by WrapDevice.
func (m *Manager) open(ctx context.Context, id string, sp backends.Spec, secrets map[string]string) (backends.Device, error) {
	env := m.env
	if secrets != nil {
		env.Secrets = secrets
	}
	dev, err := backends.Open(ctx, sp, env)
	if err != nil || m.WrapDevice == nil {
		return dev, err
	}
	return m.WrapDevice(id, dev), nil
}

// reopen opens the stack of a recorded volume again, with its saved
// secrets (returned, to record the volume again), for Resume.
func (m *Manager) reopen(ctx context.Context, r record) (dev backends.Device, secrets map[string]string, err error) {
	if r.HasSecrets {
		if secrets, err = m.st.loadSecrets(r.ID); err != nil {
			return nil, nil, err
		}
	}
	sp, err := backends.Parse(r.Spec)
	if err != nil {
		return nil, nil, err
	}
	if dev, err = m.open(ctx, r.ID, sp, secrets); err != nil {
		return nil, nil, err
	}
	switch c := dev.Caps(); {
	case c.Volatile:
		return nil, nil, errors.Join(errVolatile, dev.Close())
	case c.BufferedWrites && !r.Closed:
		return nil, nil, errors.Join(errUnflushed, dev.Close())
	}
	return dev, secrets, nil
}

// reopen's errors for volumes a successor must not serve: doing so would
// hand the kernel's file system an empty disk (errVolatile: memory, a
// volatile overlay), or one missing writes the kernel was told were done,
// with its next flush succeeding (errUnflushed: a write-back buffer in a
// process that died). Such a volume is detached instead, so I/O fails
// loudly.
var (
	errVolatile  = errors.New("its contents lived only in the process that served it, which is gone: detached rather than served empty")
	errUnflushed = errors.New("the process that served it died with acknowledged writes possibly unflushed in its memory (a write-back buffer without a cache filter over it): detached rather than served without them")
)

// Device returns the open stack of an attached volume (for live changes,
// such as rate limits, while it is served).
func (m *Manager) Device(id string) (backends.Device, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.vols[id]
	if !ok {
		return nil, false
	}
	return v.dev, true
}

func (m *Manager) newVolume(rec record, dev backends.Device) *volume {
	ctx, cancel := context.WithCancel(context.Background())
	srv, _ := nbd.NewServer(nbd.ServerConfig{
		Exports: noExports{},
		// The kernel queues at most 128 requests per socket and sends
		// no request larger than max_sectors_kb: this bounds what one
		// connection may hold in memory.
		MaxInFlight:      128,
		MaxBufferedBytes: 32 << 20,
	})
	return &volume{
		rec:    rec,
		dev:    dev,
		srv:    srv,
		exp:    &nbd.Export{Device: dev, ReadOnly: rec.Options.ReadOnly},
		ctx:    ctx,
		cancel: cancel,
		gone:   make(chan struct{}),
		conns:  map[net.Conn]struct{}{},
	}
}

// noExports: kernel connections never negotiate an export.
type noExports struct{}

func (noExports) Open(context.Context, string) (*nbd.Export, func(), error) {
	return nil, nil, nbd.ErrUnknownExport
}
func (noExports) List(context.Context) []nbd.ExportInfo { return nil }

// serve creates n socketpairs, serves our ends and returns the kernel's.
func (m *Manager) serve(v *volume, n int) ([]*os.File, error) {
	var theirs []*os.File
	for i := 0; i < n; i++ {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeAll(theirs)
			return nil, fmt.Errorf("attach: socketpair: %w", err)
		}
		ours := os.NewFile(uintptr(fds[0]), "nbd-server")
		fc, err := net.FileConn(ours)
		ours.Close()
		if err != nil {
			unix.Close(fds[1])
			closeAll(theirs)
			return nil, fmt.Errorf("attach: socketpair: %w", err)
		}
		conn := &discConn{UnixConn: fc.(*net.UnixConn)}
		theirs = append(theirs, os.NewFile(uintptr(fds[1]), "nbd-kernel"))
		v.live.Add(1)
		v.connMu.Lock()
		v.conns[conn] = struct{}{}
		v.connMu.Unlock()
		go func() {
			v.srv.ServeTransmission(v.ctx, conn, v.exp)
			v.connMu.Lock()
			delete(v.conns, conn)
			v.connMu.Unlock()
			v.live.Add(-1)
			m.connEnded(v, conn.sawDisc())
		}()
	}
	return theirs, nil
}

func closeAll(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

func fdsOf(fs []*os.File) []int {
	out := make([]int, len(fs))
	for i, f := range fs {
		out[i] = int(f.Fd())
	}
	return out
}

func (m *Manager) attachNBD(ctx context.Context, v *volume, secrets map[string]string) error {
	o := v.rec.Options
	caps := v.dev.Caps()
	flags := serverFlags(caps, o.ReadOnly)
	if o.Connections > 1 && flags&nbd.FlagCanMultiConn == 0 {
		return fmt.Errorf("attach: connections=%d needs a backend that serves several connections consistently (multi-conn); this one does not", o.Connections)
	}
	bs, err := blockSize(caps)
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	k, err := m.kernel(ctx)
	if err != nil {
		return err
	}
	// Recorded before CONNECT: should we die before it answers, a
	// restart still finds the device by its backend identifier.
	if err := m.st.save(v.rec, secrets); err != nil {
		return err
	}
	theirs, err := m.serve(v, o.Connections)
	if err != nil {
		return errors.Join(err, m.st.remove(v.rec.ID))
	}
	idx, err := k.Connect(ctx, netlink.ConnectConfig{
		Index:             netlink.AnyIndex,
		Size:              v.dev.Size(),
		BlockSize:         bs,
		ServerFlags:       flags,
		Timeout:           o.Timeout,
		DeadConnTimeout:   o.DeadConnTimeout,
		BackendIdentifier: v.rec.Backend,
		Sockets:           fdsOf(theirs),
	})
	closeAll(theirs) // the kernel holds its own references
	if err != nil {
		v.detaching.Store(true)
		m.stopServing(v)
		return errors.Join(fmt.Errorf("attach: %w", err), m.st.remove(v.rec.ID))
	}
	v.rec.Index = int(idx)
	v.rec.Path = nbdPath(int(idx))
	if err := m.st.save(v.rec, secrets); err != nil {
		v.detaching.Store(true)
		_ = k.Disconnect(context.Background(), idx)
		m.stopServing(v)
		return errors.Join(err, m.st.remove(v.rec.ID))
	}
	tuneQueue("nbd"+strconv.Itoa(int(idx)), caps)
	m.startWatch()
	return nil
}

// fuseDir is where volume id's FUSE file system is mounted.
func (m *Manager) fuseDir(id string) string {
	return filepath.Join(m.stateDir, "fuse", fileKey(id))
}

// cleanupLoop detaches and unmounts what a dead process left of volume
// id's FUSE+loop attachment.
func (m *Manager) cleanupLoop(id string) error {
	if m.loop == nil {
		return nil
	}
	return m.loop.CleanupStale(m.fuseDir(id))
}

func (m *Manager) attachLoop(ctx context.Context, v *volume, secrets map[string]string) error {
	cfg, err := m.loopConfig(v.rec.ID, v.dev, v.rec.Options)
	if err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return fmt.Errorf("attach: %w", err)
	}
	a, err := m.loop.Attach(ctx, v.dev, cfg)
	if err != nil {
		return fmt.Errorf("attach: FUSE+loop fallback: %w", err)
	}
	v.loop = a
	v.rec.Path = a.Path()
	if m.FDStore != "" {
		v.rec.FuseInit = a.InitRequest()
	}
	if err := m.st.save(v.rec, secrets); err != nil {
		return errors.Join(err, a.Detach(ctx))
	}
	v.kept = m.keep(ctx, v.rec.ID, a)
	m.watchAttachment(v, a)
	return nil
}

// stopServing ends the volume's connections (letting requests in flight
// finish) and waits for them.
func (m *Manager) stopServing(v *volume) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = v.srv.Shutdown(ctx)
	v.cancel()
}

func (v *volume) setErr(err error) {
	v.mu.Lock()
	v.err = err
	v.mu.Unlock()
}

// forget drops a volume whose device is gone: close, unrecord.
func (m *Manager) forget(v *volume, why string) {
	if !v.detaching.CompareAndSwap(false, true) {
		return
	}
	klog.InfoS("attach: volume detached", "volume", v.rec.ID, "device", v.rec.Path, "reason", why)
	m.stopServing(v)
	if err := v.dev.Close(); err != nil {
		klog.ErrorS(err, "attach: closing the volume", "volume", v.rec.ID)
	}
	if err := m.st.remove(v.rec.ID); err != nil {
		klog.ErrorS(err, "attach: forgetting the volume", "volume", v.rec.ID)
	}
	m.mu.Lock()
	if m.vols[v.rec.ID] == v {
		delete(m.vols, v.rec.ID)
	}
	m.mu.Unlock()
	v.goneOnce.Do(func() { close(v.gone) })
}

// Detach flushes and detaches the volume and forgets it. It is idempotent:
// an unknown ID is not an error. A volume recorded by an earlier process
// but not resumed is disconnected through the kernel.
func (m *Manager) Detach(ctx context.Context, id string) error {
	unlock := m.lockID(id)
	defer unlock()
	v := m.lookup(id)
	if v == nil {
		return m.detachRecorded(ctx, id)
	}
	if !v.detaching.CompareAndSwap(false, true) {
		<-v.gone
		return nil
	}
	var errs []error
	switch v.rec.Kind {
	case KindNBD:
		syncDevice(ctx, v.rec.Path)
		if k, err := m.kernel(ctx); err != nil {
			errs = append(errs, err)
		} else if err := k.Disconnect(ctx, uint32(v.rec.Index)); err != nil && m.deviceConnected(ctx, v.rec.Index) {
			errs = append(errs, err)
		}
		// The kernel sends NBD_CMD_DISC on every connection: wait for
		// them to end by themselves, then make sure.
		for i := 0; i < 100 && v.live.Load() > 0 && ctx.Err() == nil; i++ {
			time.Sleep(20 * time.Millisecond)
		}
		m.stopServing(v)
	case KindFuseLoop:
		// The store's copy of the loop descriptor would keep the loop
		// attached (AUTOCLEAR acts on the last close): let go of it
		// first, and keep it again if the loop stays.
		if v.kept {
			m.unkeepLoop(ctx, id)
		}
		if err := v.loop.Detach(ctx); err != nil {
			errs = append(errs, fmt.Errorf("attach: detach %s: %w", v.rec.Path, err))
			if v.kept {
				m.rekeepLoop(ctx, id, v.loop)
			}
		} else {
			m.unkeep(ctx, id)
		}
		v.cancel()
	}
	if err := v.dev.Flush(ctx); err != nil {
		errs = append(errs, fmt.Errorf("attach: flush volume %q: %w", id, err))
	}
	if err := v.dev.Close(); err != nil {
		errs = append(errs, fmt.Errorf("attach: close volume %q: %w", id, err))
	}
	if err := errors.Join(errs...); err != nil && v.rec.Kind == KindFuseLoop {
		// The loop may still be there: keep the record for CleanupStale.
		return err
	}
	if len(errs) == 0 {
		// Closed cleanly (a cache wrote everything back): what filters
		// keep on this node for the volume can go.
		if sp, err := backends.Parse(v.rec.Spec); err == nil {
			if err := backends.Forget(m.env, sp); err != nil {
				klog.ErrorS(err, "attach: removing the volume's local filter state", "volume", id)
			}
		}
	}
	errs = append(errs, m.st.remove(id))
	m.mu.Lock()
	delete(m.vols, id)
	m.mu.Unlock()
	v.goneOnce.Do(func() { close(v.gone) })
	klog.InfoS("attach: volume detached", "volume", id, "device", v.rec.Path)
	return errors.Join(errs...)
}

func (m *Manager) deviceConnected(ctx context.Context, index int) bool {
	k, err := m.kernel(ctx)
	if err != nil {
		return true
	}
	sts, err := k.Status(ctx, index)
	return err != nil || (len(sts) == 1 && sts[0].Connected)
}

func (m *Manager) detachRecorded(ctx context.Context, id string) error {
	r, err := readRecord(m.st.recordPath(id))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	switch r.Kind {
	case KindNBD:
		idx := r.Index
		if idx < 0 {
			idx = findByBackend(r.Backend)
		}
		if idx >= 0 && m.deviceConnected(ctx, idx) {
			k, err := m.kernel(ctx)
			if err != nil {
				return err
			}
			if err := k.Disconnect(ctx, uint32(idx)); err != nil && m.deviceConnected(ctx, idx) {
				return err
			}
		}
	case KindFuseLoop:
		// The store's descriptors go first: they keep the loop
		// attached and the FUSE connection up.
		m.unkeep(ctx, id)
		if err := m.cleanupLoop(id); err != nil {
			return err
		}
	}
	return m.st.remove(id)
}

// Resume re-serves every volume recorded in the state directory that this
// Manager does not serve yet: it re-opens each stack and hands the kernel
// fresh sockets (RECONFIGURE) for the dead ones; FUSE+loop volumes are
// taken over from the fd store. Volumes whose device is gone are
// forgotten; volumes whose contents died with their server (Caps.Volatile)
// and FUSE+loop volumes the store does not hold are detached. It returns
// the volumes served and an error for each one that could not be.
func (m *Manager) Resume(ctx context.Context) ([]Volume, error) {
	recs, err := m.st.list()
	errs := []error{err}
	var out []Volume
	for _, r := range recs {
		vol, err := m.resumeOne(ctx, r)
		if err != nil {
			errs = append(errs, fmt.Errorf("resume volume %q: %w", r.ID, err))
			continue
		}
		out = append(out, vol)
	}
	return out, errors.Join(errs...)
}

func (m *Manager) resumeOne(ctx context.Context, r record) (Volume, error) {
	unlock := m.lockID(r.ID)
	defer unlock()
	if v := m.lookup(r.ID); v != nil {
		return v.info(), nil
	}
	if r.Kind == KindFuseLoop {
		vol, err := m.resumeLoop(ctx, r)
		if err == nil {
			m.startWatch()
			return vol, nil
		}
		why := "a FUSE+loop attachment does not survive its server without an fd store (--fd-store)"
		if m.FDStore != "" {
			why = fmt.Sprintf("cannot resume the FUSE+loop attachment in place (%v)", err)
		}
		klog.ErrorS(err, "attach: FUSE+loop volume lost: cleaning up; I/O on its device fails",
			"volume", r.ID, "device", r.Path, "fdStore", m.FDStore)
		m.unkeep(ctx, r.ID)
		return Volume{}, errors.Join(errors.New(why+"; cleaned up"), m.cleanupLoop(r.ID), m.st.remove(r.ID))
	}
	k, err := m.kernel(ctx)
	if err != nil {
		return Volume{}, err
	}
	if r.Index < 0 {
		r.Index = findByBackend(r.Backend)
		if r.Index < 0 {
			return Volume{}, errors.Join(errors.New("no nbd device carries its backend identifier; forgotten"), m.st.remove(r.ID))
		}
		r.Path = nbdPath(r.Index)
	}
	if !m.deviceConnected(ctx, r.Index) {
		return Volume{}, errors.Join(fmt.Errorf("%s is no longer connected; forgotten", r.Path), m.st.remove(r.ID))
	}
	dev, secrets, err := m.reopen(ctx, r)
	if errors.Is(err, errVolatile) || errors.Is(err, errUnflushed) {
		return Volume{}, errors.Join(err, m.detachRecorded(ctx, r.ID))
	}
	if err != nil {
		return Volume{}, err
	}
	r.PID = os.Getpid()
	v := m.newVolume(r, dev)
	if err := m.reconnect(ctx, k, v, r.Options.Connections); err != nil {
		v.detaching.Store(true)
		m.stopServing(v)
		return Volume{}, errors.Join(err, dev.Close())
	}
	if err := m.st.save(v.rec, secrets); err != nil {
		klog.ErrorS(err, "attach: recording the resumed volume", "volume", r.ID)
	}
	m.mu.Lock()
	m.vols[r.ID] = v
	m.mu.Unlock()
	m.startWatch()
	klog.InfoS("attach: volume re-served", "volume", r.ID, "device", r.Path)
	return v.info(), nil
}

// reconnect serves n fresh sockets and gives them to the kernel, which
// uses them in place of dead ones (and drops the rest).
func (m *Manager) reconnect(ctx context.Context, k kernel, v *volume, n int) error {
	theirs, err := m.serve(v, n)
	if err != nil {
		return err
	}
	err = k.Reconfigure(ctx, netlink.ReconfigureConfig{
		Index:             uint32(v.rec.Index),
		BackendIdentifier: v.rec.Backend,
		Sockets:           fdsOf(theirs),
	})
	closeAll(theirs)
	v.mu.Lock()
	v.repairedAt = time.Now()
	v.mu.Unlock()
	return err
}

// Resize grows the volume and its device.
func (m *Manager) Resize(ctx context.Context, id string, size uint64) error {
	unlock := m.lockID(id)
	defer unlock()
	v := m.lookup(id)
	if v == nil {
		return fmt.Errorf("attach: resize %q: %w", id, ErrNotAttached)
	}
	if err := backends.Resize(ctx, v.dev, size); err != nil {
		return fmt.Errorf("attach: resize volume %q: %w", id, err)
	}
	if v.rec.Kind == KindFuseLoop {
		return v.loop.Resize(ctx, size)
	}
	k, err := m.kernel(ctx)
	if err != nil {
		return err
	}
	if err := k.Reconfigure(ctx, netlink.ReconfigureConfig{
		Index: uint32(v.rec.Index), Size: size, BackendIdentifier: v.rec.Backend,
	}); err != nil {
		return fmt.Errorf("attach: resize %s: %w", v.rec.Path, err)
	}
	// Kernels whose RECONFIGURE ignores the size get the ioctl.
	if cur, ok := sysfsSize(v.rec.Path); ok && cur != size {
		if err := ioctlSetSize(v.rec.Path, size); err != nil {
			return fmt.Errorf("attach: resize %s: RECONFIGURE left the size at %d and NBD_SET_SIZE failed: %w", v.rec.Path, cur, err)
		}
	}
	return nil
}

func sysfsSize(devPath string) (uint64, bool) {
	b, err := os.ReadFile(filepath.Join(sysBlock, filepath.Base(devPath), "size"))
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return n * 512, err == nil
}

const nbdSetSize = 0xab<<8 | 2 // _IO(0xab, 2)

func ioctlSetSize(devPath string, size uint64) error {
	f, err := os.OpenFile(devPath, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), nbdSetSize, uintptr(size))
	if errno != 0 {
		return errno
	}
	return nil
}

// Health is nil when the volume is attached and all of its connections
// are being served.
func (m *Manager) Health(id string) error {
	v := m.lookup(id)
	if v == nil {
		return fmt.Errorf("attach: %q: %w", id, ErrNotAttached)
	}
	select {
	case <-v.gone:
		return fmt.Errorf("attach: %q: %w", id, ErrNotAttached)
	default:
	}
	if v.rec.Kind == KindFuseLoop {
		select {
		case <-v.loop.Done():
			return fmt.Errorf("attach: %s went away", v.rec.Path)
		default:
			return nil
		}
	}
	if n, want := v.live.Load(), int32(v.rec.Options.Connections); n < want {
		return fmt.Errorf("attach: %s: %d of %d connections alive", v.rec.Path, n, want)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.err != nil {
		return fmt.Errorf("attach: %s: %w", v.rec.Path, v.err)
	}
	return nil
}

// List returns the volumes being served.
func (m *Manager) List() []Volume {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Volume, 0, len(m.vols))
	for _, v := range m.vols {
		out = append(out, v.info())
	}
	return out
}

// Done returns a channel closed once the volume is no longer served (it was
// detached, here or by someone else); closed already for unknown IDs.
func (m *Manager) Done(id string) <-chan struct{} {
	if v := m.lookup(id); v != nil {
		return v.gone
	}
	c := make(chan struct{})
	close(c)
	return c
}

// Close stops serving without detaching: nbd devices keep their queued
// requests for DeadConnTimeout, waiting for a Resume by the next process;
// FUSE+loop attachments whose descriptors the fd store holds (FDStore)
// queue their requests until then. Other FUSE+loop attachments cannot
// outlive their server and are detached.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closed = true
	vols := make([]*volume, 0, len(m.vols))
	for _, v := range m.vols {
		vols = append(vols, v)
	}
	m.mu.Unlock()
	m.stopWatch()
	var errs []error
	for _, v := range vols {
		if v.rec.Kind == KindFuseLoop && !v.kept {
			errs = append(errs, m.Detach(context.Background(), v.rec.ID))
			continue
		}
		if !v.detaching.CompareAndSwap(false, true) {
			continue
		}
		if v.rec.Kind == KindFuseLoop {
			v.loop.Stop()
			v.cancel()
		} else {
			m.stopServing(v)
		}
		if err := v.dev.Close(); err != nil {
			errs = append(errs, fmt.Errorf("attach: close volume %q: %w", v.rec.ID, err))
		} else if err := m.st.markClosed(v.rec.ID); err != nil {
			errs = append(errs, fmt.Errorf("attach: %w", err))
		}
		m.mu.Lock()
		delete(m.vols, v.rec.ID)
		m.mu.Unlock()
		v.goneOnce.Do(func() { close(v.gone) })
	}
	return errors.Join(errs...)
}
