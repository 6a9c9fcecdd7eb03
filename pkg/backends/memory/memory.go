// Package memory is the memory: backend, a sparse RAM disk like nbdkit's
// memory plugin: "memory:" or "memory:NAME" (the name only tells volumes
// apart), option size (default 1Gi).
//
// Only written, non-zero 64 KiB pages take memory, so the size can be far
// larger than RAM. The data lives as long as the device: the server's
// backends.Pool keeps it open until shutdown, so it survives reconnects
// but not a restart.
package memory

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// maxSize is the largest volume: NBD clients treat sizes as signed.
const maxSize = math.MaxInt64

func init() {
	backends.Register(backends.Backend{
		Scheme: "memory",
		Doc:    "Sparse RAM disk; memory:NAME names distinct volumes. Data is lost when the server exits.",
		Options: []backends.Option{{
			Key: "size", Kind: backends.OptSize, Default: "1Gi",
			Doc: "Volume size. Memory is used only for written, non-zero data.",
		}},
		Validate: func(s backends.Spec) error {
			_, err := volumeSize(s)
			return err
		},
		Open: func(_ context.Context, s backends.Spec, _ backends.Env) (backends.Device, error) {
			size, err := volumeSize(s)
			if err != nil {
				return nil, err
			}
			return New(size), nil
		},
	})
}

func volumeSize(s backends.Spec) (uint64, error) {
	size, ok := s.Size("size")
	if !ok {
		return 0, fmt.Errorf("memory: option %q missing or invalid", "size")
	}
	if size > maxSize {
		return 0, fmt.Errorf("memory: option %q: %s is larger than the maximum %s",
			"size", backends.FormatSize(size), backends.FormatSize(maxSize))
	}
	return size, nil
}

// Device is a memory volume. It is safe for concurrent use.
type Device struct {
	size   atomic.Uint64 // grows through Resize
	resize sync.Mutex
	t      *table
}

// New returns an empty (all zeros) memory device of size bytes (at most
// 2^63-1; larger sizes are cut to that). It allocates only a small index,
// whatever the size.
func New(size uint64) *Device {
	size = min(size, maxSize)
	d := &Device{t: newTable(size)}
	d.size.Store(size)
	return d
}

var _ backends.Device = (*Device)(nil)

func (d *Device) Size() uint64 { return d.size.Load() }

var _ backends.Resizer = (*Device)(nil)

// Resize grows the volume; the new tail reads as zeros (bytes past the old
// end were never written, even in its last page). Volumes grow up to
// 1 PiB, or their creation size if larger.
func (d *Device) Resize(_ context.Context, size uint64) error {
	d.resize.Lock()
	defer d.resize.Unlock()
	cur := d.size.Load()
	switch {
	case size < cur:
		return fmt.Errorf("memory: shrinking from %s to %s: %w", backends.FormatSize(cur), backends.FormatSize(size), backends.ErrInvalid)
	case size > d.t.capacity() || size > maxSize:
		return fmt.Errorf("memory: growing to %s: beyond the %s a memory volume can grow to: %w",
			backends.FormatSize(size), backends.FormatSize(min(d.t.capacity(), maxSize)), backends.ErrNotSupported)
	}
	// Pages first, so a whole-volume trim racing with us never skips the new tail.
	d.t.setSize(size)
	d.size.Store(size)
	return nil
}

// Caps: writes are durable as soon as they return (for the life of the
// process), so Flush and FUA are free; every connection sees one memory;
// nothing blocks, so requests can run on the connection's reader.
func (d *Device) Caps() backends.Caps {
	return backends.Caps{
		Flush: true, FUA: true, Trim: true, Zero: true, FastZero: true,
		Extents: true, MultiConn: true, Fast: true, Volatile: true,
	}
}

// check guards against ranges the server should have refused.
func (d *Device) check(off, n uint64) error {
	if size := d.size.Load(); off > size || n > size-off {
		return fmt.Errorf("memory: range %d+%d beyond size %d: %w", off, n, size, backends.ErrInvalid)
	}
	return nil
}

// eachPage calls f for each page piece of [off, off+length): the page's
// index, the offset in it and the piece's length.
func eachPage(off, length uint64, f func(pi, po, n uint64)) {
	for length > 0 {
		po := off % pageSize
		n := min(length, pageSize-po)
		f(off>>pageShift, po, n)
		off, length = off+n, length-n
	}
}

