// Package readahead is the readahead filter (Order 20, above the cache
// filter): it detects sequential read streams and reads ahead of them.
//
// Keys:
//
//	readahead=true      turn the filter on (readahead-max alone does too)
//	readahead-max=SIZE  largest readahead window (default 4Mi)
//
// Up to eight streams are tracked at once (nbdcopy with several
// connections, or several readers of one volume). A read that lands near
// where a stream's last read ended continues that stream; any other read
// starts a new one, replacing the least recently used. From a stream's
// second read on, the filter keeps about one window of data requested
// ahead of the reader; each request doubles the window, from 64 KiB up to
// readahead-max. Random reads never continue a stream, so they cause no
// readahead.
//
// Where the data goes: if the spec stacks the cache filter below and it
// reports Caps.Cache, readahead is a Cache call on it, and reads go down as
// usual to find the data there. Otherwise (including over a backend that
// reports Caps.Cache itself, such as nbd:, whose Cache only warms the
// remote server) the filter reads ahead into its own
// window buffers (at most four times readahead-max per volume) and answers
// reads from them; a buffer is dropped once read through, or when a write,
// trim or zero overlaps it. A read issued after a write has returned never
// sees data from before the write.
package readahead

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// Option keys.
const (
	KeyEnable = "readahead"
	KeyMax    = "readahead-max"
)

const (
	// MinWindow is a stream's first readahead (or readahead-max if
	// smaller).
	MinWindow = 64 << 10
	// DefaultMax is the default largest window.
	DefaultMax = 4 << 20
	// Bounds on readahead-max.
	LowestMax  = 4 << 10
	HighestMax = 256 << 20

	order = 20 // in the filter stack: above cache (10), below cow (30)

	maxStreams = 8
	// maxPrefetches bounds the readaheads in flight per volume; a stream
	// that would exceed it waits for its next read to try again.
	maxPrefetches = 4
	// budgetWindows is the window memory per volume, in readahead-max.
	budgetWindows = 4
)

func init() {
	backends.RegisterFilter(backends.Filter{
		Name:  "readahead",
		Order: order,
		Options: []backends.Option{
			{Key: KeyEnable, Kind: backends.OptBool,
				Doc: "true turns on readahead of sequential reads."},
			{Key: KeyMax, Kind: backends.OptSize, Default: backends.FormatSize(DefaultMax),
				Doc: "Largest readahead window; windows grow from 64Ki while a stream stays sequential."},
		},
		Enabled: func(s backends.Spec) bool {
			if v, ok := s.Options[KeyEnable]; ok {
				return v == "true" || hasMax(s)
			}
			return hasMax(s)
		},
		Validate: func(s backends.Spec) error {
			_, err := parseMax(s)
			return err
		},
		Wrap: func(_ context.Context, s backends.Spec, _ backends.Env, inner backends.Device) (backends.Device, error) {
			max, err := parseMax(s)
			if err != nil {
				return nil, err
			}
			if cacheBelow(s) && inner.Caps().Cache {
				return NewOverCache(inner, max), nil
			}
			return New(inner, max), nil
		},
	})
}

// cacheBelow reports whether spec s stacks a filter under readahead. The
// order is fixed, so that is the cache filter. Caps.Cache alone does not
// tell: a remote backend (nbd:) forwards Cache to its server, which keeps
// nothing for us, so readahead into it would gain nothing.
func cacheBelow(s backends.Spec) bool {
	for _, f := range backends.Filters() {
		if f.Order < order && f.On(s) {
			return true
		}
	}
	return false
}

func hasMax(s backends.Spec) bool {
	_, ok := s.Options[KeyMax]
	return ok
}

