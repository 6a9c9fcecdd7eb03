package fuseloop

import (
	"context"
	"errors"
	"sync/atomic"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// statfsBlock is the block size the file system reports. The loop driver
// takes it as its discard granularity.
const statfsBlock = 4096

// rootNode is the mount's only directory; it holds the volume file.
type rootNode struct {
	fs.Inode
	file *fileNode
}

var _ fs.NodeStatfser = (*rootNode)(nil)
var _ fs.NodeGetattrer = (*rootNode)(nil)

// Statfs must succeed with a block size: the loop driver enables discard
// and write-zeroes only when statfs of the backing file works.
func (r *rootNode) Statfs(_ context.Context, out *fuse.StatfsOut) syscall.Errno {
	out.Bsize = statfsBlock
	out.Frsize = statfsBlock
	out.Blocks = r.file.size.Load() / statfsBlock
	out.NameLen = 255
	return 0
}

func (r *rootNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o700
	return 0
}

// fileNode is the volume as a regular file. It has no per-open state:
// every open shares the device.
type fileNode struct {
	fs.Inode
	dev      backends.Device
	readOnly bool
	// zero is whether the device zeroes efficiently (Caps.Zero).
	zero bool
	// size is what the file reports; it changes only through Resize,
	// after the device grew.
	size atomic.Uint64
}

var (
	_ fs.NodeGetattrer = (*fileNode)(nil)
	_ fs.NodeSetattrer = (*fileNode)(nil)
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeWriter    = (*fileNode)(nil)
	_ fs.NodeFsyncer   = (*fileNode)(nil)
	_ fs.NodeFlusher   = (*fileNode)(nil)
	_ fs.NodeAllocater = (*fileNode)(nil)
)

func (f *fileNode) attr(out *fuse.Attr) {
	mode := uint32(0o600)
	if f.readOnly {
		mode = 0o400
	}
	size := f.size.Load()
	out.Mode = syscall.S_IFREG | mode
	out.Size = size
	out.Blocks = (size + 511) / 512
	out.Blksize = statfsBlock
	out.Nlink = 1
}

func (f *fileNode) Getattr(_ context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.attr(&out.Attr)
	return 0
}

// Setattr accepts and ignores mode, owner and times (nothing to store
// them in) but refuses to change the size: that is the device's to say.
func (f *fileNode) Setattr(_ context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && sz != f.size.Load() {
		return syscall.EPERM
	}
	f.attr(&out.Attr)
	return 0
}

// Open answers with direct I/O so the kernel keeps no page cache for the
// file (the file system on the loop device has its own), and lets
// non-extending direct writes run in parallel (FUSE otherwise takes the
// inode lock for each).
func (f *fileNode) Open(_ context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if f.readOnly && (flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0) {
		return nil, 0, syscall.EROFS
	}
	return nil, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
}

func (f *fileNode) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := f.size.Load()
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if uint64(off) >= size {
		return fuse.ReadResultData(nil), 0
	}
	n := min(uint64(len(dest)), size-uint64(off))
	if err := f.dev.ReadAt(ctx, dest[:n], uint64(off)); err != nil {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Write never extends the file: the loop driver stays inside the size it
// was given, so a write past the end is somebody else's mistake.
func (f *fileNode) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if f.readOnly {
		return 0, syscall.EROFS
	}
	size := f.size.Load()
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if uint64(off)+uint64(len(data)) > size {
		return 0, syscall.ENOSPC
	}
	if err := f.dev.WriteAt(ctx, data, uint64(off), false); err != nil {
		return 0, toErrno(err)
	}
	return uint32(len(data)), 0
}

func (f *fileNode) Fsync(ctx context.Context, _ fs.FileHandle, _ uint32) syscall.Errno {
	return toErrno(f.dev.Flush(ctx))
}

// Flush is close(2) of a descriptor, not a durability request, but it is
// rare (the loop holds its one open) and cheap to honour.
func (f *fileNode) Flush(ctx context.Context, _ fs.FileHandle) syscall.Errno {
	if f.readOnly {
		return 0
	}
	return toErrno(f.dev.Flush(ctx))
}

// Allocate implements the fallocate modes the loop driver uses. Both must
// leave the range reading as zeros (see the package documentation for why
// PUNCH_HOLE is not a Trim).
func (f *fileNode) Allocate(ctx context.Context, _ fs.FileHandle, off, length uint64, mode uint32) syscall.Errno {
	if f.readOnly {
		return syscall.EROFS
	}
	const punch = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	size := f.size.Load()
	if off > size || length > size-off {
		if mode&unix.FALLOC_FL_KEEP_SIZE == 0 {
			return syscall.ENOSPC // would extend the file
		}
		if off >= size {
			return 0
		}
		length = size - off
	}
	switch mode {
	case 0, unix.FALLOC_FL_KEEP_SIZE:
		// Plain allocation: every byte of the device already exists.
		return 0
	case punch:
		if !f.zero {
			return syscall.EOPNOTSUPP
		}
		return toErrno(f.dev.Zero(ctx, off, length, 0))
	case unix.FALLOC_FL_ZERO_RANGE, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE:
		return toErrno(f.dev.Zero(ctx, off, length, backends.ZeroNoHole))
	default:
		return syscall.EOPNOTSUPP
	}
}

// toErrno turns a device error into the errno FUSE answers with. ENOSYS is
// never passed on: the kernel would take it as "not implemented" and stop
// asking for that operation for the life of the mount.
func toErrno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 && errno != syscall.ENOSYS {
		return errno
	}
	if errors.Is(err, context.Canceled) {
		return syscall.EINTR
	}
	return syscall.EIO
}