// ReadAt reads p from off; absent pages read as zeros.
func (d *Device) ReadAt(_ context.Context, p []byte, off uint64) error {
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	eachPage(off, uint64(len(p)), func(pi, po, n uint64) {
		d.t.read(p[:n], pi, po)
		p = p[n:]
	})
	return nil
}

// Lend implements backends.Lender: the server writes reads to the socket
// straight from the pages, which saves the copy that dominates large reads.
func (d *Device) Lend(off, length uint64, dst [][]byte) ([][]byte, bool, error) {
	if err := d.check(off, length); err != nil {
		return dst, false, err
	}
	zero := true
	eachPage(off, length, func(pi, po, n uint64) {
		b, z := d.t.lend(pi, po, n)
		dst = append(dst, b)
		zero = zero && z
	})
	return dst, zero, nil
}

// WriteAt writes p at off; fua needs nothing more.
func (d *Device) WriteAt(_ context.Context, p []byte, off uint64, _ bool) error {
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	eachPage(off, uint64(len(p)), func(pi, po, n uint64) {
		d.t.write(p[:n], pi, po)
		p = p[n:]
	})
	return nil
}

// BorrowWrite appends to dst the device's own memory for [off,
// off+length), for a write to be read straight into it (the server reads
// a WRITE's payload from the socket into the pages: no copy). Absent
// pages are allocated. CommitWrite with the same range must follow,
// whether or not the memory was filled; until then the bytes may be seen
// half-written by overlapping requests, which NBD leaves unspecified.
func (d *Device) BorrowWrite(off, length uint64, dst [][]byte) ([][]byte, error) {
	if err := d.check(off, length); err != nil {
		return dst, err
	}
	eachPage(off, length, func(pi, po, n uint64) {
		dst = append(dst, d.t.borrow(pi, po, n))
	})
	return dst, nil
}

// CommitWrite ends a BorrowWrite of [off, off+length): pages left all
// zeros are freed, as WriteAt would not have stored them.
func (d *Device) CommitWrite(off, length uint64) {
	eachPage(off, length, d.t.commit)
}

func (d *Device) Flush(context.Context) error { return nil }

// Trim frees the range: it reads as zeros afterwards.
func (d *Device) Trim(_ context.Context, off, length uint64, _ bool) error {
	return d.zero(off, length)
}

// Zero frees the range like Trim. ZeroNoHole is ignored: a hole in RAM is
// as good as allocated zeros, and cheaper. ZeroFast always succeeds.
func (d *Device) Zero(_ context.Context, off, length uint64, _ backends.ZeroFlags) error {
	return d.zero(off, length)
}

func (d *Device) zero(off, length uint64) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	end := off + length
	if length == 0 {
		return nil
	}
	// Partial first and last pages are zeroed in place, whole pages in
	// between freed.
	first, last := off>>pageShift, (end-1)>>pageShift
	if po := off % pageSize; po != 0 || (first == last && end%pageSize != 0) {
		pe := min(end-first*pageSize, pageSize)
		d.t.zeroPart(first, po, pe-po)
		first++
	}
	if first <= last && end%pageSize != 0 {
		d.t.zeroPart(last, 0, end%pageSize)
		last--
	}
	if first <= last {
		d.t.free(first, last+1)
	}
	return nil
}

// Extents reports absent pages as holes reading as zeros and stored pages
// as data, merging runs of equal status.
func (d *Device) Extents(_ context.Context, off, length uint64, add func(backends.Extent)) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	end := off + length
	start, pos := off, off
	var cur backends.ExtentFlags
	for pos < end {
		present, next := d.t.status(pos)
		flags := backends.ExtentHole | backends.ExtentZero
		if present {
			flags = 0
		}
		if pos > start && flags != cur {
			add(backends.Extent{Length: pos - start, Flags: cur})
			start = pos
		}
		cur, pos = flags, min(next, end)
	}
	if end > start {
		add(backends.Extent{Length: end - start, Flags: cur})
	}
	return nil
}

func (d *Device) Cache(context.Context, uint64, uint64) error { return nil }

// Close retires the pages the kernel may still hold (see given.go); the
// memory goes when the last reference does.
func (d *Device) Close() error {
	d.t.close()
	return nil
}
