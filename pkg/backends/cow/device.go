package cow

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// stripes is the number of copy-up locks; block b uses locks[b%stripes].
const stripes = 1024

// Device is an open overlay. It is safe for concurrent use.
type Device struct {
	origin  backends.Device
	bs      uint64
	shift   uint
	persist bool
	dir     string
	f       *os.File // the overlay data
	lock    *os.File // flock'd: one opener per directory

	sizeMu sync.RWMutex // shared by requests, exclusive for Resize
	size   uint64

	// mu guards the bitmaps. A block's present bit is set only once its
	// whole content is in f; zero marks present blocks that read as zeros
	// (f holds a hole there).
	mu            sync.RWMutex
	present, zero bitset
	changed       bool // since the bitmaps were last saved
	closed        bool

	locks [stripes]sync.Mutex // serialise copy-up and state changes per block
}

var _ backends.Device = (*Device)(nil)
var _ backends.Resizer = (*Device)(nil)

// Open puts an overlay configured by c (c.Dir set) over origin. On error
// origin is left open.
func Open(_ context.Context, origin backends.Device, c Config) (*Device, error) {
	lock, err := backends.LockFilterDir(c.Dir, keyDir, "overlay")
	if err != nil {
		return nil, err
	}
	d := &Device{lock: lock, origin: origin, bs: c.Block, persist: c.Persist, dir: c.Dir, size: origin.Size()}
	for uint64(1)<<d.shift < d.bs {
		d.shift++
	}
	ok := false
	defer func() {
		if !ok {
			d.closeFiles()
		}
	}()
	nblocks := (d.size + d.bs - 1) >> d.shift
	d.present, d.zero = newBitset(nblocks), newBitset(nblocks)
	flags := os.O_RDWR | os.O_CREATE
	bitmapPath := filepath.Join(c.Dir, "bitmap")
	if c.Persist {
		b, err := os.ReadFile(bitmapPath)
		switch {
		case errors.Is(err, os.ErrNotExist):
			flags |= os.O_TRUNC // no saved overlay: start empty
		case err != nil:
			return nil, err
		default:
			m, err := parseBitmap(b)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", bitmapPath, err)
			}
			if m.block != d.bs {
				return nil, fmt.Errorf("option %q: the overlay in %s was made with %s=%s", keyBlock, c.Dir,
					keyBlock, backends.FormatSize(m.block))
			}
			if m.size != d.size {
				return nil, fmt.Errorf("the overlay in %s is for a %d-byte origin, this one has %d bytes", c.Dir, m.size, d.size)
			}
			if _, err := os.Stat(filepath.Join(c.Dir, "overlay")); err != nil {
				return nil, fmt.Errorf("%s: the overlay's data file is gone: %w", c.Dir, err)
			}
			d.present, d.zero = m.present, m.zero
		}
	} else {
		// A volatile overlay starts empty, whatever a crash left.
		flags |= os.O_TRUNC
		os.Remove(bitmapPath)
	}
	if d.f, err = os.OpenFile(filepath.Join(c.Dir, "overlay"), flags, 0o600); err != nil {
		return nil, fmt.Errorf("option %q: %w", keyDir, err)
	}
	if err := d.f.Truncate(int64(d.size)); err != nil {
		return nil, fmt.Errorf("overlay file: %w", err)
	}
	ok = true
	klog.V(2).InfoS("cow overlay opened", "dir", c.Dir, "block", c.Block, "persist", c.Persist, "size", d.size)
	return d, nil
}

func (d *Device) closeFiles() {
	if d.f != nil {
		d.f.Close()
	}
	if d.lock != nil {
		d.lock.Close()
	}
}

func (d *Device) Size() uint64 {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	return d.size
}

// Caps: writable whatever the origin; zeroing is a bitmap change, so it
// is fast; Flush matters only for a persistent overlay (FUA is emulated
// with it), and only a persistent overlay over a lasting origin outlives
// the process.
func (d *Device) Caps() backends.Caps {
	oc := d.origin.Caps()
	return backends.Caps{
		Flush: d.persist, Trim: true, Zero: true, FastZero: true, Extents: true,
		Cache: oc.Cache, MultiConn: true, Rotational: oc.Rotational,
		MinBlock: oc.MinBlock, PrefBlock: oc.PrefBlock, MaxBlock: oc.MaxBlock,
		// A volatile overlay is discarded by the next open.
		Volatile: !d.persist || oc.Volatile,
	}
}

func (d *Device) check(off, n uint64) error {
	if off > d.size || n > d.size-off {
		return fmt.Errorf("cow: range %d+%d beyond size %d: %w", off, n, d.size, backends.ErrInvalid)
	}
	return nil
}

func (d *Device) blockEnd(b uint64) uint64 { return min(d.size, (b+1)<<d.shift) }

