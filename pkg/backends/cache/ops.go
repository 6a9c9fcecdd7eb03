package cache

import (
	"context"
	"fmt"
	"slices"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func (d *Device) check(off, n uint64) error {
	if off > d.size || n > d.size-off {
		return fmt.Errorf("cache: range %d+%d beyond size %d: %w", off, n, d.size, backends.ErrInvalid)
	}
	return nil
}

// blockEnd is where block b ends (the last block may be short).
func (d *Device) blockEnd(b uint64) uint64 { return min(d.size, (b+1)<<d.shift) }

// ReadAt serves cached blocks from the data file and fetches missing ones
// from the backend, a whole block (or run of blocks) at a time; concurrent
// misses on one block fetch it once.
func (d *Device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	return d.read(ctx, p, off, uint64(len(p)), d.cfg.OnRead)
}

// Cache prefetches the range into the cache (whatever cache-on-read says:
// the client asked for it).
func (d *Device) Cache(ctx context.Context, off, length uint64) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	if err := d.check(off, length); err != nil {
		return err
	}
	return d.read(ctx, nil, off, length, true)
}

// read fills p (if not nil) with [off, off+length), keeping misses if keep.
func (d *Device) read(ctx context.Context, p []byte, off, length uint64, keep bool) error {
	start, end := off, off+length
	for off < end {
		b := off >> d.shift
		d.mu.Lock()
		if d.broken != nil {
			d.mu.Unlock()
			return d.broken
		}
		e := d.entries[b]
		switch {
		case e != nil && e.state != stateAbsent:
			// A hit: a run of cached blocks in one pread. readers keeps
			// eviction off them meanwhile.
			run := []*entry{e}
			for nb := b + 1; nb<<d.shift < end; nb++ {
				ne := d.entries[nb]
				if ne == nil || ne.state == stateAbsent {
					break
				}
				run = append(run, ne)
			}
			for _, e := range run {
				e.readers++
				d.lru.MoveToFront(e.elem)
			}
			d.mu.Unlock()
			stop := min(end, (b+uint64(len(run)))<<d.shift)
			var err error
			if p != nil {
				_, err = d.data.ReadAt(p[off-start:stop-start], int64(off))
				d.hits.Add(stop - off)
			}
			d.mu.Lock()
			for _, e := range run {
				e.readers--
				d.tidy(e)
			}
			d.mu.Unlock()
			if err != nil {
				return fmt.Errorf("cache data file: %w", err)
			}
			off = stop
		case e != nil && e.busy:
			// Being fetched, evicted or rewritten: wait, then look again.
			ch := d.waitCh(e)
			d.mu.Unlock()
			select {
			case <-ch:
			case <-ctx.Done():
				return ctx.Err()
			}
		default:
			// A miss: take the run of idle missing blocks and fetch it.
			var run []*entry
			// Runs stay well under the cap so large reads are cached too.
			limit := max(1, min(maxRun>>d.shift, d.capBlocks/4))
			for nb := b; nb<<d.shift < end && len(run) < limit; nb++ {
				ne := d.entries[nb]
				if ne != nil && (ne.state != stateAbsent || ne.busy) {
					break
				}
				run = append(run, d.get(nb))
			}
			ok, victims := false, []*entry(nil)
			if keep {
				ok, victims = d.reserve(run)
			}
			if ok {
				for _, e := range run {
					e.busy = true
				}
				if d.used > d.capBlocks*highPct/100 {
					d.kickWriteback()
				}
			} else {
				for _, e := range run {
					d.tidy(e)
				}
			}
			d.mu.Unlock()
			d.punchVictims(victims)
			stop := min(end, (b+uint64(len(run)))<<d.shift)
			if p != nil {
				d.misses.Add(stop - off)
			}
			var err error
			switch {
			case ok:
				err = d.fill(ctx, run, p, start, off, stop)
			case p != nil:
				// No room (or cache-on-read=false): read around the cache.
				// These blocks are absent, so the backend has their data.
				err = d.inner.ReadAt(ctx, p[off-start:stop-start], off)
			}
			if err != nil {
				return err
			}
			off = stop
		}
	}
	return nil
}

