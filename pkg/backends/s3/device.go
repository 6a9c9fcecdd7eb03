package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// writebackAge is how long a written chunk may wait in memory for the
// rest of its bytes before it is uploaded anyway.
const writebackAge = time.Second

// Device is an open s3 volume. It is safe for concurrent use.
type Device struct {
	cfg     *config
	b       *bucket
	lease   *lease // nil when read-only or lease-ttl=0
	chunk   uint64
	size    atomic.Uint64
	present *chunkSet     // chunk objects in the bucket
	sem     chan struct{} // one token per S3 request in flight
	bufs    sync.Pool     // chunk-sized []byte

	resizeMu sync.Mutex

	mu        sync.Mutex
	entries   map[uint64]*entry // chunks in memory: being written or not yet uploaded
	dirty     int               // entries with data not in the bucket
	maxDirty  int               // in chunks; 0 = write-through
	changed   chan struct{}     // closed (and replaced) when dirty falls or an upload fails
	uploadErr error             // the last upload's error, nil once one succeeds
	closing   bool

	bg       context.Context // for uploads not tied to a request
	cancelBg context.CancelFunc
	uploads  sync.WaitGroup
	stop     chan struct{}
	flusher  chan struct{} // closed when the flusher has stopped
	closed   atomic.Bool
	regKey   string
}

// entry is one chunk held in memory. Lock order: up, then mu, then
// Device.mu.
type entry struct {
	idx  uint64
	up   sync.Mutex // serialises uploads (and whole-chunk zeroing) of the chunk
	mu   sync.Mutex // guards data
	data []byte     // the whole chunk, nil until loaded

	// Guarded by Device.mu.
	refs    int
	dirty   bool
	gen     uint64    // bumped by every change of data
	written uint64    // bytes written since the last upload started
	since   time.Time // when it became dirty
	queued  bool      // an asynchronous upload is pending
}

var _ backends.Device = (*Device)(nil)
var _ backends.Resizer = (*Device)(nil)

// openWriters keeps one read-write Device per volume and owner in this
// process: two would share the lease and corrupt each other's chunks.
// (Other owners meet the lease, as they would in other processes.)
var openWriters = struct {
	sync.Mutex
	m map[string]bool
}{m: map[string]bool{}}

// Open opens the volume s names, creating its metadata if the prefix has
// none (option size is then required). A read-write open takes the lease
// for env.Owner.
func Open(ctx context.Context, s backends.Spec, env backends.Env) (*Device, error) {
	c, err := parseConfig(s)
	if err != nil {
		return nil, err
	}
	d := &Device{cfg: c, present: newChunkSet(),
		sem: make(chan struct{}, c.parallel), entries: map[uint64]*entry{},
		changed: make(chan struct{}), stop: make(chan struct{}), flusher: make(chan struct{})}
	if !c.readOnly {
		d.regKey = c.endpoint + "\x00" + c.loc.String() + "\x00" + env.Owner
		openWriters.Lock()
		busy := openWriters.m[d.regKey]
		openWriters.m[d.regKey] = true
		openWriters.Unlock()
		if busy {
			d.regKey = ""
			return nil, fmt.Errorf("%w: %s is already open read-write in this process: %w", ErrLeased, c.loc, syscall.EBUSY)
		}
	}
	if err := d.open(ctx, env); err != nil {
		d.unregister()
		return nil, err
	}
	d.bg, d.cancelBg = context.WithCancel(context.Background())
	go d.flushLoop()
	return d, nil
}

func (d *Device) unregister() {
	if d.regKey != "" {
		openWriters.Lock()
		delete(openWriters.m, d.regKey)
		openWriters.Unlock()
	}
}

