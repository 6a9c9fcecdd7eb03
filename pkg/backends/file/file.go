// Package file is the file: backend: a volume stored in a local file or
// block device, "file:///path/to/disk.img" (like nbdkit's file plugin).
//
// Options:
//   - size: the smallest size the volume may have. A missing regular file
//     is created (its directory must exist) and a smaller one is grown,
//     sparsely, to this size; a larger file keeps its size, so a volume
//     grown through Resize still opens with the spec it was created with.
//     Files are never shrunk. A block device smaller than size is an error.
//     Without size the file must exist and must not be empty.
//   - direct: O_DIRECT, bypassing the page cache. Unaligned requests go
//     through aligned bounce buffers (read-modify-write at the edges), and
//     the size must be a multiple of 4 KiB.
//   - readonly: open read-only; writes, trims and zeroes fail with EPERM.
//
// Regular files are sparse-aware: Extents reports holes (SEEK_DATA and
// SEEK_HOLE), Trim punches holes, Zero punches holes or (ZeroNoHole)
// converts the range to unwritten extents (FALLOC_FL_ZERO_RANGE), all
// where the filesystem supports them. Block devices use BLKGETSIZE64,
// BLKDISCARD and BLKZEROOUT instead.
package file

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// align is the alignment of O_DIRECT transfers (buffer address, offset and
// length). 4 KiB satisfies every logical block size in use (512 or 4096).
const align = 4096

func init() {
	backends.Register(backends.Backend{
		Scheme: "file",
		Doc:    "A local file or block device, file:///path (sparse-aware: holes, trim by hole punching).",
		Options: []backends.Option{
			{Key: "size", Kind: backends.OptSize,
				Doc: "Minimum size: a missing file is created and a smaller one grown (sparsely) to it; never shrunk."},
			{Key: "direct", Kind: backends.OptBool, Default: "false",
				Doc: "Open with O_DIRECT (bypass the page cache); the size must be a multiple of 4Ki."},
			{Key: "readonly", Kind: backends.OptBool, Default: "false",
				Doc: "Open read-only."},
		},
		Validate: func(s backends.Spec) error {
			_, err := parseOptions(s)
			return err
		},
		Open: func(ctx context.Context, s backends.Spec, _ backends.Env) (backends.Device, error) {
			o, err := parseOptions(s)
			if err != nil {
				return nil, err
			}
			return Open(ctx, o)
		},
	})
}

// Options configure Open.
type Options struct {
	Path     string
	Size     uint64 // minimum size; 0: the file's own size
	Direct   bool
	ReadOnly bool
}

func parseOptions(s backends.Spec) (Options, error) {
	p, err := ParsePath(s.URL)
	if err != nil {
		return Options{}, err
	}
	o := Options{Path: p}
	if v, ok := s.Options["size"]; ok {
		n, err := backends.ParseSize(v)
		if err != nil {
			return Options{}, fmt.Errorf("file: option %q: %v", "size", err)
		}
		o.Size = n
	}
	o.Direct, _ = s.Bool("direct")
	o.ReadOnly, _ = s.Bool("readonly")
	if o.Direct && o.Size%align != 0 {
		return Options{}, fmt.Errorf("file: option %q: %d bytes is not a multiple of %d, which option %q requires",
			"size", o.Size, align, "direct")
	}
	if o.Size > maxSize {
		return Options{}, fmt.Errorf("file: option %q: %s is larger than the maximum %s",
			"size", backends.FormatSize(o.Size), backends.FormatSize(maxSize))
	}
	return o, nil
}

// maxSize is the largest volume (file offsets are signed).
const maxSize = 1<<63 - 1

// ParsePath returns the absolute local path a file: URL names:
// file:///abs/path or file://localhost/abs/path, percent-decoded. Relative
// paths, other hosts, queries and fragments are refused, each with an
// error naming the problem.
func ParsePath(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("file: bad URL %s: %v", strconv.Quote(raw), err)
	}
	bad := func(format string, args ...any) (string, error) {
		return "", fmt.Errorf("file: bad URL %s: %s (want file:///absolute/path)", strconv.Quote(raw), fmt.Sprintf(format, args...))
	}
	switch {
	case !strings.EqualFold(u.Scheme, "file"):
		return bad("scheme is not file")
	case u.Opaque != "":
		return bad("relative path %s", strconv.Quote(u.Opaque))
	case u.User != nil:
		return bad("user info is not allowed")
	case u.Host != "" && !strings.EqualFold(u.Host, "localhost"):
		return bad("host %s: only local files can be served", strconv.Quote(u.Host))
	case u.RawQuery != "" || u.ForceQuery:
		return bad("a query string is not allowed (options go before the URL: size=1Gi;file:///path)")
	case u.Fragment != "" || strings.Contains(raw, "#"):
		return bad("a fragment is not allowed")
	case u.Path == "" || u.Path[0] != '/':
		return bad("no absolute path")
	case strings.IndexByte(u.Path, 0) >= 0:
		return bad("NUL byte in path")
	}
	p := filepath.Clean(u.Path)
	if p == "/" {
		return bad("path is the root directory")
	}
	return p, nil
}

