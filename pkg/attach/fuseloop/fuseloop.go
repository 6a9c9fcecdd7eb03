package fuseloop

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

const (
	// fsName and fsSubtype show in /proc/mounts as "csi-nbd … fuse.csi-nbd-fuseloop";
	// CleanupStale unmounts only mounts of that type.
	fsName    = "csi-nbd"
	fsSubtype = "csi-nbd-fuseloop"
	fsType    = "fuse." + fsSubtype

	// maxWrite is the largest FUSE read/write, and with the headers the
	// size of each request buffer (one per request in flight). 512 KiB
	// was chosen when go-fuse spliced (1 MiB did not fit its pipe); it
	// also keeps the buffers of 64 background requests at 32 MiB.
	maxWrite = 512 << 10
	// maxBackground bounds the kernel's asynchronous FUSE requests, which
	// is what loop direct I/O sends: the default (12) would cap the queue
	// depth far below what a block device sees.
	maxBackground = 64

	defaultBlockSize = 512
	maxBlockSize     = 64 << 10
)

// Config says where and how to expose a device.
type Config struct {
	// Name is the file name of the volume inside Dir (one path element).
	Name string
	// Dir is a private directory (in the state directory) where the FUSE
	// file system is mounted; it is created if missing. One Attachment
	// per Dir.
	Dir string
	// ReadOnly attaches a read-only loop device over a read-only file. A
	// device whose Caps say ReadOnly is attached read-only regardless.
	ReadOnly bool
	// BlockSize is the loop device's logical block size: a power of two
	// from 512 up to the page size; 0 means 512 (the loop driver's
	// default).
	BlockSize uint32
}

func (c Config) check() (Config, error) {
	switch {
	case c.Name == "" || c.Name == "." || c.Name == ".." || strings.ContainsAny(c.Name, "/\x00"):
		return c, fmt.Errorf("fuseloop: config Name %q: must be a single file name", c.Name)
	case len(c.Name) > 255:
		return c, fmt.Errorf("fuseloop: config Name: %d bytes is longer than 255", len(c.Name))
	case c.Dir == "":
		return c, errors.New("fuseloop: config Dir is empty")
	}
	if c.BlockSize == 0 {
		c.BlockSize = defaultBlockSize
	}
	if c.BlockSize < 512 || c.BlockSize > maxBlockSize || bits.OnesCount32(c.BlockSize) != 1 {
		return c, fmt.Errorf("fuseloop: config BlockSize %d: must be a power of two from 512 to %d",
			c.BlockSize, maxBlockSize)
	}
	return c, nil
}

// Available says whether Attach can work here: nil when /dev/fuse and
// /dev/loop-control can be opened and the process may mount (has
// CAP_SYS_ADMIN); otherwise an error saying what is missing. A security
// policy (seccomp, AppArmor) may still refuse the mount itself.
func Available() error {
	for _, p := range []string{"/dev/fuse", loopControl} {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("fuseloop unavailable: %w", err)
		}
		f.Close()
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("fuseloop unavailable: capget: %w", err)
	}
	if data[0].Effective&(1<<unix.CAP_SYS_ADMIN) == 0 {
		return errors.New("fuseloop unavailable: CAP_SYS_ADMIN is needed to mount FUSE and configure loop devices")
	}
	return nil
}

// Attachment is one device exposed as /dev/loopN.
type Attachment struct {
	dev   backends.Device
	dir   string // resolved mount point
	file  string // dir/name, the loop's backing file
	fs    *volumeFS
	srv   *server
	index atomic.Int64  // loop device number; -1 until configured (watch reads it concurrently)
	done  chan struct{} // closed when the FUSE server has exited

	// detaching is set while we unmount the FUSE file system ourselves,
	// so that watch does not report it as going away underneath us.
	detaching atomic.Bool

	mu       sync.Mutex
	loop     *os.File // our descriptor of /dev/loopN; nil once released
	detached bool

	errMu sync.Mutex
	err   error // why it ended, when not through Detach
}