func (d *Device) open(ctx context.Context, env backends.Env) error {
	c := d.cfg
	b, err := newBucket(ctx, c, env)
	if err != nil {
		return err
	}
	d.b = b
	m, _, err := b.readMeta(ctx)
	if errors.Is(err, ErrNotFound) && !c.readOnly {
		var created bool
		m, created, err = b.createMeta(ctx, c)
		if created {
			klog.Background().Info("s3 volume created", "volume", c.loc.String(), "size", m.Size, "chunk", m.ChunkSize)
		}
	}
	if err != nil {
		return err
	}
	if err := m.check(c); err != nil {
		return err
	}
	d.size.Store(m.Size)
	d.chunk = m.ChunkSize
	d.maxDirty = int(c.writeback / d.chunk)
	if c.writeback > 0 && d.maxDirty < 2 {
		d.maxDirty = 2
	}
	d.bufs.New = func() any { return make([]byte, d.chunk) }
	if !c.readOnly && c.leaseTTL > 0 {
		owner := env.Owner
		if owner == "" {
			h, _ := os.Hostname()
			owner = fmt.Sprintf("%s/%d", h, os.Getpid())
		}
		if d.lease, err = acquireLease(ctx, b, owner, c.leaseTTL); err != nil {
			return err
		}
	}
	// Which chunks exist, listed once: from here on this writer is the
	// only one changing them and keeps the set up to date.
	prefix := c.loc.key(chunkDir)
	err = b.list(ctx, prefix, func(key string) error {
		if i, ok := parseChunkKey(strings.TrimPrefix(key, prefix)); ok {
			d.present.set(i, true)
		}
		return nil
	})
	if err != nil {
		if d.lease != nil {
			err = errors.Join(err, d.lease.release(context.Background()))
		}
		return err
	}
	return nil
}

// chunkKey names chunk i: 16 hex digits, so keys list in chunk order.
func (d *Device) chunkKey(i uint64) string {
	return d.b.loc.key(chunkDir + fmt.Sprintf("%016x", i))
}

func parseChunkKey(name string) (uint64, bool) {
	if len(name) != 16 {
		return 0, false
	}
	i, err := strconv.ParseUint(name, 16, 64)
	return i, err == nil
}

func (d *Device) Size() uint64 { return d.size.Load() }

// Caps: every connection shares this Device, and Flush uploads what any of
// them wrote, so multi-conn is safe. Nothing here is fast: every miss is
// a network round trip.
func (d *Device) Caps() backends.Caps {
	return backends.Caps{
		ReadOnly: d.cfg.readOnly,
		Flush:    true, FUA: true, Trim: true, Zero: true, FastZero: true,
		Extents: true, MultiConn: true,
		// The write-back buffer (writeback > 0) lives in memory.
		BufferedWrites: !d.cfg.readOnly && d.maxDirty > 0,
	}
}

// piece is the part of a request that falls in one chunk.
type piece struct {
	idx uint64
	off uint64 // within the chunk
	n   uint64
	at  uint64 // offset within the request
}

func (d *Device) pieces(off, n uint64) []piece {
	ps := make([]piece, 0, (off%d.chunk+n+d.chunk-1)/d.chunk)
	for at := uint64(0); at < n; {
		o := off + at
		in := o % d.chunk
		l := min(n-at, d.chunk-in)
		ps = append(ps, piece{idx: o / d.chunk, off: in, n: l, at: at})
		at += l
	}
	return ps
}