// Device is an open file or block device. It is safe for concurrent use.
type Device struct {
	f        *os.File
	fd       int
	path     string
	size     atomic.Uint64
	blk      bool // a block device
	direct   bool
	readOnly bool
	caps     backends.Caps

	noDsync     atomic.Bool // pwritev2(RWF_DSYNC) is unsupported: write + fdatasync
	noZeroRange atomic.Bool // FALLOC_FL_ZERO_RANGE is unsupported here
	resize      sync.Mutex
	edges       [64]sync.Mutex // direct: edge blocks being read-modify-written, by block number
}

var (
	_ backends.Device  = (*Device)(nil)
	_ backends.Resizer = (*Device)(nil)
)

// Open opens (and, with o.Size, creates or grows) the file o names.
func Open(_ context.Context, o Options) (*Device, error) {
	flags := os.O_RDWR
	if o.ReadOnly {
		flags = os.O_RDONLY
	}
	if o.Direct {
		flags |= syscall.O_DIRECT
	}
	flags |= syscall.O_CLOEXEC
	f, err := os.OpenFile(o.Path, flags, 0)
	if errors.Is(err, os.ErrNotExist) && o.Size > 0 && !o.ReadOnly {
		// Created only when a size says how big; O_EXCL so two openers
		// racing to create it cannot truncate each other's file.
		f, err = os.OpenFile(o.Path, flags|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, os.ErrExist) {
			f, err = os.OpenFile(o.Path, flags, 0)
		}
		if err == nil {
			klog.InfoS("file: created volume file", "path", o.Path, "size", o.Size)
		}
	}
	if err != nil {
		switch {
		case errors.Is(err, os.ErrNotExist) && o.Size == 0:
			return nil, fmt.Errorf("file: %w (set option \"size\" to create it)", err)
		case errors.Is(err, os.ErrPermission) && !o.ReadOnly:
			return nil, fmt.Errorf("file: %w (option \"readonly\" opens it read-only)", err)
		case errors.Is(err, syscall.EINVAL) && o.Direct:
			return nil, fmt.Errorf("file: %w (the filesystem may not support option \"direct\")", err)
		}
		return nil, fmt.Errorf("file: %w", err)
	}
	d := &Device{f: f, fd: int(f.Fd()), path: o.Path, direct: o.Direct, readOnly: o.ReadOnly}
	if err := d.init(o); err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// init learns the size and capabilities, creating space as o asks.
func (d *Device) init(o Options) error {
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return fmt.Errorf("file: stat %s: %w", d.path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		size := uint64(st.Size)
		if size < o.Size {
			if o.ReadOnly {
				return fmt.Errorf("file: %s is %d bytes, smaller than option \"size\" (%s), and option \"readonly\" forbids growing it",
					d.path, size, backends.FormatSize(o.Size))
			}
			if err := unix.Ftruncate(d.fd, int64(o.Size)); err != nil {
				return fmt.Errorf("file: growing %s to %d bytes: %w", d.path, o.Size, err)
			}
			size = o.Size
		}
		if size == 0 {
			return fmt.Errorf("file: %s is empty (set option \"size\" to grow it)", d.path)
		}
		if d.direct && size%align != 0 {
			return fmt.Errorf("file: %s is %d bytes, not a multiple of %d, which option \"direct\" requires", d.path, size, align)
		}
		d.size.Store(size)
	case unix.S_IFBLK:
		d.blk = true
		size, err := blkSize(d.fd)
		if err != nil {
			return fmt.Errorf("file: size of block device %s: %w", d.path, err)
		}
		if size < o.Size {
			return fmt.Errorf("file: block device %s is %d bytes, smaller than option \"size\" (%s)",
				d.path, size, backends.FormatSize(o.Size))
		}
		if d.direct && size%align != 0 {
			return fmt.Errorf("file: block device %s is %d bytes, not a multiple of %d, which option \"direct\" requires", d.path, size, align)
		}
		d.size.Store(size)
	case unix.S_IFDIR:
		return fmt.Errorf("file: %s is a directory", d.path)
	default:
		return fmt.Errorf("file: %s is neither a regular file nor a block device", d.path)
	}

	c := backends.Caps{
		ReadOnly:   d.readOnly,
		Flush:      true,
		FUA:        true,
		Cache:      !d.direct,
		MultiConn:  true, // one descriptor: fdatasync covers every connection's writes
		Rotational: rotational(st),
		PrefBlock:  align,
	}
	if d.blk {
		// BLKDISCARD may be a no-op and BLKZEROOUT may write zeros the
		// slow way: neither is promised to be fast.
		c.Trim, c.Zero = true, true
	} else {
		c.Extents = true // SEEK_DATA/SEEK_HOLE work (as "all data" at worst) everywhere
		if !d.readOnly && d.canPunch(d.size.Load()) {
			// With holes, zeroing is always cheap: a hole, or one
			// allocated again (or FALLOC_FL_ZERO_RANGE) for ZeroNoHole.
			c.Trim, c.Zero, c.FastZero = true, true, true
		}
	}
	d.caps = c
	return nil
}

// canPunch finds out whether the filesystem can punch holes by punching
// one past the end of the file, which changes nothing (KEEP_SIZE).
// (FALLOC_FL_ZERO_RANGE cannot be probed that way: past the end it
// allocates blocks that stay; Zero learns whether it works on first use.)
func (d *Device) canPunch(size uint64) bool {
	off := (size + 2*align) &^ (align - 1)
	if off > maxSize-align {
		return false
	}
	return fallocate(d.fd, punchHole, off, align) == nil
}

// rotational reads the queue/rotational flag of the disk behind st (the
// device itself, or the filesystem's), best effort.
func rotational(st unix.Stat_t) bool {
	dev := st.Dev
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		dev = st.Rdev
	}
	base := fmt.Sprintf("/sys/dev/block/%d:%d/", unix.Major(dev), unix.Minor(dev))
	for _, p := range []string{base + "queue/rotational", base + "../queue/rotational"} {
		if b, err := os.ReadFile(p); err == nil {
			return strings.TrimSpace(string(b)) == "1"
		}
	}
	return false
}