// Attach mounts a FUSE file system in cfg.Dir exposing dev as the file
// cfg.Name and attaches a free loop device to it with direct I/O. dev must
// stay open until Detach returns; Attach does not take ownership of it.
// On failure everything set up so far is torn down again.
func Attach(ctx context.Context, dev backends.Device, cfg Config) (_ *Attachment, err error) {
	cfg, err = cfg.check()
	if err != nil {
		return nil, err
	}
	size := dev.Size()
	if size < uint64(cfg.BlockSize) {
		return nil, fmt.Errorf("fuseloop: device size %d is smaller than the block size %d", size, cfg.BlockSize)
	}
	caps := dev.Caps()
	readOnly := cfg.ReadOnly || caps.ReadOnly

	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("fuseloop: config Dir: %w", err)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err == nil {
		dir, err = filepath.EvalSymlinks(dir)
	}
	if err != nil {
		return nil, fmt.Errorf("fuseloop: config Dir: %w", err)
	}
	if m, err := isMountPoint(dir); err != nil {
		return nil, fmt.Errorf("fuseloop: %w", err)
	} else if m {
		return nil, fmt.Errorf("fuseloop: %s is already a mount point (a stale attachment? CleanupStale removes those): %w",
			dir, syscall.EBUSY)
	}

	vfs := newVolumeFS(cfg.Name, dev, readOnly, caps.Zero, size)
	srv, err := mountFUSE(ctx, dir, vfs, readOnly)
	if err != nil {
		return nil, err
	}
	a := &Attachment{
		dev: dev, dir: dir, file: filepath.Join(dir, cfg.Name), fs: vfs, srv: srv,
		done: make(chan struct{}),
	}
	a.index.Store(-1)
	go a.watch()
	defer func() {
		if err != nil {
			a.teardown()
		}
	}()

	if err := disablePoll(a.file); err != nil {
		return nil, fmt.Errorf("fuseloop: %w", err)
	}
	mode := unix.O_RDWR
	if readOnly {
		mode = unix.O_RDONLY
	}
	backing, err := unix.Open(a.file, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("fuseloop: open %s: %w", a.file, err)
	}
	loop, err := configureLoop(ctx, backing, cfg.BlockSize, readOnly, loopMarker(dir, cfg.Name))
	unix.Close(backing) // the loop device holds its own reference
	if err != nil {
		return nil, fmt.Errorf("fuseloop: %w", err)
	}
	a.loop = loop.f
	a.index.Store(int64(loop.index))

	info, _ := readLoopInfo(loop.index)
	if !info.dio {
		// Still correct (FOPEN_DIRECT_IO keeps the FUSE file uncached),
		// but each request is then copied through the loop's buffers.
		klog.InfoS("Loop device is not using direct I/O", "device", a.Path(), "file", a.file)
	}
	klog.V(2).InfoS("Attached through FUSE and loop", "device", a.Path(), "file", a.file,
		"size", size, "blockSize", cfg.BlockSize, "readOnly", readOnly, "directIO", info.dio)
	return a, nil
}

// mountFUSE mounts the one-file file system on dir and starts serving it.
// It opens /dev/fuse and calls mount(2) itself: go-fuse's direct mount
// leaves the descriptor inheritable, and a copy of it in any child process
// would keep the connection alive (and I/O hanging instead of failing)
// after we die. Only a keeper we hand it to on purpose (FuseFD) should.
func mountFUSE(ctx context.Context, dir string, vfs *volumeFS, readOnly bool) (*server, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("fuseloop: %w", err)
	}
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	data := fmt.Sprintf("fd=%d,rootmode=%o,user_id=%d,group_id=%d,max_read=%d",
		fd, unix.S_IFDIR, os.Geteuid(), os.Getegid(), maxWrite)
	if err := unix.Mount(fsName, dir, fsType, flags, data); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("fuseloop: mount FUSE on %s: %w", dir, err)
	}
	srv, err := newServer(fd, vfs, dir)
	if err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		unix.Close(fd)
		return nil, fmt.Errorf("fuseloop: %w", err)
	}
	srv.start()
	// The kernel sends INIT first; wait for our answer.
	fail := func(err error) (*server, error) {
		// Unmounting the unused mount ends the connection, which
		// wakes the readers (ENODEV).
		srv.stopping.Store(true)
		unix.Unmount(dir, unix.MNT_DETACH)
		select {
		case <-srv.done:
		case <-time.After(5 * time.Second):
		}
		srv.close()
		return nil, fmt.Errorf("fuseloop: FUSE mount on %s: %w", dir, err)
	}
	select {
	case <-srv.initDone:
	case <-srv.done:
		return fail(fmt.Errorf("connection ended before INIT: %v", srv.endErr))
	case <-ctx.Done():
		return fail(ctx.Err())
	case <-time.After(30 * time.Second):
		return fail(errors.New("no INIT from the kernel in 30s"))
	}
	return srv, nil
}

