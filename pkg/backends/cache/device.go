package cache

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

const (
	// writebackInterval is how often dirty blocks are written back when
	// nothing else asks for it, bounding what a power loss can take.
	writebackInterval = 2 * time.Second
	// maxRun bounds one backend request made by a fill or a writeback.
	maxRun = 8 << 20
	// Reclaim starts above highPct of the cap and stops at lowPct.
	highPct, lowPct = 90, 80
)

// entry is one block's state. Entries exist for cached blocks and for
// blocks some operation holds; idle absent blocks have none.
type entry struct {
	b     uint64
	state uint8
	// busy: an operation owns the block (fill, write, zero, eviction);
	// others wait on wait. Owners take blocks in ascending order and
	// never wait for a lower block, so there is no deadlock.
	busy bool
	// wb: a writeback is copying the block to the backend.
	wb bool
	// readers are reads from the data file in progress; eviction skips
	// such blocks so it never punches a hole under them.
	readers int
	// gen counts writes; a writeback marks the block clean only if no
	// write started since it copied the data.
	gen      uint64
	reserved bool // counted in Device.used
	elem     *list.Element
	wait     chan struct{}
}

// Device is an open cache over inner. It is safe for concurrent use.
type Device struct {
	inner backends.Device
	ic    backends.Caps // inner's, constant while open: read once, not per request
	cfg   Config
	shift uint
	bs    uint64
	dir   string
	data  *os.File
	lock  *os.File // flock'd: one opener per cache directory

	// sizeMu is held shared by every request and exclusively by Resize.
	sizeMu sync.RWMutex
	size   uint64

	mu        sync.Mutex
	entries   map[uint64]*entry
	lru       list.List // present blocks, most recent first
	used      int       // reserved blocks (present or being filled)
	capBlocks int
	dirty     int
	j         *journal
	broken    error // a map append failed: the map no longer matches memory
	closed    bool

	kick chan struct{}
	stop chan struct{}
	done chan struct{}

	// Counters for Stats (metrics), in bytes of whole blocks.
	hits, misses, evicted atomic.Uint64
}

// Stats are a cache's counters since it was opened, for metrics.
type Stats struct {
	HitBytes, MissBytes uint64 // reads served from the cache / fetched from the backend
	EvictedBytes        uint64 // reclaimed to stay under cache-size
	DirtyBytes          uint64 // written, not yet written back (now)
	UsedBytes           uint64 // held in the cache file (now)
}

// Stats returns the cache's counters.
func (d *Device) Stats() Stats {
	d.mu.Lock()
	dirty, used := uint64(d.dirty), uint64(d.used)
	d.mu.Unlock()
	return Stats{HitBytes: d.hits.Load(), MissBytes: d.misses.Load(), EvictedBytes: d.evicted.Load(),
		DirtyBytes: dirty * d.bs, UsedBytes: used * d.bs}
}

// Unwrap returns the device the cache is in front of.
func (d *Device) Unwrap() backends.Device { return d.inner }

var _ backends.Device = (*Device)(nil)
var _ backends.Resizer = (*Device)(nil)