func (d *Device) Size() uint64        { return d.size.Load() }
func (d *Device) Caps() backends.Caps { return d.caps }

// check guards against ranges the server should have refused.
func (d *Device) check(off, n uint64) error {
	if size := d.size.Load(); off > size || n > size-off {
		return fmt.Errorf("file: range %d+%d beyond size %d: %w", off, n, size, backends.ErrInvalid)
	}
	return nil
}

func (d *Device) writable(off, n uint64) error {
	if d.readOnly {
		return backends.ErrReadOnly
	}
	return d.check(off, n)
}

// Flush makes completed writes durable.
func (d *Device) Flush(context.Context) error {
	if d.readOnly {
		return nil
	}
	if err := fdatasync(d.fd); err != nil {
		return fmt.Errorf("file: fdatasync %s: %w", d.path, err)
	}
	return nil
}

// Cache asks the kernel to read the range ahead (buffered I/O only).
func (d *Device) Cache(_ context.Context, off, length uint64) error {
	if d.direct || length == 0 {
		return nil
	}
	if err := d.check(off, length); err != nil {
		return err
	}
	unix.Fadvise(d.fd, int64(off), int64(length), unix.FADV_WILLNEED) // a hint: failures don't matter
	return nil
}

// Resize grows a regular file (sparsely, with ftruncate); for a block
// device it re-reads the device's size, which must have grown to at least
// size already (e.g. an extended logical volume), and takes all of it.
func (d *Device) Resize(_ context.Context, size uint64) error {
	d.resize.Lock()
	defer d.resize.Unlock()
	cur := d.size.Load()
	switch {
	case size == cur:
		return nil
	case size < cur:
		return fmt.Errorf("file: resize %s from %d to %d bytes: shrinking: %w", d.path, cur, size, backends.ErrInvalid)
	case size > maxSize:
		return fmt.Errorf("file: resize %s to %d bytes: too large: %w", d.path, size, backends.ErrInvalid)
	case d.direct && size%align != 0:
		return fmt.Errorf("file: resize %s to %d bytes: not a multiple of %d (option \"direct\"): %w", d.path, size, align, backends.ErrInvalid)
	case d.readOnly:
		return fmt.Errorf("file: resize %s: %w", d.path, backends.ErrReadOnly)
	}
	if d.blk {
		n, err := blkSize(d.fd)
		if err != nil {
			return fmt.Errorf("file: size of block device %s: %w", d.path, err)
		}
		if n < size {
			return fmt.Errorf("file: resize block device %s to %d bytes: the device has only %d: %w", d.path, size, n, backends.ErrNoSpace)
		}
		d.size.Store(n)
		return nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(d.fd, &st); err != nil {
		return fmt.Errorf("file: stat %s: %w", d.path, err)
	}
	if uint64(st.Size) < size {
		if err := unix.Ftruncate(d.fd, int64(size)); err != nil {
			return fmt.Errorf("file: resize %s to %d bytes: %w", d.path, size, err)
		}
	}
	d.size.Store(size)
	return nil
}

// Close flushes and closes the file.
func (d *Device) Close() error {
	err := d.Flush(context.Background())
	if cerr := d.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("file: close %s: %w", d.path, cerr)
	}
	return err
}

func fdatasync(fd int) error {
	for {
		err := unix.Fdatasync(fd)
		if err != unix.EINTR {
			return err
		}
	}
}