// each runs fn on every piece, in parallel (bounded) when there are
// several.
func (d *Device) each(ctx context.Context, ps []piece, fn func(context.Context, piece) error) error {
	if len(ps) == 1 {
		return fn(ctx, ps[0])
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(d.cfg.parallel)
	for _, p := range ps {
		g.Go(func() error { return fn(gctx, p) })
	}
	return g.Wait()
}

func (d *Device) check(off, n uint64) error {
	if size := d.Size(); off > size || n > size-off {
		return fmt.Errorf("s3: range %d+%d beyond size %d: %w", off, n, size, backends.ErrInvalid)
	}
	return nil
}

// writable says whether this Device may change the bucket now.
func (d *Device) writable() error {
	if d.cfg.readOnly {
		return backends.ErrReadOnly
	}
	if d.lease != nil {
		return d.lease.check()
	}
	return nil
}

// request runs fn holding one of the tokens that bound S3 requests.
func (d *Device) request(ctx context.Context, fn func() error) error {
	select {
	case d.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-d.sem }()
	return fn()
}

// acquire returns the entry for chunk idx, creating it, with a reference.
func (d *Device) acquire(idx uint64) *entry {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.entries[idx]
	if e == nil {
		e = &entry{idx: idx}
		d.entries[idx] = e
	}
	e.refs++
	return e
}

// lookup returns chunk idx's entry with a reference, or nil.
func (d *Device) lookup(idx uint64) *entry {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.entries[idx]
	if e != nil {
		e.refs++
	}
	return e
}

// release drops a reference; a clean entry nobody uses leaves memory.
func (d *Device) release(e *entry) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e.refs--
	if e.refs == 0 && !e.dirty {
		if d.entries[e.idx] == e {
			delete(d.entries, e.idx)
		}
		if e.data != nil {
			d.bufs.Put(e.data)
			e.data = nil
		}
	}
}

// notify wakes writers waiting for buffer space. d.mu is held.
func (d *Device) notify() {
	close(d.changed)
	d.changed = make(chan struct{})
}

// ReadAt reads from chunks in memory, else with ranged GETs of the chunk
// objects (in parallel across chunks); absent chunks read as zeros.
func (d *Device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	return d.each(ctx, d.pieces(off, uint64(len(p))), func(ctx context.Context, pc piece) error {
		return d.readPiece(ctx, pc.idx, p[pc.at:pc.at+pc.n], pc.off)
	})
}

func (d *Device) readPiece(ctx context.Context, idx uint64, p []byte, off uint64) error {
	if e := d.lookup(idx); e != nil {
		e.mu.Lock()
		ok := e.data != nil
		if ok {
			copy(p, e.data[off:])
		}
		e.mu.Unlock()
		d.release(e)
		if ok {
			return nil
		}
	}
	if !d.present.has(idx) {
		clear(p)
		return nil
	}
	return d.request(ctx, func() error {
		_, err := d.b.get(ctx, d.chunkKey(idx), p, off)
		return err
	})
}

// WriteAt merges p into the chunks in memory (reading a partly written
// chunk from the bucket first), then leaves them to the write-back
// machinery, or with fua (or writeback=0) uploads them before returning.
func (d *Device) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	if err := d.writable(); err != nil {
		return err
	}
	return d.each(ctx, d.pieces(off, uint64(len(p))), func(ctx context.Context, pc piece) error {
		return d.writePiece(ctx, pc, p[pc.at:pc.at+pc.n], fua)
	})
}

// writePiece writes src into one chunk; a nil src writes zeros.
func (d *Device) writePiece(ctx context.Context, pc piece, src []byte, fua bool) error {
	e, err := d.acquireForWrite(ctx, pc.idx)
	if err != nil {
		return err
	}
	defer d.release(e)
	e.mu.Lock()
	if e.data == nil {
		if err := d.load(ctx, e, pc.n == d.chunk); err != nil {
			d.mu.Lock()
			if e.dirty && e.data == nil { // our reservation, unused
				e.dirty = false
				d.dirty--
				d.notify()
			}
			d.mu.Unlock()
			e.mu.Unlock()
			return err
		}
	}
	if src == nil {
		clear(e.data[pc.off : pc.off+pc.n])
	} else {
		copy(e.data[pc.off:], src)
	}
	d.mu.Lock()
	if !e.dirty {
		e.dirty = true
		e.since = time.Now()
		d.dirty++
	}
	e.gen++
	e.written += pc.n
	full := e.written >= d.chunk
	d.mu.Unlock()
	e.mu.Unlock()
	if fua || d.maxDirty == 0 {
		return d.upload(ctx, e)
	}
	if full {
		// Most likely written over completely (sequential I/O): no
		// reason to wait for more.
		d.uploadAsync(e)
	}
	return nil
}

