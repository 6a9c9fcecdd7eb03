package fuseloop

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// FuseFD returns a new descriptor of the attachment's /dev/fuse
// connection, for a keeper (package fdstore) to hold while this process
// restarts: as long as any copy is open, the kernel keeps the connection
// and its unanswered requests, and Resume can serve it again. The caller
// closes it.
func (a *Attachment) FuseFD() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(a.srv.fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("fuseloop: dup /dev/fuse: %w", err)
	}
	return os.NewFile(uintptr(fd), "/dev/fuse"), nil
}

// LoopFD returns a new descriptor of the loop device, for a keeper: the
// loop is configured to detach on its last close (AUTOCLEAR), which is
// what cleans up after a crash when nobody uses the device; a keeper's
// copy keeps it attached until Resume. The caller closes it.
func (a *Attachment) LoopFD() (*os.File, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.loop == nil {
		return nil, fmt.Errorf("fuseloop: %s: detached: %w", a.Path(), backends.ErrInvalid)
	}
	fd, err := unix.FcntlInt(a.loop.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("fuseloop: dup %s: %w", a.Path(), err)
	}
	return os.NewFile(uintptr(fd), a.Path()), nil
}

// InitRequest returns the FUSE_INIT request the kernel sent when the
// connection started, for ResumeState.Init. Save it with the descriptor.
func (a *Attachment) InitRequest() []byte { return a.srv.initRequest() }

// ResumeState is what Resume needs of an attachment whose server died.
type ResumeState struct {
	// FUSE is a descriptor of the attachment's /dev/fuse connection
	// (from FuseFD, kept by someone else). Resume takes its own copy;
	// the caller still closes this one.
	FUSE *os.File
	// Loop is a descriptor of the loop device (from LoopFD), or nil to
	// open LoopPath.
	Loop *os.File
	// LoopPath is the loop device, Attachment.Path.
	LoopPath string
	// Init is Attachment.InitRequest of the first server.
	Init []byte
}

