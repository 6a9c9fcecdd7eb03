package fuseloop

import (
	"context"
	"errors"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// statfsBlock is the block size the file system reports. The loop driver
// takes it as its discard granularity.
const statfsBlock = 4096

// Node IDs and the file handle are fixed, not allocated: a server that
// takes over a live connection (Resume) must understand the inodes and open
// files the kernel got from its predecessor, without knowing anything the
// predecessor kept.
const (
	rootID = fuse.FUSE_ROOT_ID // the directory
	fileID = 2                 // the volume file
	fileFh = 0                 // every open of the file: no per-open state
	// cacheTimeout is how long the kernel may trust entries and
	// attributes: nothing changes behind its back, and Resize notifies.
	cacheTimeout = time.Hour
)

// volumeFS is the file system: one directory holding one regular file,
// the device. It is a fuse.RawFileSystem over fixed node IDs; whatever it
// does not implement answers ENOSYS.
type volumeFS struct {
	fuse.RawFileSystem // defaults: ENOSYS

	name     string
	dev      backends.Device
	readOnly bool
	// zero is whether the device zeroes efficiently (Caps.Zero).
	zero bool
	// size is what the file reports; it changes only through Resize,
	// after the device grew.
	size atomic.Uint64
}

func newVolumeFS(name string, dev backends.Device, readOnly, zero bool, size uint64) *volumeFS {
	fs := &volumeFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), name: name, dev: dev, readOnly: readOnly, zero: zero}
	fs.size.Store(size)
	return fs
}

func (*volumeFS) String() string { return fsName }

// ctx turns a request's cancel channel (closed by FUSE_INTERRUPT) into the
// context the Device is called with.
func ctx(cancel <-chan struct{}) context.Context { return &fuse.Context{Cancel: cancel} }

func (f *volumeFS) dirAttr(out *fuse.Attr) {
	out.Ino = rootID
	out.Mode = syscall.S_IFDIR | 0o700
	out.Nlink = 2
	out.Blksize = statfsBlock
}

func (f *volumeFS) fileAttr(out *fuse.Attr) {
	mode := uint32(0o600)
	if f.readOnly {
		mode = 0o400
	}
	size := f.size.Load()
	out.Ino = fileID
	out.Mode = syscall.S_IFREG | mode
	out.Size = size
	out.Blocks = (size + 511) / 512
	out.Blksize = statfsBlock
	out.Nlink = 1
}

func (f *volumeFS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if h.NodeId != rootID {
		return fuse.Status(syscall.ENOTDIR)
	}
	if name != f.name {
		return fuse.ENOENT
	}
	out.NodeId = fileID
	out.Generation = 1
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(cacheTimeout)
	f.fileAttr(&out.Attr)
	return fuse.OK
}

func (f *volumeFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	switch in.NodeId {
	case rootID:
		f.dirAttr(&out.Attr)
	case fileID:
		f.fileAttr(&out.Attr)
	default:
		return fuse.ENOENT
	}
	out.SetTimeout(cacheTimeout)
	return fuse.OK
}

// SetAttr accepts and ignores mode, owner and times (nothing to store
// them in) but refuses to change the size: that is the device's to say.
func (f *volumeFS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	if sz, ok := in.GetSize(); ok && (in.NodeId != fileID || sz != f.size.Load()) {
		return fuse.EPERM
	}
	return f.GetAttr(cancel, &fuse.GetAttrIn{InHeader: in.InHeader}, out)
}

// Open answers with direct I/O so the kernel keeps no page cache for the
// file (the file system on the loop device has its own), and lets
// non-extending direct writes run in parallel (FUSE otherwise takes the
// inode lock for each).
func (f *volumeFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != fileID {
		return fuse.Status(syscall.EISDIR)
	}
	if f.readOnly && (in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY || in.Flags&syscall.O_TRUNC != 0) {
		return fuse.EROFS
	}
	out.Fh = fileFh
	out.OpenFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	return fuse.OK
}

func (f *volumeFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, dest []byte) (fuse.ReadResult, fuse.Status) {
	if in.NodeId != fileID {
		return nil, fuse.Status(syscall.EISDIR)
	}
	size, off := f.size.Load(), in.Offset
	if off >= size {
		return inPlace(nil), fuse.OK
	}
	n := min(uint64(len(dest)), uint64(in.Size), size-off)
	if err := f.dev.ReadAt(ctx(cancel), dest[:n], off); err != nil {
		return nil, toStatus(err)
	}
	return inPlace(dest[:n]), fuse.OK
}