// load fills e.data (e.mu held) from the bucket, or with zeros for an
// absent chunk; whole says the caller overwrites all of it anyway.
func (d *Device) load(ctx context.Context, e *entry, whole bool) error {
	buf := d.bufs.Get().([]byte)
	switch {
	case whole:
	case !d.present.has(e.idx):
		clear(buf)
	default:
		err := d.request(ctx, func() error {
			_, err := d.b.get(ctx, d.chunkKey(e.idx), buf, 0)
			return err
		})
		if err != nil {
			d.bufs.Put(buf)
			return err
		}
	}
	e.data = buf
	return nil
}

// acquireForWrite returns chunk idx's entry, with a reference, once the
// write-back buffer has room for it: a chunk not yet dirty is marked
// dirty here (reserving its room) before any data is touched, so writers
// cannot overshoot the limit together. It fails instead of waiting when
// uploads are failing: the writer then learns the bucket is gone.
func (d *Device) acquireForWrite(ctx context.Context, idx uint64) (*entry, error) {
	if d.maxDirty == 0 {
		return d.acquire(idx), nil
	}
	for {
		d.mu.Lock()
		e := d.entries[idx]
		if (e != nil && e.dirty) || d.dirty < d.maxDirty {
			if e == nil {
				e = &entry{idx: idx}
				d.entries[idx] = e
			}
			if !e.dirty {
				e.dirty = true
				e.since = time.Now()
				d.dirty++
			}
			e.refs++
			d.mu.Unlock()
			return e, nil
		}
		ch, upErr := d.changed, d.uploadErr
		if upErr == nil {
			for _, e := range d.entries {
				if e.dirty {
					d.uploadAsyncLocked(e)
				}
			}
		}
		d.mu.Unlock()
		if upErr != nil {
			return nil, fmt.Errorf("s3: write-back buffer full and uploads failing: %w", upErr)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// upload makes chunk e's current contents durable: a PUT, or a DELETE if
// they are all zeros. It is a no-op for a clean chunk.
func (d *Device) upload(ctx context.Context, e *entry) error {
	e.up.Lock()
	defer e.up.Unlock()
	d.mu.Lock()
	dirty := e.dirty
	d.mu.Unlock()
	if !dirty {
		return nil
	}
	if err := d.writable(); err != nil {
		return err
	}
	e.mu.Lock()
	if e.data == nil {
		// Reserved by a writer that has not written yet: nothing
		// completed to upload (the writer will dirty it again).
		e.mu.Unlock()
		return nil
	}
	buf := d.bufs.Get().([]byte)
	defer d.bufs.Put(buf)
	copy(buf, e.data)
	d.mu.Lock()
	gen := e.gen
	e.written = 0
	d.mu.Unlock()
	e.mu.Unlock()

	zero := isZero(buf)
	err := d.request(ctx, func() error {
		if zero {
			if !d.present.has(e.idx) {
				return nil
			}
			return d.b.del(ctx, d.chunkKey(e.idx), cond{})
		}
		_, err := d.b.put(ctx, d.chunkKey(e.idx), buf, cond{})
		return err
	})
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		if d.uploadErr == nil {
			klog.Background().Error(err, "s3 upload failed; keeping the data in memory and retrying", "volume", d.cfg.loc.String())
		}
		d.uploadErr = err
		d.notify()
		return err
	}
	d.present.set(e.idx, !zero)
	if d.uploadErr != nil {
		klog.Background().Info("s3 uploads work again", "volume", d.cfg.loc.String())
	}
	d.uploadErr = nil
	if e.gen == gen {
		e.dirty = false
		d.dirty--
		d.notify()
	}
	return nil
}

// uploadAsync starts uploading e unless that is already pending.
func (d *Device) uploadAsync(e *entry) {
	d.mu.Lock()
	d.uploadAsyncLocked(e)
	d.mu.Unlock()
}

// uploadAsyncLocked is uploadAsync with d.mu held; it takes its own
// reference, so e cannot leave memory before its upload is done.
func (d *Device) uploadAsyncLocked(e *entry) {
	if e.queued || d.closing {
		return
	}
	e.queued = true
	e.refs++
	d.uploads.Add(1)
	go func() {
		defer d.uploads.Done()
		_ = d.upload(d.bg, e) // failures stay dirty: the flusher retries
		d.mu.Lock()
		e.queued = false
		d.mu.Unlock()
		d.release(e)
	}()
}

// flushLoop uploads chunks that have waited writebackAge, and retries
// failed uploads, until Close.
func (d *Device) flushLoop() {
	defer close(d.flusher)
	t := time.NewTicker(writebackAge / 2)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
		}
		d.mu.Lock()
		for _, e := range d.entries {
			if e.dirty && time.Since(e.since) >= writebackAge {
				d.uploadAsyncLocked(e)
			}
		}
		d.mu.Unlock()
	}
}