// fill fetches the busy, reserved blocks of run from the backend, stores
// them and journals them clean (data first, so the map never claims
// bytes the file lacks), then copies [off, stop) into p.
func (d *Device) fill(ctx context.Context, run []*entry, p []byte, pStart, off, stop uint64) error {
	fs := run[0].b << d.shift
	fe := d.blockEnd(run[len(run)-1].b)
	// A read that covers the whole run (block-aligned) is fetched straight
	// into p: no buffer and no copy.
	direct := p != nil && off == fs && stop == fe
	var buf []byte
	if direct {
		buf = p[off-pStart : stop-pStart]
	} else {
		buf = make([]byte, fe-fs)
	}
	err := d.inner.ReadAt(ctx, buf, fs)
	if err == nil {
		if _, err = d.data.WriteAt(buf, int64(fs)); err != nil {
			err = fmt.Errorf("cache data file: %w", err)
		}
	}
	d.mu.Lock()
	if err == nil {
		err = d.commit(run, stateClean)
	}
	if err != nil {
		for _, e := range run {
			d.unreserve(e)
		}
	}
	d.release(run)
	d.mu.Unlock()
	if err == nil && p != nil && !direct {
		copy(p[off-pStart:stop-pStart], buf[off-fs:stop-fs])
	}
	return err
}

// forRuns calls fn(lo, hi) for each maximal run of consecutive entries
// satisfying pred, with [lo, hi) the run's bytes clipped to [off, end).
func (d *Device) forRuns(es []*entry, off, end uint64, pred func(*entry) bool, fn func(lo, hi uint64) error) error {
	for i := 0; i < len(es); {
		if !pred(es[i]) {
			i++
			continue
		}
		j := i + 1
		for j < len(es) && pred(es[j]) {
			j++
		}
		lo := max(off, es[i].b<<d.shift)
		hi := min(end, d.blockEnd(es[j-1].b))
		if err := fn(lo, hi); err != nil {
			return err
		}
		i = j
	}
	return nil
}

func (d *Device) pwrite(p []byte, off uint64) error {
	if _, err := d.data.WriteAt(p, int64(off)); err != nil {
		return fmt.Errorf("cache data file: %w", err)
	}
	return nil
}

// WriteAt: writeback and unsafe keep the write in the cache (acknowledged
// once in the data file and the map, see journal.go); writethrough writes
// the backend first.
func (d *Device) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if d.ic.ReadOnly {
		return backends.ErrReadOnly
	}
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	end := off + uint64(len(p))
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		if fua {
			return d.flush(ctx)
		}
		return nil
	}
	b0, b1 := off>>d.shift, (end-1)>>d.shift
	if d.cfg.mode == modeWritethrough {
		es, err := d.lockRange(ctx, b0, b1, true)
		if err != nil {
			return err
		}
		defer d.releaseLocked(es)
		return d.writeAround(ctx, es, p, off, fua)
	}
	cached, err := d.writeCachedRange(ctx, p, off, b0, b1, fua)
	if err != nil || !cached {
		return err
	}
	if fua && d.cfg.mode == modeWriteback {
		// Whoever writes these blocks back (this or a background round
		// we wait for) flushes the backend before calling them clean.
		return d.writeback(ctx, b0, b1, true)
	}
	return nil
}

func (d *Device) releaseLocked(es []*entry) {
	d.mu.Lock()
	d.release(es)
	d.mu.Unlock()
}

// writeCachedRange owns b0..b1 and writes p into the cache, or around it
// when the cache is full of dirty blocks (cached false: already durable
// as fua asked).
func (d *Device) writeCachedRange(ctx context.Context, p []byte, off, b0, b1 uint64, fua bool) (cached bool, err error) {
	es, err := d.lockRange(ctx, b0, b1, false)
	if err != nil {
		return false, err
	}
	defer d.releaseLocked(es)
	d.mu.Lock()
	var absent []*entry
	for _, e := range es {
		if e.state == stateAbsent {
			absent = append(absent, e)
		}
	}
	ok, victims := d.reserve(absent)
	d.mu.Unlock()
	d.punchVictims(victims)
	if !ok {
		// The cap is all dirty (or busy): write around the cache rather
		// than wait, and get the writeback going.
		d.kickWriteback()
		if err := d.waitWB(ctx, es); err != nil {
			return false, err
		}
		return false, d.writeAround(ctx, es, p, off, fua)
	}
	if err := d.writeCached(ctx, es, p, off); err != nil {
		d.mu.Lock()
		for _, e := range absent {
			if e.state == stateAbsent {
				d.unreserve(e)
			}
		}
		d.mu.Unlock()
		return false, err
	}
	return true, nil
}