// Open puts a cache with configuration c (c.Dir set) in front of inner.
// A map left by an earlier run in c.Dir is replayed: its dirty blocks are
// written back to inner before Open returns, and its clean blocks are
// served, unless the machine rebooted since without a clean close (then
// the cache is dropped). On error inner is left open.
func Open(ctx context.Context, inner backends.Device, c Config) (*Device, error) {
	var err error
	if c.mode, err = parseMode(c.Mode); err != nil {
		return nil, err
	}
	if c.mode == modeOff || c.Block < backends.MinFilterBlock || c.Block&(c.Block-1) != 0 || c.Size < c.Block || c.Dir == "" {
		return nil, fmt.Errorf("cache: invalid configuration %+v", c)
	}
	lock, err := backends.LockFilterDir(c.Dir, keyDir, "cache")
	if err != nil {
		return nil, err
	}
	d := &Device{
		inner: inner, ic: inner.Caps(), cfg: c, lock: lock, bs: c.Block, dir: c.Dir,
		size:      inner.Size(),
		entries:   map[uint64]*entry{},
		capBlocks: int(min(c.Size/c.Block, 1<<40)),
		kick:      make(chan struct{}, 1),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
	}
	for uint64(1)<<d.shift < d.bs {
		d.shift++
	}
	ok := false
	defer func() {
		if !ok {
			d.closeFiles()
		}
	}()
	if d.data, err = os.OpenFile(filepath.Join(c.Dir, "data"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		return nil, fmt.Errorf("option %q: %w", keyDir, err)
	}
	if err := d.recover(ctx); err != nil {
		return nil, err
	}
	if err := d.data.Truncate(int64(d.size)); err != nil {
		return nil, fmt.Errorf("cache data file: %w", err)
	}
	ok = true
	go d.background()
	klog.V(2).InfoS("cache opened", "dir", c.Dir, "mode", c.mode, "block", c.Block, "cap", c.Size,
		"cached", d.used, "size", d.size)
	return d, nil
}

// recover loads the map left in the directory, writes its dirty blocks
// back, and keeps its clean blocks when they can be trusted.
func (d *Device) recover(ctx context.Context) error {
	mapPath := filepath.Join(d.dir, "map")
	h, m, found, err := loadMap(mapPath)
	if err != nil {
		return err
	}
	boot := bootID()
	keep := found && (h.boot == boot || h.flags&flagClean != 0)
	if found && !keep {
		klog.InfoS("cache: dropping a cache left by an unclean shutdown in another boot", "dir", d.dir, "blocks", len(m))
		m = map[uint64]uint8{}
	}
	if st, err := d.data.Stat(); keep && len(m) > 0 && (err != nil || uint64(st.Size()) < h.size) {
		// The data file was lost or replaced: the map describes nothing.
		klog.InfoS("cache: data file missing or short; dropping the cache", "dir", d.dir, "blocks", len(m))
		keep, m = false, map[uint64]uint8{}
	}
	if keep {
		var dirty []uint64
		for b, st := range m {
			if st == stateDirty {
				dirty = append(dirty, b)
			}
		}
		if len(dirty) > 0 {
			if d.ic.ReadOnly {
				return fmt.Errorf("cache directory %s holds %d dirty blocks but the backend is read-only", d.dir, len(dirty))
			}
			klog.InfoS("cache: writing back dirty blocks left by the previous run", "dir", d.dir, "blocks", len(dirty))
			if err := d.replay(ctx, h, dirty); err != nil {
				return fmt.Errorf("cache directory %s: writing back dirty blocks: %w", d.dir, err)
			}
			for _, b := range dirty {
				m[b] = stateClean
			}
		}
		if h.block != d.bs {
			// Written back already; clean blocks of another size are
			// simply forgotten.
			m = map[uint64]uint8{}
		}
	}
	if len(m) == 0 {
		// Free whatever an old data file held.
		if err := d.data.Truncate(0); err != nil {
			return fmt.Errorf("cache data file: %w", err)
		}
	}
	nblocks := (d.size + d.bs - 1) >> d.shift
	for b := range m {
		if b >= nblocks || len(d.entries) >= d.capBlocks {
			continue // the backend shrank, or the cap did
		}
		e := &entry{b: b, state: stateClean, reserved: true}
		e.elem = d.lru.PushBack(e)
		d.entries[b] = e
		d.used++
	}
	if len(d.entries) < len(m) {
		// Blocks left out must not be trusted later: punch them.
		for b := range m {
			if _, ok := d.entries[b]; !ok && b < nblocks {
				d.punch(b<<d.shift, d.bs)
			}
		}
	}
	d.j, err = writeMap(mapPath, mapHeader{block: d.bs, size: d.size, boot: boot}, d.eachRecord)
	return err
}

// replay writes the given dirty blocks of a map with header h to inner.
func (d *Device) replay(ctx context.Context, h mapHeader, dirty []uint64) error {
	buf := make([]byte, h.block)
	for _, b := range dirty {
		off := b * h.block
		if off >= d.size {
			return fmt.Errorf("dirty block at %d lies beyond the backend's size %d", off, d.size)
		}
		n := min(h.block, d.size-off)
		if _, err := d.data.ReadAt(buf[:n], int64(off)); err != nil {
			return err
		}
		if err := d.inner.WriteAt(ctx, buf[:n], off, false); err != nil {
			return err
		}
	}
	return d.inner.Flush(ctx)
}

// eachRecord lists the present blocks for a compacted map; d.mu held or
// d not yet shared.
func (d *Device) eachRecord(add func(record)) {
	for b, e := range d.entries {
		if e.state != stateAbsent {
			add(record{b, e.state})
		}
	}
}

func (d *Device) closeFiles() {
	if d.j != nil {
		d.j.close()
	}
	if d.data != nil {
		d.data.Close()
	}
	if d.lock != nil {
		d.lock.Close() // releases the flock
	}
}

func (d *Device) Size() uint64 {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	return d.size
}

// Caps: the cache answers flushes and FUA itself; it may block on the
// backend and the disk, so it is never Fast.
func (d *Device) Caps() backends.Caps {
	c := d.ic
	c.Fast = false
	c.Cache = true
	// Every write is in the cache's files (or, writethrough, the
	// backend's) before it is acknowledged, and the next open writes
	// dirty blocks back: the backend's own buffer no longer matters.
	c.BufferedWrites = false
	if !c.ReadOnly {
		c.Flush, c.FUA = true, true
	}
	return c
}

// ---- block state bookkeeping (all with d.mu held) ----

func (d *Device) get(b uint64) *entry {
	e := d.entries[b]
	if e == nil {
		e = &entry{b: b}
		d.entries[b] = e
	}
	return e
}

func (d *Device) waitCh(e *entry) chan struct{} {
	if e.wait == nil {
		e.wait = make(chan struct{})
	}
	return e.wait
}

func (e *entry) wake() {
	if e.wait != nil {
		close(e.wait)
		e.wait = nil
	}
}

// tidy forgets an idle absent entry.
func (d *Device) tidy(e *entry) {
	if e.state == stateAbsent && !e.busy && !e.wb && e.readers == 0 && !e.reserved && e.wait == nil {
		if d.entries[e.b] == e {
			delete(d.entries, e.b)
		}
	}
}

func (d *Device) unreserve(e *entry) {
	if e.reserved {
		e.reserved = false
		d.used--
	}
}

// setState applies a state change already in the journal.
func (d *Device) setState(e *entry, st uint8) {
	if e.state == stateDirty {
		d.dirty--
	}
	if st == stateDirty {
		d.dirty++
	}
	e.state = st
	if st == stateAbsent {
		if e.elem != nil {
			d.lru.Remove(e.elem)
			e.elem = nil
		}
		d.unreserve(e)
		return
	}
	if !e.reserved {
		e.reserved = true
		d.used++
	}
	if e.elem == nil {
		e.elem = d.lru.PushFront(e)
	} else {
		d.lru.MoveToFront(e.elem)
	}
}

// commit journals and applies new states for es (all to st).
func (d *Device) commit(es []*entry, st uint8) error {
	if d.broken != nil {
		return d.broken
	}
	recs := make([]record, 0, len(es))
	for _, e := range es {
		if e.state != st {
			recs = append(recs, record{e.b, st})
		}
	}
	if err := d.j.append(recs); err != nil {
		d.broken = fmt.Errorf("%w: %w", err, syscall.EIO)
		return d.broken
	}
	for _, e := range es {
		d.setState(e, st)
	}
	if d.j.records > max(1<<16, 4*d.used) {
		d.compact(0)
	}
	return nil
}

// compact rewrites the map; flags are header flags (flagClean at close).
func (d *Device) compact(flags uint32) error {
	j, err := writeMap(d.j.path, mapHeader{block: d.bs, size: d.size, boot: bootID(), flags: flags}, d.eachRecord)
	if err != nil {
		klog.ErrorS(err, "cache: compacting the map failed; keeping the journal", "dir", d.dir)
		return err
	}
	d.j.close()
	d.j = j
	return nil
}

// reserve makes room for the blocks es, evicting clean blocks if needed,
// and on success marks them reserved and counts them used. The victims
// are returned busy and must go through punchVictims once d.mu is
// released. It fails if the cap is taken by dirty or busy blocks.
func (d *Device) reserve(es []*entry) (bool, []*entry) {
	n := len(es)
	var victims []*entry
	if d.used+n > d.capBlocks {
		victims = d.pickVictims(d.used + n - d.capBlocks)
		if err := d.evictLocked(victims); err != nil {
			return false, nil
		}
		if d.used+n > d.capBlocks {
			return false, victims
		}
	}
	for _, e := range es {
		e.reserved = true
	}
	d.used += n
	return true, victims
}

// pickVictims picks up to n least recently used evictable blocks.
func (d *Device) pickVictims(n int) []*entry {
	var v []*entry
	for el := d.lru.Back(); el != nil && len(v) < n; el = el.Prev() {
		e := el.Value.(*entry)
		if e.state == stateClean && !e.busy && !e.wb && e.readers == 0 {
			v = append(v, e)
		}
	}
	return v
}

// evictLocked journals victims absent and marks them busy: the map no
// longer claims their data before it is punched out.
func (d *Device) evictLocked(victims []*entry) error {
	for _, e := range victims {
		e.busy = true
	}
	if err := d.commit(victims, stateAbsent); err != nil {
		for _, e := range victims {
			e.busy = false
		}
		return err
	}
	d.evicted.Add(uint64(len(victims)) * d.bs)
	return nil
}

// punchVictims frees the victims' space and releases them; d.mu not held.
func (d *Device) punchVictims(victims []*entry) {
	if len(victims) == 0 {
		return
	}
	for _, e := range victims {
		d.punch(e.b<<d.shift, d.bs)
	}
	d.mu.Lock()
	d.release(victims)
	d.mu.Unlock()
}

// release ends ownership of es; d.mu held.
func (d *Device) release(es []*entry) {
	for _, e := range es {
		e.busy = false
		e.wake()
		d.tidy(e)
	}
}

func (d *Device) punch(off, n uint64) {
	err := unix.Fallocate(int(d.data.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
	if err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
		klog.V(2).InfoS("cache: punching a hole failed", "dir", d.dir, "off", off, "err", err)
	}
}

// zeroData makes [off, off+n) of the data file read as zeros.
func (d *Device) zeroData(off, n uint64) error {
	err := unix.Fallocate(int(d.data.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
	if err == nil {
		return nil
	}
	_, err = d.data.WriteAt(make([]byte, n), int64(off))
	return err
}

// lockRange makes the caller owner of blocks b0..b1, in ascending order,
// waiting for other owners (and for writebacks too if waitWB). Every
// owned block's gen is bumped, so writebacks in flight do not mark it
// clean.
func (d *Device) lockRange(ctx context.Context, b0, b1 uint64, waitWB bool) ([]*entry, error) {
	es := make([]*entry, 0, b1-b0+1)
	d.mu.Lock()
	for b := b0; b <= b1; {
		e := d.get(b)
		if e.busy || (waitWB && e.wb) {
			ch := d.waitCh(e)
			d.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				d.mu.Lock()
				d.release(es)
				d.tidy(e)
				d.mu.Unlock()
				return nil, ctx.Err()
			}
			d.mu.Lock()
			continue
		}
		e.busy = true
		e.gen++
		es = append(es, e)
		b++
	}
	d.mu.Unlock()
	return es, nil
}

// waitWB waits until no writeback holds any of es (which the caller owns,
// so no new one starts).
func (d *Device) waitWB(ctx context.Context, es []*entry) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range es {
		for e.wb {
			ch := d.waitCh(e)
			d.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				d.mu.Lock()
				return ctx.Err()
			}
			d.mu.Lock()
		}
	}
	return nil
}

func (d *Device) kickWriteback() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// ---- Resize and Close ----

// Resize grows the backend and the cache with it.
func (d *Device) Resize(ctx context.Context, size uint64) error {
	d.sizeMu.Lock()
	defer d.sizeMu.Unlock()
	if grew, err := backends.GrowFilter(ctx, d.inner, d.data, d.size, size, "cache", "cache data file"); !grew {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.size&(d.bs-1) != 0 {
		// The old last block was cached short; a clean copy is dropped so
		// the grown part is fetched. (A dirty one keeps its zeros, which
		// is what a grown volume reads there.)
		if e := d.entries[d.size>>d.shift]; e != nil && e.state == stateClean && !e.busy && e.readers == 0 {
			if err := d.commit([]*entry{e}, stateAbsent); err != nil {
				return err
			}
			d.tidy(e)
		}
	}
	d.size = size
	return nil
}

// Close writes every dirty block back, flushes the backend, makes the
// cache durable (so it is reused after a reboot) and closes inner. If the
// backend cannot take the dirty blocks they stay in the cache directory
// and are written back by the next Open.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	d.mu.Unlock()
	close(d.stop)
	<-d.done

	ctx := context.Background()
	var errs []error
	if !d.ic.ReadOnly {
		if err := d.writeback(ctx, 0, ^uint64(0), true); err != nil {
			errs = append(errs, fmt.Errorf("cache: writeback at close: %w", err))
		}
		if err := d.inner.Flush(ctx); err != nil {
			errs = append(errs, fmt.Errorf("cache: flush at close: %w", err))
		}
	}
	// Clean means the data file is durable and the map complete, so the
	// cache (dirty blocks included) can be trusted after a reboot.
	clean := d.data.Sync() == nil
	d.mu.Lock()
	if d.broken == nil {
		var flags uint32
		if clean {
			flags = flagClean
		}
		if err := d.compact(flags); err != nil {
			errs = append(errs, err)
		}
	}
	d.mu.Unlock()
	d.closeFiles()
	if err := d.inner.Close(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}