// disablePoll makes the kernel stop sending FUSE POLL requests for this
// mount, before anything in this process opens a file in it through package
// os. os registers regular files with the runtime's epoll instance;
// epoll_ctl then waits for our answer to POLL while holding the epoll
// mutex, and the runtime's own epoll_wait, which our FUSE readers may need
// to get scheduled, blocks on that mutex: the process deadlocks (observed
// here under -race). go-fuse's poll hack does this at mount time, but only
// when go-fuse mounts. A poll(2) outside the runtime's epoll gets the
// answer ENOSYS, after which the kernel never asks again.
func disablePoll(file string) error {
	fd, err := unix.Open(file, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", file, err)
	}
	defer unix.Close(fd)
	_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}, 0)
	if err != nil && !errors.Is(err, unix.EINTR) {
		return fmt.Errorf("poll %s: %w", file, err)
	}
	return nil
}

// watch closes Done when the FUSE server exits: after Detach unmounted
// it, or because the mount or the connection went away underneath us.
func (a *Attachment) watch() {
	<-a.srv.done
	if !a.detaching.Load() && !a.srv.abandoned.Load() {
		a.errMu.Lock()
		a.err = fmt.Errorf("fuseloop: FUSE server for %s stopped (%v underneath us)", a.file, a.srv.endErr)
		a.errMu.Unlock()
		klog.ErrorS(nil, "FUSE server stopped underneath an attached loop device", "device", a.Path(), "file", a.file)
	}
	close(a.done)
}

// Path is the block device, "/dev/loopN".
func (a *Attachment) Path() string { return loopPath(int(a.index.Load())) }

// Done is closed when the attachment has ended: after Detach, or when
// the FUSE file system went away underneath us (then Err says so).
func (a *Attachment) Done() <-chan struct{} { return a.done }

// Err says why the attachment ended when that was not Detach; nil while
// it is alive or after Detach.
func (a *Attachment) Err() error {
	a.errMu.Lock()
	defer a.errMu.Unlock()
	return a.err
}

// Resize makes the loop device follow the Device after it grew to size:
// the file reports the new size, the kernel's cached attributes are
// invalidated and re-read, and LOOP_SET_CAPACITY resizes /dev/loopN.
func (a *Attachment) Resize(ctx context.Context, size uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.loop == nil {
		return fmt.Errorf("fuseloop: resize %s: detached: %w", a.Path(), backends.ErrInvalid)
	}
	if cur := a.fs.size.Load(); size < cur {
		return fmt.Errorf("fuseloop: resize %s to %d: shrinking from %d: %w", a.Path(), size, cur, backends.ErrInvalid)
	}
	if devSize := a.dev.Size(); size > devSize {
		return fmt.Errorf("fuseloop: resize %s to %d: the device has only %d bytes (grow it first): %w",
			a.Path(), size, devSize, backends.ErrInvalid)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	a.fs.size.Store(size)
	// Attributes only, there is no page cache.
	if err := a.srv.invalidateAttr(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("fuseloop: resize %s: invalidate attributes: %w", a.Path(), err)
	}
	// The loop driver reads the inode's cached size; a stat refreshes it.
	if _, err := os.Stat(a.file); err != nil {
		return fmt.Errorf("fuseloop: resize %s: %w", a.Path(), err)
	}
	if err := unix.IoctlSetInt(int(a.loop.Fd()), unix.LOOP_SET_CAPACITY, 0); err != nil {
		return fmt.Errorf("fuseloop: resize %s: LOOP_SET_CAPACITY: %w", a.Path(), err)
	}
	klog.V(2).InfoS("Resized", "device", a.Path(), "size", size)
	return nil
}

// Detach flushes, detaches the loop device, unmounts the FUSE file system
// and waits for its server to exit. It does not close the Device. While
// the loop device is mounted (claimed exclusively) it fails with EBUSY and
// changes nothing. If someone else merely holds it open, the loop is
// marked to detach on their last close and Detach waits for that until
// ctx ends; it can be called again. Detach after Detach is a no-op.
func (a *Attachment) Detach(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.detached {
		return nil
	}
	var errs []error
	if a.loop != nil {
		// A mount or device-mapper holds an exclusive claim; refuse
		// before changing anything rather than leave it half-detached.
		excl, err := os.OpenFile(a.Path(), os.O_RDONLY|unix.O_EXCL, 0)
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("fuseloop: detach %s: in use (mounted?): %w", a.Path(), err)
		}
		if err == nil {
			excl.Close()
		}
		// fsync of the block device flushes what was written through
		// its page cache and sends a flush down to the Device.
		if err := a.loop.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", a.Path(), err))
		}
		if err := unix.IoctlSetInt(int(a.loop.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
			return fmt.Errorf("fuseloop: detach %s: LOOP_CLR_FD: %w", a.Path(), err)
		}
		// Our close is normally the last one, and it detaches the loop.
		a.loop.Close()
		a.loop = nil
	}
	if err := waitLoopGone(ctx, int(a.index.Load()), a.dir); err != nil {
		return fmt.Errorf("fuseloop: detach: %w", err)
	}
	if err := a.unmount(ctx); err != nil {
		return err
	}
	if err := a.dev.Flush(ctx); err != nil {
		errs = append(errs, fmt.Errorf("flush device: %w", err))
	}
	a.detached = true
	klog.V(2).InfoS("Detached", "device", a.Path(), "file", a.file)
	if len(errs) > 0 {
		return fmt.Errorf("fuseloop: detach %s: %w", a.Path(), errors.Join(errs...))
	}
	return nil
}