// Flush uploads every chunk written before it was called and not yet in
// the bucket, and returns the first failure (EIO), if any.
func (d *Device) Flush(ctx context.Context) error {
	d.mu.Lock()
	var todo []*entry
	for _, e := range d.entries {
		if e.dirty {
			e.refs++
			todo = append(todo, e)
		}
	}
	d.mu.Unlock()
	if len(todo) == 0 {
		return nil
	}
	errs := make([]error, len(todo))
	var wg sync.WaitGroup
	for i, e := range todo {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = d.upload(ctx, e)
			d.release(e)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return fmt.Errorf("s3: flush: %w", err)
		}
	}
	return nil
}

// Trim deletes the chunk objects the range covers whole and writes zeros
// into the partly covered ones, like Zero.
func (d *Device) Trim(ctx context.Context, off, length uint64, fua bool) error {
	return backends.TrimAsZero(ctx, d, off, length, fua)
}

// Zero: whole chunks lose their objects (a missing chunk reads as zeros,
// so ZeroNoHole cannot be kept and is ignored, as the protocol allows);
// partial chunks are written with zeros, unless they are holes already.
func (d *Device) Zero(ctx context.Context, off, length uint64, flags backends.ZeroFlags) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	if err := d.writable(); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	// Only chunks that exist or sit in memory need work: find them
	// without walking every index of a huge range.
	first, last := off/d.chunk, (off+length-1)/d.chunk
	var idxs []uint64
	d.mu.Lock()
	for i := range d.entries {
		if i >= first && i <= last {
			idxs = append(idxs, i)
		}
	}
	d.mu.Unlock()
	for i := first; i <= last; {
		i = d.present.next(i, last+1, false) // skip holes
		if i > last {
			break
		}
		idxs = append(idxs, i)
		i++
	}
	slices.Sort(idxs)
	idxs = slices.Compact(idxs)
	ps := make([]piece, 0, len(idxs))
	for _, i := range idxs {
		start, end := max(i*d.chunk, off), min((i+1)*d.chunk, off+length)
		ps = append(ps, piece{idx: i, off: start - i*d.chunk, n: end - start})
	}
	if len(ps) == 0 {
		return nil
	}
	return d.each(ctx, ps, func(ctx context.Context, pc piece) error {
		if pc.n == d.chunk {
			return d.zeroChunk(ctx, pc.idx)
		}
		if e := d.lookup(pc.idx); e == nil && !d.present.has(pc.idx) {
			return nil // a hole already
		} else if e != nil {
			d.release(e)
		}
		return d.writePiece(ctx, pc, nil, flags&backends.ZeroFUA != 0)
	})
}

// zeroChunk drops chunk idx: its object is deleted and any unsaved data
// in memory discarded. It is synchronous, so durable on return.
func (d *Device) zeroChunk(ctx context.Context, idx uint64) error {
	e := d.acquire(idx)
	defer d.release(e)
	e.up.Lock()
	defer e.up.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if d.present.has(idx) {
		err := d.request(ctx, func() error { return d.b.del(ctx, d.chunkKey(idx), cond{}) })
		if err != nil {
			return err
		}
		d.present.set(idx, false)
	}
	d.mu.Lock()
	if e.dirty {
		e.dirty = false
		d.dirty--
		d.notify()
	}
	e.gen++
	e.written = 0
	d.mu.Unlock()
	if e.data != nil {
		d.bufs.Put(e.data)
		e.data = nil
	}
	return nil
}

