package file

import (
	"context"
	"fmt"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// bounceSize is the size of the aligned buffers O_DIRECT transfers of
// unaligned memory go through.
const bounceSize = 1 << 20

var bouncePool = sync.Pool{New: func() any { b := alignedBuf(bounceSize); return &b }}

// alignedBuf returns n bytes starting at an address aligned to align.
func alignedBuf(n int) []byte {
	b := make([]byte, n+align)
	skip := 0
	if r := int(uintptr(unsafe.Pointer(&b[0])) & (align - 1)); r != 0 {
		skip = align - r
	}
	return b[skip : skip+n : skip+n]
}

func isAligned(p []byte, off uint64) bool {
	return len(p)%align == 0 && off%align == 0 &&
		(len(p) == 0 || uintptr(unsafe.Pointer(&p[0]))&(align-1) == 0)
}

// ReadAt reads p from off. Bytes past the end of the file (if it shrank
// under us) read as zeros.
func (d *Device) ReadAt(_ context.Context, p []byte, off uint64) error {
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	if !d.direct || isAligned(p, off) {
		return d.pread(p, off)
	}
	return bounce(p, off, func(b []byte, a, skip uint64, q []byte) error {
		if err := d.pread(b, a); err != nil {
			return err
		}
		copy(q, b[skip:])
		return nil
	})
}

// bounce runs an unaligned O_DIRECT transfer of p at off through a pooled
// aligned buffer, a piece at a time: fn gets b (whole blocks from the
// aligned offset a) and q, the part of p that lies at a+skip in it.
func bounce(p []byte, off uint64, fn func(b []byte, a, skip uint64, q []byte) error) error {
	bp := bouncePool.Get().(*[]byte)
	defer bouncePool.Put(bp)
	b := *bp
	for len(p) > 0 {
		a := off &^ (align - 1)
		skip := off - a
		n := min(uint64(len(p)), bounceSize-skip)
		span := (skip + n + align - 1) &^ (align - 1)
		if err := fn(b[:span], a, skip, p[:n]); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// pread fills p from off, zero-filling past the end of the file.
func (d *Device) pread(p []byte, off uint64) error {
	for len(p) > 0 {
		n, err := unix.Pread(d.fd, p, int64(off))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("file: read %s at %d: %w", d.path, off, err)
		}
		if n == 0 {
			clear(p)
			return nil
		}
		p, off = p[n:], off+uint64(n)
	}
	return nil
}

// WriteAt writes p at off; with fua the data is durable on return.
func (d *Device) WriteAt(_ context.Context, p []byte, off uint64, fua bool) error {
	if err := d.writable(off, uint64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	if !d.direct || isAligned(p, off) {
		return d.pwrite(p, off, fua)
	}
	return bounce(p, off, func(b []byte, a, skip uint64, q []byte) error {
		return d.rmw(b, a, skip, q, fua)
	})
}

// rmw writes data at a+skip through the aligned buffer b (len(b) blocks
// from a). Partially covered first and last blocks are read first; the
// lock on each keeps another request writing the rest of the same block
// from being undone by this one.
func (d *Device) rmw(b []byte, a, skip uint64, data []byte, fua bool) error {
	end := skip + uint64(len(data))
	span := uint64(len(b))
	headPartial := skip != 0
	tailPartial := end != span
	first, last := a/align, (a+span)/align-1
	if headPartial || tailPartial {
		locks := d.lockEdges(first, last, headPartial, tailPartial)
		defer func() {
			for _, l := range locks {
				if l != nil {
					l.Unlock()
				}
			}
		}()
		if headPartial {
			if err := d.pread(b[:align], a); err != nil {
				return err
			}
		}
		if tailPartial && (!headPartial || last != first) {
			if err := d.pread(b[span-align:], a+span-align); err != nil {
				return err
			}
		}
	}
	copy(b[skip:], data)
	return d.pwrite(b, a, fua)
}

// lockEdges locks the stripes of the partial edge blocks, in a fixed
// order (and each stripe once) so two writers cannot deadlock.
func (d *Device) lockEdges(first, last uint64, head, tail bool) [2]*sync.Mutex {
	var ls [2]*sync.Mutex
	if head {
		ls[0] = &d.edges[first%uint64(len(d.edges))]
	}
	if tail {
		ls[1] = &d.edges[last%uint64(len(d.edges))]
	}
	switch {
	case ls[0] == ls[1]:
		ls[1] = nil
	case ls[0] != nil && ls[1] != nil && uintptr(unsafe.Pointer(ls[0])) > uintptr(unsafe.Pointer(ls[1])):
		ls[0], ls[1] = ls[1], ls[0]
	}
	for _, l := range ls {
		if l != nil {
			l.Lock()
		}
	}
	return ls
}

// pwrite writes all of p at off. With fua it uses pwritev2(RWF_DSYNC),
// which syncs just this write, falling back to write + fdatasync where
// the kernel lacks it.
func (d *Device) pwrite(p []byte, off uint64, fua bool) error {
	dsync := fua && !d.noDsync.Load()
	for len(p) > 0 {
		var n int
		var err error
		if dsync {
			n, err = unix.Pwritev2(d.fd, [][]byte{p}, int64(off), unix.RWF_DSYNC)
			if err == unix.ENOSYS || err == unix.EOPNOTSUPP || err == unix.EINVAL {
				d.noDsync.Store(true)
				dsync = false
				continue
			}
		} else {
			n, err = unix.Pwrite(d.fd, p, int64(off))
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("file: write %s at %d: %w", d.path, off, err)
		}
		if n == 0 {
			return fmt.Errorf("file: write %s at %d: no progress: %w", d.path, off, unix.EIO)
		}
		p, off = p[n:], off+uint64(n)
	}
	if fua && !dsync {
		if err := fdatasync(d.fd); err != nil {
			return fmt.Errorf("file: fdatasync %s: %w", d.path, err)
		}
	}
	return nil
}