// unmount unmounts the FUSE file system and waits for the server to exit.
// The loop driver drops its reference to the file asynchronously at
// times, so EBUSY is retried for a while.
func (a *Attachment) unmount(ctx context.Context) (err error) {
	a.detaching.Store(true)
	defer func() {
		if err != nil {
			a.detaching.Store(false)
		}
	}()
	delay := time.Millisecond
	for {
		err := unix.Unmount(a.dir, 0)
		if err == nil || errors.Is(err, unix.EINVAL) { // EINVAL: not mounted any more
			break
		}
		if !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("fuseloop: unmount %s: %w", a.dir, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("fuseloop: unmount %s: %w (%w)", a.dir, err, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 100*time.Millisecond)
	}
	select {
	case <-a.done:
		a.srv.shutdown()
		return nil
	case <-ctx.Done():
		return fmt.Errorf("fuseloop: waiting for the FUSE server of %s to exit: %w", a.dir, ctx.Err())
	}
}

// teardown undoes a failed Attach.
func (a *Attachment) teardown() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.loop != nil {
		unix.IoctlSetInt(int(a.loop.Fd()), unix.LOOP_CLR_FD, 0)
		a.loop.Close()
		a.loop = nil
	}
	a.detached = true
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	waitLoopGone(ctx, int(a.index.Load()), a.dir)
	if err := a.unmount(ctx); err != nil {
		unix.Unmount(a.dir, unix.MNT_DETACH)
		a.srv.shutdown()
	}
}

// CleanupStale removes what a crashed process left behind in dir: every
// loop device whose backing file lies under dir, or whose lo_file_name
// carries our marker for dir, is detached (at once, or on its last close
// if something still has it open or mounted), and every FUSE mount of
// ours under dir is lazily unmounted. Loop devices and mounts of anyone
// else are never touched. Call it only for directories no live
// Attachment uses. Loops still in use are reported in an error wrapping
// EBUSY; they detach by themselves once released.
func CleanupStale(dir string) error {
	dir, err := resolveStaleDir(dir)
	if err != nil {
		return fmt.Errorf("fuseloop: cleanup: %w", err)
	}
	indexes, err := loopIndexes()
	if err != nil {
		return fmt.Errorf("fuseloop: cleanup: list loop devices: %w", err)
	}
	var errs []error
	var ours []int
	for _, i := range indexes {
		info, mine := isOurs(i, dir)
		if !mine {
			continue
		}
		klog.InfoS("Detaching stale loop device", "device", loopPath(i), "file", info.backing)
		if err := clearLoop(i); err != nil {
			errs = append(errs, err)
			continue
		}
		ours = append(ours, i)
	}

	mounts, err := readMounts()
	if err != nil {
		errs = append(errs, fmt.Errorf("list mounts: %w", err))
	}
	var mps []string
	for _, m := range mounts {
		if m.FSType == fsType && under(m.MountPoint, dir) {
			mps = append(mps, m.MountPoint)
		}
	}
	// Deepest first, and each once (stacked mounts are listed twice).
	sort.Sort(sort.Reverse(sort.StringSlice(mps)))
	for _, mp := range mps {
		klog.InfoS("Unmounting stale FUSE mount", "dir", mp)
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}

	// The kernel may finish a detach just after the last close returns.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, i := range ours {
		if err := waitLoopGone(ctx, i, dir); err != nil {
			errs = append(errs, fmt.Errorf("%s is still in use; it detaches when released: %w", loopPath(i), syscall.EBUSY))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("fuseloop: cleanup %s: %w", dir, errors.Join(errs...))
	}
	return nil
}

// resolveStaleDir makes dir absolute and resolves symlinks as Attach did,
// without stat'ing dir itself: a FUSE mount whose server died answers
// ENOTCONN.
func resolveStaleDir(dir string) (string, error) {
	if dir == "" {
		return "", errors.New("empty directory")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		return r, nil
	}
	parent, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return "", err
	}
	return filepath.Join(parent, filepath.Base(abs)), nil
}