// writeCached writes p at off into owned, reserved blocks es and journals
// them dirty.
func (d *Device) writeCached(ctx context.Context, es []*entry, p []byte, off uint64) error {
	end := off + uint64(len(p))
	covered := func(e *entry) bool { return off <= e.b<<d.shift && end >= d.blockEnd(e.b) }
	// 1. Absent blocks get their whole content into the data file before
	//    the map calls them dirty: partial ones merged with the backend's.
	edges := []*entry{es[0]}
	if len(es) > 1 {
		edges = append(edges, es[len(es)-1])
	}
	for _, e := range edges {
		if e.state != stateAbsent || covered(e) {
			continue
		}
		bs, be := e.b<<d.shift, d.blockEnd(e.b)
		buf := make([]byte, be-bs)
		if err := d.inner.ReadAt(ctx, buf, bs); err != nil {
			return err
		}
		copy(buf[max(off, bs)-bs:], p[max(off, bs)-off:min(end, be)-off])
		if err := d.pwrite(buf, bs); err != nil {
			return err
		}
	}
	// es are consecutive blocks: wasAbsent is indexed by e.b-b0.
	b0 := es[0].b
	wasAbsent := make([]bool, len(es))
	for i, e := range es {
		wasAbsent[i] = e.state == stateAbsent
	}
	err := d.forRuns(es, off, end, func(e *entry) bool { return wasAbsent[e.b-b0] && covered(e) }, func(lo, hi uint64) error {
		return d.pwrite(p[lo-off:hi-off], lo)
	})
	if err != nil {
		return err
	}
	// 2. Journal them dirty: clean blocks before their bytes change, so a
	//    crash in between writes back the backend's own bytes.
	d.mu.Lock()
	err = d.commit(es, stateDirty)
	if d.dirty > d.capBlocks/2 {
		d.kickWriteback()
	}
	d.mu.Unlock()
	if err != nil {
		return err
	}
	// 3. The blocks that were cached take the new bytes.
	return d.forRuns(es, off, end, func(e *entry) bool { return !wasAbsent[e.b-b0] }, func(lo, hi uint64) error {
		return d.pwrite(p[lo-off:hi-off], lo)
	})
}

// writeAround writes p to the backend first and then into the owned
// blocks es (no writeback holds them): clean blocks are journaled absent
// before the backend changes and clean again after, dirty blocks take the
// bytes too (they are written back later anyway).
func (d *Device) writeAround(ctx context.Context, es []*entry, p []byte, off uint64, fua bool) error {
	end := off + uint64(len(p))
	covered := func(e *entry) bool { return off <= e.b<<d.shift && end >= d.blockEnd(e.b) }
	// es are consecutive blocks: inBack is indexed by e.b-b0.
	b0 := es[0].b
	inBack := make([]bool, len(es))
	d.mu.Lock()
	var clean []*entry
	for i, e := range es {
		if e.state == stateClean {
			clean = append(clean, e)
			inBack[i] = true
		}
	}
	err := d.commit(clean, stateAbsent)
	d.mu.Unlock()
	if err != nil {
		return err
	}
	if err := d.inner.WriteAt(ctx, p, off, fua); err != nil {
		return err
	}
	isDirty := func(e *entry) bool { return e.state == stateDirty }
	if err := d.forRuns(es, off, end, isDirty, func(lo, hi uint64) error { return d.pwrite(p[lo-off:hi-off], lo) }); err != nil {
		return err
	}
	// Put back the blocks that were cached (the rest of their bytes in
	// the file is still the backend's), and, writing through, cache
	// whole blocks written.
	var back []*entry
	for i, e := range es {
		if !inBack[i] && e.state == stateAbsent && covered(e) && d.cfg.mode == modeWritethrough {
			inBack[i] = true
		}
		if inBack[i] {
			back = append(back, e)
		}
	}
	if len(back) == 0 {
		return nil
	}
	d.mu.Lock()
	ok, victims := d.reserve(back)
	d.mu.Unlock()
	d.punchVictims(victims)
	if !ok {
		return nil
	}
	err = d.forRuns(es, off, end, func(e *entry) bool { return inBack[e.b-b0] }, func(lo, hi uint64) error { return d.pwrite(p[lo-off:hi-off], lo) })
	d.mu.Lock()
	defer d.mu.Unlock()
	if err == nil {
		err = d.commit(back, stateClean)
	}
	if err != nil {
		for _, e := range back {
			d.unreserve(e)
		}
	}
	return err
}

// Flush: writeback writes every dirty block back and flushes the backend;
// writethrough only flushes the backend; unsafe does nothing.
func (d *Device) Flush(ctx context.Context) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	return d.flush(ctx)
}

func (d *Device) flush(ctx context.Context) error {
	switch d.cfg.mode {
	case modeUnsafe:
		return nil
	case modeWriteback:
		if err := d.writeback(ctx, 0, ^uint64(0), true); err != nil {
			return err
		}
	}
	return d.inner.Flush(ctx)
}

// Trim drops cached copies and forwards the trim.
func (d *Device) Trim(ctx context.Context, off, length uint64, fua bool) error {
	return d.discard(ctx, off, length, false, 0, fua)
}