// Extents reports chunks with an object, or data in memory, as data and
// the others as holes reading as zeros. It may stop early on huge ranges.
func (d *Device) Extents(ctx context.Context, off, length uint64, add func(backends.Extent)) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	end := off + length
	if length == 0 {
		return nil
	}
	first, last := off/d.chunk, (end-1)/d.chunk
	d.mu.Lock()
	var mem []uint64
	for i := range d.entries {
		if i >= first && i <= last {
			mem = append(mem, i)
		}
	}
	d.mu.Unlock()
	slices.Sort(mem)
	isData := func(i uint64) bool {
		_, ok := slices.BinarySearch(mem, i)
		return ok || d.present.has(i)
	}
	pos := off
	for n := 0; pos < end && n < 4096; n++ {
		i := pos / d.chunk
		data := isData(i)
		j := i + 1
		if data {
			for j <= last && isData(j) {
				j++
			}
		} else {
			// Skip the hole in bounded steps, stopping at the next
			// chunk in memory.
			j = d.present.next(i, min(last+1, i+1<<22), false)
			if k, _ := slices.BinarySearch(mem, i); k < len(mem) && mem[k] < j {
				j = mem[k]
			}
			j = max(j, i+1)
		}
		stop := min(j*d.chunk, end)
		var f backends.ExtentFlags
		if !data {
			f = backends.ExtentHole | backends.ExtentZero
		}
		add(backends.Extent{Length: stop - pos, Flags: f})
		pos = stop
	}
	return nil
}

// Cache is a no-op: there is no read cache to fill (the cache filter is).
func (d *Device) Cache(context.Context, uint64, uint64) error { return nil }

// Resize grows the volume: the metadata's size first (conditionally, so a
// concurrent Expand is not undone), then the device's.
func (d *Device) Resize(ctx context.Context, size uint64) error {
	d.resizeMu.Lock()
	defer d.resizeMu.Unlock()
	cur := d.Size()
	switch {
	case size < cur:
		return fmt.Errorf("s3: cannot shrink %s from %d to %d bytes: %w", d.cfg.loc, cur, size, backends.ErrInvalid)
	case size == cur:
		return nil
	case size > maxVolume(d.chunk):
		return fmt.Errorf("s3: size %d is larger than the maximum %d: %w", size, maxVolume(d.chunk), backends.ErrInvalid)
	}
	m, etag, err := d.b.readMeta(ctx)
	if err != nil {
		return err
	}
	if m.Size < size {
		if err := d.writable(); err != nil {
			return err
		}
		m.Size = size
		if _, err := d.b.put(ctx, d.b.loc.key(metaName), m.encode(), cond{ifMatch: etag}); err != nil {
			if errors.Is(err, errPrecondition) {
				return fmt.Errorf("s3: %s: metadata changed during resize; try again: %w", d.cfg.loc, syscall.EAGAIN)
			}
			return err
		}
	}
	d.size.Store(size)
	return nil
}

// Close uploads what is still in memory, releases the lease and stops the
// background work. Data that cannot be uploaded is reported, then lost.
func (d *Device) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	close(d.stop)
	<-d.flusher
	err := d.Flush(context.Background())
	d.mu.Lock()
	d.closing = true
	d.mu.Unlock()
	d.uploads.Wait()
	d.cancelBg()
	if d.lease != nil {
		ctx, cancel := context.WithTimeout(context.Background(), d.cfg.timeout)
		err = errors.Join(err, d.lease.release(ctx))
		cancel()
	}
	d.unregister()
	if err != nil {
		return fmt.Errorf("s3: close %s: %w", d.cfg.loc, err)
	}
	return nil
}

// zeroPage is what isZero compares with; chunks are multiples of it.
var zeroPage [minChunk]byte

// isZero reports whether b is all zeros.
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroPage))
		if !bytes.Equal(b[:n], zeroPage[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}