// inPlace is a read result already in the reply buffer (Read's dest).
// ProtocolServer copies a fuse.ReadResultData into the reply, here onto
// itself; a plain ReadResult whose Bytes is that same memory is
// recognised and sent as it is.
type inPlace []byte

func (r inPlace) Bytes([]byte) ([]byte, fuse.Status) { return r, fuse.OK }
func (r inPlace) Size() int                          { return len(r) }
func (r inPlace) Done()                              {}

// Write never extends the file: the loop driver stays inside the size it
// was given, so a write past the end is somebody else's mistake.
func (f *volumeFS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	if in.NodeId != fileID {
		return 0, fuse.Status(syscall.EISDIR)
	}
	if f.readOnly {
		return 0, fuse.EROFS
	}
	if off := in.Offset; off > f.size.Load() || uint64(len(data)) > f.size.Load()-off {
		return 0, fuse.Status(syscall.ENOSPC)
	}
	if err := f.dev.WriteAt(ctx(cancel), data, in.Offset, false); err != nil {
		return 0, toStatus(err)
	}
	return uint32(len(data)), fuse.OK
}

func (f *volumeFS) Fsync(cancel <-chan struct{}, _ *fuse.FsyncIn) fuse.Status {
	return toStatus(f.dev.Flush(ctx(cancel)))
}

// Flush is close(2) of a descriptor, not a durability request, but it is
// rare (the loop holds its one open) and cheap to honour.
func (f *volumeFS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	if f.readOnly || in.NodeId != fileID {
		return fuse.OK
	}
	return toStatus(f.dev.Flush(ctx(cancel)))
}

// Fallocate implements the fallocate modes the loop driver uses. Both must
// leave the range reading as zeros (see the package documentation for why
// PUNCH_HOLE is not a Trim).
func (f *volumeFS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	if in.NodeId != fileID {
		return fuse.Status(syscall.EISDIR)
	}
	if f.readOnly {
		return fuse.EROFS
	}
	const punch = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	off, length, mode := in.Offset, in.Length, in.Mode
	size := f.size.Load()
	if off > size || length > size-off {
		if mode&unix.FALLOC_FL_KEEP_SIZE == 0 {
			return fuse.Status(syscall.ENOSPC) // would extend the file
		}
		if off >= size {
			return fuse.OK
		}
		length = size - off
	}
	switch mode {
	case 0, unix.FALLOC_FL_KEEP_SIZE:
		// Plain allocation: every byte of the device already exists.
		return fuse.OK
	case punch:
		if !f.zero {
			return fuse.Status(syscall.EOPNOTSUPP)
		}
		return toStatus(f.dev.Zero(ctx(cancel), off, length, 0))
	case unix.FALLOC_FL_ZERO_RANGE, unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE:
		return toStatus(f.dev.Zero(ctx(cancel), off, length, backends.ZeroNoHole))
	default:
		return fuse.Status(syscall.EOPNOTSUPP)
	}
}

// StatFs must succeed with a block size: the loop driver enables discard
// and write-zeroes only when statfs of the backing file works.
func (f *volumeFS) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize = statfsBlock
	out.Frsize = statfsBlock
	out.Blocks = f.size.Load() / statfsBlock
	out.NameLen = 255
	return fuse.OK
}

func (f *volumeFS) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != rootID {
		return fuse.Status(syscall.ENOTDIR)
	}
	out.Fh = fileFh
	return fuse.OK
}

// ReadDir lists ".", ".." and the file, at offsets 1, 2 and 3.
func (f *volumeFS) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	ents := []fuse.DirEntry{
		{Mode: syscall.S_IFDIR, Name: ".", Ino: rootID, Off: 1},
		{Mode: syscall.S_IFDIR, Name: "..", Ino: rootID, Off: 2},
		{Mode: syscall.S_IFREG, Name: f.name, Ino: fileID, Off: 3},
	}
	for _, e := range ents[min(in.Offset, uint64(len(ents))):] {
		if !out.AddDirEntry(e) {
			break
		}
	}
	return fuse.OK
}

// toStatus turns a device error into the errno FUSE answers with. ENOSYS
// is never passed on: the kernel would take it as "not implemented" and
// stop asking for that operation for the life of the mount.
func toStatus(err error) fuse.Status {
	if err == nil {
		return fuse.OK
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 && errno != syscall.ENOSYS {
		return fuse.Status(errno)
	}
	if errors.Is(err, context.Canceled) {
		return fuse.EINTR
	}
	return fuse.EIO
}