// parseMax returns readahead-max; errors name the key.
func parseMax(s backends.Spec) (uint64, error) {
	if v, ok := s.Options[KeyEnable]; ok && v == "false" && hasMax(s) {
		return 0, fmt.Errorf("option %q: readahead=false contradicts option %q", KeyEnable, KeyMax)
	}
	max, ok := s.Size(KeyMax)
	if !ok {
		return 0, fmt.Errorf("option %q: invalid size %q", KeyMax, s.Options[KeyMax])
	}
	if max < LowestMax || max > HighestMax {
		return 0, fmt.Errorf("option %q: %s is not between %s and %s", KeyMax,
			backends.FormatSize(max), backends.FormatSize(LowestMax), backends.FormatSize(HighestMax))
	}
	return max, nil
}

// Stats are running totals since open.
type Stats struct {
	Prefetches    uint64 // readaheads issued (window reads or Cache calls)
	PrefetchBytes uint64 // bytes they asked for
	HitBytes      uint64 // read bytes answered from the window
	Invalidated   uint64 // window buffers dropped because a write overlapped
}

// Device is the readahead filter over an inner device.
type Device struct {
	inner    backends.Device
	useCache bool // read ahead with Cache calls into the cache below
	max      uint64
	budget   uint64

	mu      sync.Mutex
	streams [maxStreams]stream
	tick    uint64
	segs    []*segment // window buffers, oldest first
	held    uint64     // bytes in segs

	ctx    context.Context // cancelled by Close: stops readaheads
	cancel context.CancelFunc
	wg     sync.WaitGroup
	sem    chan struct{}

	prefetches, prefetchBytes, hitBytes, invalidated atomic.Uint64
}

// stream is one sequential reader.
type stream struct {
	used   uint64 // d.tick when last continued; 0: free slot
	start  uint64 // lowest offset read in the stream
	pos    uint64 // furthest end of a read in the stream
	ahead  uint64 // readahead requested up to here
	window uint64 // size of the next readahead
	hits   int    // reads in the stream
}

// segment is one window buffer: data of [off, off+len(data)) being read
// (done open) or read.
type segment struct {
	off    uint64
	data   []byte
	done   chan struct{}
	err    error  // set before done closes
	valid  bool   // in d.segs and not overlapped by a write; d.mu
	served uint64 // bytes answered from it; d.mu
}

func (s *segment) end() uint64 { return s.off + uint64(len(s.data)) }

var (
	_ backends.Device  = (*Device)(nil)
	_ backends.Resizer = (*Device)(nil)
)

// New wraps inner with readahead into the filter's own window buffers of
// up to max bytes each.
func New(inner backends.Device, max uint64) *Device { return newDevice(inner, max, false) }

// NewOverCache wraps inner, a caching device (the cache filter), with
// readahead that asks inner to cache the data ahead (Device.Cache) and
// lets reads find it there.
func NewOverCache(inner backends.Device, max uint64) *Device { return newDevice(inner, max, true) }

func newDevice(inner backends.Device, max uint64, useCache bool) *Device {
	ctx, cancel := context.WithCancel(context.Background())
	return &Device{
		inner: inner, useCache: useCache,
		max: max, budget: budgetWindows * max,
		ctx: ctx, cancel: cancel, sem: make(chan struct{}, maxPrefetches),
	}
}

// Stats returns the running totals.
func (d *Device) Stats() Stats {
	return Stats{
		Prefetches: d.prefetches.Load(), PrefetchBytes: d.prefetchBytes.Load(),
		HitBytes: d.hitBytes.Load(), Invalidated: d.invalidated.Load(),
	}
}

// Unwrap returns the wrapped device.
func (d *Device) Unwrap() backends.Device { return d.inner }

func (d *Device) Size() uint64        { return d.inner.Size() }
func (d *Device) Caps() backends.Caps { return d.inner.Caps() }

// ReadAt notes the read in its stream, starts any readahead it calls for,
// and answers it from the window where it can.
func (d *Device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if len(p) == 0 {
		return d.inner.ReadAt(ctx, p, off)
	}
	d.mu.Lock()
	d.observe(off, uint64(len(p)))
	// With no window buffers (random reads, or readahead into the cache
	// below), the read goes down without locking again to look for one.
	direct := d.useCache || len(d.segs) == 0
	d.mu.Unlock()
	if direct {
		return d.inner.ReadAt(ctx, p, off)
	}
	return d.readWindow(ctx, p, off)
}