// block states
const (
	inOrigin = iota
	inOverlay
	isZero
)

func (d *Device) stateLocked(b uint64) int {
	switch {
	case !d.present.get(b):
		return inOrigin
	case d.zero.get(b):
		return isZero
	}
	return inOverlay
}

// runs calls fn for each maximal run of blocks in one state within
// [off, end), clipped to the range.
func (d *Device) runs(off, end uint64, fn func(state int, lo, hi uint64) error) error {
	d.mu.RLock()
	type run struct {
		state  int
		lo, hi uint64
	}
	var rs []run
	for pos := off; pos < end; {
		b := pos >> d.shift
		st := d.stateLocked(b)
		hi := min(end, d.blockEnd(b))
		if n := len(rs); n > 0 && rs[n-1].state == st {
			rs[n-1].hi = hi
		} else {
			rs = append(rs, run{st, pos, hi})
		}
		pos = hi
	}
	d.mu.RUnlock()
	for _, r := range rs {
		if err := fn(r.state, r.lo, r.hi); err != nil {
			return err
		}
	}
	return nil
}

// ReadAt merges overlay and origin block by block.
func (d *Device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	return d.runs(off, off+uint64(len(p)), func(st int, lo, hi uint64) error {
		q := p[lo-off : hi-off]
		switch st {
		case inOrigin:
			return d.origin.ReadAt(ctx, q, lo)
		case isZero:
			clear(q)
			return nil
		}
		if _, err := d.f.ReadAt(q, int64(lo)); err != nil {
			return fmt.Errorf("overlay file: %w", err)
		}
		return nil
	})
}

// WriteAt writes into the overlay, copying partly written blocks up from
// the origin first.
func (d *Device) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	end := off + uint64(len(p))
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	if len(p) > 0 {
		if err := d.write(ctx, p, off, end); err != nil {
			return err
		}
	}
	if fua {
		return d.flush()
	}
	return nil
}

func (d *Device) write(ctx context.Context, p []byte, off, end uint64) error {
	// Fast path: every block already in the overlay as data needs no
	// copy-up and no bitmap change.
	d.mu.RLock()
	all := true
	for b := off >> d.shift; b<<d.shift < end; b++ {
		if d.stateLocked(b) != inOverlay {
			all = false
			break
		}
	}
	d.mu.RUnlock()
	if all {
		return d.pwrite(p, off)
	}
	for pos := off; pos < end; {
		b := pos >> d.shift
		hi := min(end, d.blockEnd(b))
		if err := d.writeBlock(ctx, b, p[pos-off:hi-off], pos); err != nil {
			return err
		}
		pos = hi
	}
	return nil
}

// writeBlock writes q at pos, all inside block b.
func (d *Device) writeBlock(ctx context.Context, b uint64, q []byte, pos uint64) error {
	l := &d.locks[b%stripes]
	l.Lock()
	defer l.Unlock()
	d.mu.RLock()
	st := d.stateLocked(b)
	d.mu.RUnlock()
	bs, be := b<<d.shift, d.blockEnd(b)
	if st == inOrigin && (pos != bs || pos+uint64(len(q)) != be) {
		// Copy up: the block's other bytes come from the origin.
		buf := make([]byte, be-bs)
		if err := d.origin.ReadAt(ctx, buf, bs); err != nil {
			return err
		}
		copy(buf[pos-bs:], q)
		q, pos = buf, bs
	}
	// A zero block is a hole in the file: its other bytes already read
	// as zeros.
	if err := d.pwrite(q, pos); err != nil {
		return err
	}
	if st != inOverlay {
		d.mu.Lock()
		d.present.set(b, true)
		d.zero.set(b, false)
		d.changed = true
		d.mu.Unlock()
	}
	return nil
}

func (d *Device) pwrite(p []byte, off uint64) error {
	if _, err := d.f.WriteAt(p, int64(off)); err != nil {
		return fmt.Errorf("overlay file: %w", err)
	}
	return nil
}

// Flush saves a persistent overlay (data first, then the bitmaps that
// point at it); a volatile one has nothing to make durable.
func (d *Device) Flush(context.Context) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	return d.flush()
}

func (d *Device) flush() error {
	if !d.persist {
		return nil
	}
	if err := d.f.Sync(); err != nil {
		return fmt.Errorf("overlay file: %w", err)
	}
	d.mu.Lock()
	if !d.changed {
		d.mu.Unlock()
		return nil
	}
	m := savedMap{block: d.bs, size: d.size, present: append(bitset(nil), d.present...), zero: append(bitset(nil), d.zero...)}
	d.changed = false
	d.mu.Unlock()
	if err := saveBitmap(filepath.Join(d.dir, "bitmap"), m); err != nil {
		d.mu.Lock()
		d.changed = true
		d.mu.Unlock()
		return err
	}
	return nil
}