// Resume serves an existing attachment again after its server died: the
// FUSE file system still mounted on cfg.Dir, its connection kept alive by
// st.FUSE, and the loop device st.LoopPath still attached to its file.
// The new server replays the saved INIT request to negotiate what its
// predecessor did, asks the kernel to resend every request the
// predecessor read but did not answer (FUSE_NOTIFY_RESEND, Linux 6.9),
// and serves. Applications see a pause, not an error. dev must be the
// same device (or a re-opening of it), and cfg the Config of the Attach.
func Resume(ctx context.Context, dev backends.Device, cfg Config, st ResumeState) (_ *Attachment, err error) {
	start := time.Now()
	cfg, err = cfg.check()
	if err != nil {
		return nil, err
	}
	if st.FUSE == nil {
		return nil, errors.New("fuseloop: resume: no /dev/fuse descriptor")
	}
	// Not a stat of dir itself: without a server that could hang.
	dir, err := filepath.Abs(cfg.Dir)
	if err == nil {
		var parent string
		parent, err = filepath.EvalSymlinks(filepath.Dir(dir))
		dir = filepath.Join(parent, filepath.Base(dir))
	}
	if err != nil {
		return nil, fmt.Errorf("fuseloop: resume: config Dir: %w", err)
	}
	if !mountedHere(dir) {
		return nil, fmt.Errorf("fuseloop: resume: no FUSE mount of ours on %s", dir)
	}
	index, err := loopIndexOf(st.LoopPath)
	if err != nil {
		return nil, fmt.Errorf("fuseloop: resume: %w", err)
	}
	if _, ours := isOurs(index, dir); !ours {
		return nil, fmt.Errorf("fuseloop: resume: %s is not attached to our file in %s", st.LoopPath, dir)
	}
	caps := dev.Caps()
	readOnly := cfg.ReadOnly || caps.ReadOnly

	var loop *os.File
	if st.Loop != nil {
		fd, err := unix.FcntlInt(st.Loop.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("fuseloop: resume: dup %s: %w", st.LoopPath, err)
		}
		loop = os.NewFile(uintptr(fd), st.LoopPath)
	} else {
		mode := os.O_RDWR
		if readOnly {
			mode = os.O_RDONLY
		}
		if loop, err = os.OpenFile(st.LoopPath, mode|unix.O_CLOEXEC, 0); err != nil {
			return nil, fmt.Errorf("fuseloop: resume: %w", err)
		}
	}
	fd, err := unix.FcntlInt(st.FUSE.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		loop.Close()
		return nil, fmt.Errorf("fuseloop: resume: dup /dev/fuse: %w", err)
	}
	vfs := newVolumeFS(cfg.Name, dev, readOnly, caps.Zero, dev.Size())
	srv, err := newServer(fd, vfs, dir)
	if err != nil {
		loop.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("fuseloop: resume: %w", err)
	}
	srv.resumed = start
	if err := srv.replayInit(st.Init); err != nil {
		loop.Close()
		srv.close()
		return nil, fmt.Errorf("fuseloop: resume: %w", err)
	}
	// Resend before serving: the requests the dead server held are the
	// oldest, and go to the front of the queue.
	if err := srv.resend(); err != nil {
		loop.Close()
		srv.close()
		if errors.Is(err, unix.EINVAL) {
			err = fmt.Errorf("%w (FUSE_NOTIFY_RESEND needs Linux 6.9)", err)
		}
		return nil, fmt.Errorf("fuseloop: resume: ask the kernel to resend: %w", err)
	}
	srv.start()
	a := &Attachment{
		dev: dev, dir: dir, file: filepath.Join(dir, cfg.Name), fs: vfs, srv: srv,
		done: make(chan struct{}), loop: loop,
	}
	a.index.Store(int64(index))
	go a.watch()
	klog.V(2).InfoS("Resumed FUSE and loop", "device", a.Path(), "file", a.file,
		"size", vfs.size.Load(), "readOnly", readOnly, "elapsed", time.Since(start))
	return a, nil
}

// mountedHere says whether a FUSE file system of ours is mounted on dir.
func mountedHere(dir string) bool {
	mounts, err := readMounts()
	if err != nil {
		return false
	}
	for _, m := range mounts {
		if m.FSType == fsType && m.MountPoint == dir {
			return true
		}
	}
	return false
}

func loopIndexOf(path string) (int, error) {
	s, ok := strings.CutPrefix(path, "/dev/loop")
	if !ok {
		return 0, fmt.Errorf("%q is not a loop device", path)
	}
	i, err := strconv.Atoi(s)
	if err != nil || i < 0 {
		return 0, fmt.Errorf("%q is not a loop device", path)
	}
	return i, nil
}

// Stop ends serving without detaching, for a successor to Resume: the
// requests being served are answered, no new ones are read, and this
// process's descriptors are closed. The kernel queues what comes next;
// a keeper must hold FuseFD (or the connection ends here, and I/O fails)
// and should hold LoopFD. Done closes; Err stays nil. Detach after Stop
// does nothing.
func (a *Attachment) Stop() {
	a.detaching.Store(true)
	a.release()
	klog.V(2).InfoS("Stopped serving, still attached", "device", a.Path(), "file", a.file)
}

// release stops the readers and closes this process's descriptors,
// leaving the attachment to whoever holds copies of them.
func (a *Attachment) release() {
	a.srv.shutdown()
	a.mu.Lock()
	if a.loop != nil {
		a.loop.Close()
		a.loop = nil
	}
	a.detached = true
	a.mu.Unlock()
}

// abandon stops serving as if the process had been killed, for tests: the
// readers stop, requests being served are not answered, and our
// descriptors are closed. Whoever holds a FuseFD keeps the connection.
func (a *Attachment) abandon() {
	a.srv.abandoned.Store(true)
	a.release()
}