// observe continues the stream the read belongs to, or starts one, and
// reads ahead if the stream is sequential; d.mu is held.
func (d *Device) observe(off, n uint64) {
	d.tick++
	s := d.match(off, n)
	if s == nil {
		s = d.lru()
		*s = stream{start: off, pos: off + n, ahead: off + n, window: min(MinWindow, d.max), hits: 1}
		s.used = d.tick
		return
	}
	s.used = d.tick
	s.hits++
	s.start = min(s.start, off)
	s.pos = max(s.pos, off+n)
	d.merge(s, n)
	if s.ahead >= s.pos+s.window {
		return
	}
	start := max(s.ahead, s.pos)
	size := d.inner.Size()
	if start >= size {
		return
	}
	length := min(s.window, size-start)
	if !d.prefetch(start, length) {
		return
	}
	s.ahead = start + length
	s.window = min(2*s.window, d.max)
}

// match finds the stream a read continues. A stream of one read is
// continued only by a read right after or right before it (the classic
// test, which random reads practically never pass); a longer one by any
// read near its end, so that the requests of one reader arriving out of
// order over several connections still count as sequential.
func (d *Device) match(off, n uint64) *stream {
	for i := range d.streams {
		s := &d.streams[i]
		switch {
		case s.used == 0:
		case s.hits == 1:
			if off == s.pos || off+n == s.start {
				return s
			}
		default:
			tol := min(max(MinWindow, 4*n), d.max)
			if off+tol >= s.pos && off <= s.pos+tol {
				return s
			}
		}
	}
	return nil
}

// merge folds into s the streams whose heads are near its own: reads of
// one reader that started out as separate streams (their first requests
// arrived out of order) must not read ahead twice. A stream over the
// same range long ago (an earlier pass) has its head elsewhere and is
// left to age out; d.mu is held.
func (d *Device) merge(s *stream, n uint64) {
	tol := min(max(MinWindow, 4*n), d.max)
	for i := range d.streams {
		t := &d.streams[i]
		if t == s || t.used == 0 || t.pos+tol < s.pos || s.pos+tol < t.pos {
			continue
		}
		s.start, s.pos = min(s.start, t.start), max(s.pos, t.pos)
		s.ahead = max(s.ahead, t.ahead)
		s.window = max(s.window, t.window)
		s.hits += t.hits
		*t = stream{}
	}
}

func (d *Device) lru() *stream {
	var old *stream
	for i := range d.streams {
		s := &d.streams[i]
		if old == nil || s.used < old.used {
			old = s
		}
	}
	return old
}

// prefetch starts reading [off, off+length) ahead, unless too many
// readaheads are in flight or (for the window) there is no room; d.mu is
// held.
func (d *Device) prefetch(off, length uint64) bool {
	select {
	case d.sem <- struct{}{}:
	default:
		return false
	}
	var seg *segment
	if !d.useCache {
		d.reclaim(length)
		if d.held+length > d.budget {
			<-d.sem
			return false
		}
		seg = &segment{off: off, data: make([]byte, length), done: make(chan struct{}), valid: true}
		d.segs = append(d.segs, seg)
		d.held += length
	}
	d.prefetches.Add(1)
	d.prefetchBytes.Add(length)
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer func() { <-d.sem }()
		if seg == nil {
			// The cache below fetches and keeps it; errors only mean
			// the reads will go to the origin after all.
			_ = d.inner.Cache(d.ctx, off, length)
			return
		}
		seg.err = d.inner.ReadAt(d.ctx, seg.data, off)
		close(seg.done)
		if seg.err != nil {
			d.mu.Lock()
			d.drop(seg)
			d.mu.Unlock()
		}
	}()
	return true
}

// reclaim drops the oldest finished buffers until length more bytes fit
// in the budget; d.mu is held.
func (d *Device) reclaim(length uint64) {
	for i := 0; i < len(d.segs) && d.held+length > d.budget; {
		seg := d.segs[i]
		select {
		case <-seg.done:
			d.drop(seg)
		default:
			i++
		}
	}
}