// Trim is Zero: the overlay cannot fall back to the origin's bytes.
func (d *Device) Trim(ctx context.Context, off, length uint64, fua bool) error {
	return backends.TrimAsZero(ctx, d, off, length, fua)
}

// Zero marks whole blocks as zeros (a hole, no origin read); partly
// covered blocks are written with zeros, copying up as needed, unless
// ZeroFast asks not to wait for the origin.
func (d *Device) Zero(ctx context.Context, off, length uint64, flags backends.ZeroFlags) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	if err := d.check(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	end := off + length
	if flags&backends.ZeroFast != 0 {
		d.mu.RLock()
		for _, b := range []uint64{off >> d.shift, (end - 1) >> d.shift} {
			partial := off > b<<d.shift || end < d.blockEnd(b)
			if partial && d.stateLocked(b) == inOrigin {
				d.mu.RUnlock()
				return backends.ErrNotSupported
			}
		}
		d.mu.RUnlock()
	}
	for pos := off; pos < end; {
		b := pos >> d.shift
		bs, be := b<<d.shift, d.blockEnd(b)
		hi := min(end, be)
		if pos == bs && hi == be {
			if err := d.zeroBlock(b); err != nil {
				return err
			}
		} else {
			d.mu.RLock()
			st := d.stateLocked(b)
			d.mu.RUnlock()
			if st != isZero {
				if err := d.writeBlock(ctx, b, make([]byte, hi-pos), pos); err != nil {
					return err
				}
			}
		}
		pos = hi
	}
	if flags&backends.ZeroFUA != 0 {
		return d.flush()
	}
	return nil
}

func (d *Device) zeroBlock(b uint64) error {
	l := &d.locks[b%stripes]
	l.Lock()
	defer l.Unlock()
	// The bitmap first: from now on reads of the block give zeros without
	// looking at the file.
	d.mu.Lock()
	d.present.set(b, true)
	d.zero.set(b, true)
	d.changed = true
	d.mu.Unlock()
	bs := b << d.shift
	err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(bs), int64(d.blockEnd(b)-bs))
	if err != nil {
		// Without hole punching the block must still read as zeros once
		// written to later.
		return d.pwrite(make([]byte, d.blockEnd(b)-bs), bs)
	}
	return nil
}

// Extents reports overlay data as data, zeroed blocks as holes of zeros,
// and the origin's extents elsewhere.
func (d *Device) Extents(ctx context.Context, off, length uint64, add func(backends.Extent)) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	if err := d.check(off, length); err != nil {
		return err
	}
	if length == 0 {
		return d.origin.Extents(ctx, off, 0, add)
	}
	m := backends.ExtentMerger{Add: add}
	errStop := errors.New("stop")
	err := d.runs(off, off+length, func(st int, lo, hi uint64) error {
		switch st {
		case inOverlay:
			m.Emit(hi-lo, 0)
			return nil
		case isZero:
			m.Emit(hi-lo, backends.ExtentHole|backends.ExtentZero)
			return nil
		}
		n, err := backends.ClipExtents(ctx, d.origin, lo, hi-lo, m.Emit)
		if err != nil {
			return err
		}
		if n < hi-lo {
			return errStop // the origin stopped early: so do we
		}
		return nil
	})
	if err != nil && err != errStop {
		return err
	}
	m.Flush()
	return nil
}

// Cache passes prefetch hints to the origin.
func (d *Device) Cache(ctx context.Context, off, length uint64) error {
	return d.origin.Cache(ctx, off, length)
}

// Resize grows the origin (if it can) and the overlay with it.
func (d *Device) Resize(ctx context.Context, size uint64) error {
	d.sizeMu.Lock()
	defer d.sizeMu.Unlock()
	if grew, err := backends.GrowFilter(ctx, d.origin, d.f, d.size, size, "cow", "overlay file"); !grew {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// An old short last block held in the overlay reads zeros past the old
	// end, as a grown origin does there.
	n := (size + d.bs - 1) >> d.shift
	d.present, d.zero = d.present.grow(n), d.zero.grow(n)
	d.size = size
	d.changed = true
	return nil
}

// Close saves a persistent overlay or deletes a volatile one, then closes
// the origin.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	var errs []error
	if d.persist {
		errs = append(errs, d.flush())
	}
	d.f.Close()
	d.f = nil
	if !d.persist {
		for _, n := range []string{"overlay", "bitmap"} {
			if err := os.Remove(filepath.Join(d.dir, n)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	d.closeFiles()
	errs = append(errs, d.origin.Close())
	return errors.Join(errs...)
}

// Unwrap returns the origin under the overlay.
func (d *Device) Unwrap() backends.Device { return d.origin }