// Zero drops cached copies, forwards the zeroing, and zeroes the part of
// partly covered dirty blocks.
func (d *Device) Zero(ctx context.Context, off, length uint64, flags backends.ZeroFlags) error {
	return d.discard(ctx, off, length, true, flags, false)
}

func (d *Device) discard(ctx context.Context, off, length uint64, zero bool, flags backends.ZeroFlags, fua bool) error {
	ic := d.ic
	if ic.ReadOnly {
		return backends.ErrReadOnly
	}
	if zero && flags&backends.ZeroFast != 0 && !ic.FastZero {
		return backends.ErrNotSupported
	}
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	if err := d.check(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	end := off + length
	es, err := d.lockRange(ctx, off>>d.shift, (end-1)>>d.shift, true)
	if err != nil {
		return err
	}
	defer d.releaseLocked(es)
	covered := func(e *entry) bool { return off <= e.b<<d.shift && end >= d.blockEnd(e.b) }
	// 1. Clean copies stop claiming data the backend is about to change.
	d.mu.Lock()
	var clean []*entry
	for _, e := range es {
		if e.state == stateClean {
			clean = append(clean, e)
		}
	}
	err = d.commit(clean, stateAbsent)
	d.mu.Unlock()
	if err != nil {
		return err
	}
	for _, e := range clean {
		if covered(e) {
			d.punch(e.b<<d.shift, d.bs)
		}
	}
	// 2. The backend. Dirty blocks are left alone until it succeeded, so
	//    a crash before replays them (the state before this request).
	if zero {
		err = d.inner.Zero(ctx, off, length, flags)
	} else {
		err = d.inner.Trim(ctx, off, length, fua)
	}
	if err != nil {
		return err
	}
	// 3. Dirty blocks: wholly covered ones are dropped; zeroing clears
	//    the covered part of the others (a trim may leave them).
	var gone []*entry
	for _, e := range es {
		if e.state != stateDirty {
			continue
		}
		if covered(e) {
			gone = append(gone, e)
		} else if zero {
			lo, hi := max(off, e.b<<d.shift), min(end, d.blockEnd(e.b))
			if err := d.zeroData(lo, hi-lo); err != nil {
				return fmt.Errorf("cache data file: %w", err)
			}
		}
	}
	d.mu.Lock()
	err = d.commit(gone, stateAbsent)
	d.mu.Unlock()
	if err != nil {
		return err
	}
	for _, e := range gone {
		d.punch(e.b<<d.shift, d.bs)
	}
	return nil
}

// dirtyIn lists the dirty blocks in [b0, b1], sorted; d.mu held.
func (d *Device) dirtyIn(b0, b1 uint64) []uint64 {
	var out []uint64
	if d.dirty == 0 {
		return nil
	}
	if b1-b0 < uint64(len(d.entries)) {
		for b := b0; b <= b1; b++ {
			if e := d.entries[b]; e != nil && e.state == stateDirty {
				out = append(out, b)
			}
		}
		return out
	}
	for b, e := range d.entries {
		if e.state == stateDirty && b >= b0 && b <= b1 {
			out = append(out, b)
		}
	}
	slices.Sort(out)
	return out
}

// Extents reports the backend's allocation, with dirty blocks (data the
// backend has not got yet) as data.
func (d *Device) Extents(ctx context.Context, off, length uint64, add func(backends.Extent)) error {
	d.sizeMu.RLock()
	defer d.sizeMu.RUnlock()
	if err := d.check(off, length); err != nil {
		return err
	}
	if length == 0 {
		return d.inner.Extents(ctx, off, length, add)
	}
	end := off + length
	d.mu.Lock()
	dirty := d.dirtyIn(off>>d.shift, (end-1)>>d.shift)
	d.mu.Unlock()
	if len(dirty) == 0 {
		return d.inner.Extents(ctx, off, length, add)
	}
	// Each backend extent is split around the dirty blocks as it comes (a
	// reply cut short by an error is dropped by the caller).
	m := backends.ExtentMerger{Add: add}
	p, di := off, 0
	_, err := backends.ClipExtents(ctx, d.inner, off, length, func(n uint64, f backends.ExtentFlags) {
		eEnd := p + n
		for p < eEnd {
			for di < len(dirty) && (dirty[di]+1)<<d.shift <= p {
				di++
			}
			if di < len(dirty) && dirty[di]<<d.shift <= p {
				q := min(eEnd, (dirty[di]+1)<<d.shift)
				m.Emit(q-p, 0)
				p = q
				continue
			}
			q := eEnd
			if di < len(dirty) {
				q = min(q, dirty[di]<<d.shift)
			}
			m.Emit(q-p, f)
			p = q
		}
	})
	if err != nil {
		return err
	}
	m.Flush()
	return nil
}