// drop removes seg from the window; d.mu is held.
func (d *Device) drop(seg *segment) {
	if !seg.valid {
		return
	}
	seg.valid = false
	if i := slices.Index(d.segs, seg); i >= 0 {
		d.segs = slices.Delete(d.segs, i, i+1)
		d.held -= uint64(len(seg.data))
	}
}

// find returns the valid buffer holding off, or nil and where the next
// buffer after off starts (limit if none does before it); d.mu is held.
func (d *Device) find(off, limit uint64) (*segment, uint64) {
	next := limit
	for _, seg := range d.segs {
		if seg.off <= off && off < seg.end() {
			return seg, 0
		}
		if seg.off > off && seg.off < next {
			next = seg.off
		}
	}
	return nil, next
}

// readWindow answers a read piece by piece: from window buffers where
// they hold it (waiting for one still being read), from the inner device
// elsewhere.
func (d *Device) readWindow(ctx context.Context, p []byte, off uint64) error {
	for len(p) > 0 {
		end := off + uint64(len(p))
		d.mu.Lock()
		seg, next := d.find(off, end)
		d.mu.Unlock()
		if seg == nil {
			n := next - off
			if err := d.inner.ReadAt(ctx, p[:n], off); err != nil {
				return err
			}
			p, off = p[n:], next
			continue
		}
		select {
		case <-seg.done:
		case <-ctx.Done():
			return fmt.Errorf("readahead: waiting for window: %w", ctx.Err())
		}
		n := min(end, seg.end()) - off
		d.mu.Lock()
		ok := seg.valid && seg.err == nil
		if ok {
			copy(p[:n], seg.data[off-seg.off:])
			seg.served += n
			if seg.served >= uint64(len(seg.data)) {
				d.drop(seg) // read through: a sequential reader is past it
			}
		}
		d.mu.Unlock()
		if ok {
			d.hitBytes.Add(n)
		} else if err := d.inner.ReadAt(ctx, p[:n], off); err != nil {
			// Overlapped by a write (or failed): read it afresh.
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// invalidate drops every buffer overlapping [off, off+length), including
// ones still being read: called after a write has reached the inner
// device, so any buffer that might hold older data is gone before the
// write returns, and any later readahead reads the new data.
func (d *Device) invalidate(off, length uint64) {
	if d.useCache {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := 0; i < len(d.segs); {
		seg := d.segs[i]
		if seg.off < off+length && off < seg.end() {
			d.drop(seg)
			d.invalidated.Add(1)
			continue
		}
		i++
	}
}

func (d *Device) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	err := d.inner.WriteAt(ctx, p, off, fua)
	d.invalidate(off, uint64(len(p)))
	return err
}

func (d *Device) Trim(ctx context.Context, off, length uint64, fua bool) error {
	err := d.inner.Trim(ctx, off, length, fua)
	d.invalidate(off, length)
	return err
}

func (d *Device) Zero(ctx context.Context, off, length uint64, flags backends.ZeroFlags) error {
	err := d.inner.Zero(ctx, off, length, flags)
	d.invalidate(off, length)
	return err
}

func (d *Device) Flush(ctx context.Context) error { return d.inner.Flush(ctx) }

func (d *Device) Extents(ctx context.Context, off, length uint64, add func(backends.Extent)) error {
	return d.inner.Extents(ctx, off, length, add)
}

// Cache forwards a client's hint to the device below.
func (d *Device) Cache(ctx context.Context, off, length uint64) error {
	return d.inner.Cache(ctx, off, length)
}

// Resize forwards to the inner device; readahead is clipped to the size
// at the time it starts, so nothing else needs adjusting.
func (d *Device) Resize(ctx context.Context, size uint64) error {
	return backends.Resize(ctx, d.inner, size)
}

// Close stops readahead in flight and closes the inner device.
func (d *Device) Close() error {
	d.cancel()
	d.wg.Wait()
	return d.inner.Close()
}
