package cache

import (
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sync/errgroup"
	"k8s.io/klog/v2"
)

// writebackParallel is how many backend writes one writeback keeps in
// flight: a remote backend's latency, not its bandwidth, bounds a
// writeback of scattered blocks.
const writebackParallel = 8

// writeback copies the dirty blocks in [b0, b1] to the backend, flushes
// it, and marks the blocks clean unless a write started meanwhile.
//
// With wait (FLUSH, FUA, Close) it covers every block dirty when it
// starts, waiting for blocks that requests or other writebacks hold: a
// held dirty block may carry completed writes too. Without wait (the
// background) it skips them.
func (d *Device) writeback(ctx context.Context, b0, b1 uint64, wait bool) error {
	d.mu.Lock()
	pending := d.dirtyIn(b0, min(b1, d.size>>d.shift))
	d.mu.Unlock()
	for len(pending) > 0 {
		d.mu.Lock()
		var claim []*entry
		var gens []uint64
		var rest []uint64
		var held *entry
		for _, b := range pending {
			e := d.entries[b]
			if e == nil || e.state != stateDirty {
				continue
			}
			if e.busy || e.wb {
				if wait {
					rest = append(rest, b)
					if held == nil {
						held = e
					}
				}
				continue
			}
			e.wb = true
			claim = append(claim, e)
			gens = append(gens, e.gen)
		}
		var ch chan struct{}
		if len(claim) == 0 && held != nil {
			ch = d.waitCh(held)
		}
		d.mu.Unlock()
		if len(claim) > 0 {
			if err := d.copyBack(ctx, claim, gens); err != nil {
				return err
			}
		} else if ch != nil {
			select {
			case <-ch:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		pending = rest
	}
	return nil
}

// copyBack writes the claimed blocks (sorted, wb set) to the backend in
// runs, flushes it, and journals clean those no write touched since.
func (d *Device) copyBack(ctx context.Context, claim []*entry, gens []uint64) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(writebackParallel)
	maxBlocks := max(1, maxRun>>d.shift)
	for i := 0; i < len(claim); {
		j := i + 1
		for j < len(claim) && j-i < maxBlocks && claim[j].b == claim[j-1].b+1 {
			j++
		}
		lo, hi := claim[i].b<<d.shift, d.blockEnd(claim[j-1].b)
		g.Go(func() error {
			buf := make([]byte, hi-lo)
			if _, err := d.data.ReadAt(buf, int64(lo)); err != nil {
				return fmt.Errorf("cache data file: %w", err)
			}
			return d.inner.WriteAt(gctx, buf, lo, false)
		})
		i = j
	}
	err := g.Wait()
	if err == nil {
		// Clean means the backend has it durably: a clean block may be
		// evicted at any time.
		err = d.inner.Flush(ctx)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var done []*entry
	for i, e := range claim {
		e.wb = false
		if err == nil && e.state == stateDirty && e.gen == gens[i] {
			done = append(done, e)
		}
	}
	if err == nil {
		err = d.commit(done, stateClean)
	}
	for _, e := range claim {
		e.wake()
		d.tidy(e)
	}
	if err != nil {
		return fmt.Errorf("cache writeback: %w", err)
	}
	return nil
}

// background writes dirty blocks back every writebackInterval (or when
// kicked) and reclaims space above the high watermark.
func (d *Device) background() {
	defer close(d.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-d.stop
		cancel()
	}()
	t := time.NewTicker(writebackInterval)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
		case <-d.kick:
		}
		d.reclaim()
		d.mu.Lock()
		dirty := d.dirty
		d.mu.Unlock()
		if dirty > 0 && d.cfg.mode != modeWritethrough {
			d.sizeMu.RLock()
			err := d.writeback(ctx, 0, ^uint64(0), false)
			d.sizeMu.RUnlock()
			if err != nil && !errors.Is(err, context.Canceled) {
				klog.ErrorS(err, "cache: background writeback failed; retrying later", "dir", d.dir)
			}
			d.reclaim()
		}
	}
}

// reclaim evicts least recently used clean blocks once the cache is above
// the high watermark, down to the low one.
func (d *Device) reclaim() {
	d.mu.Lock()
	if d.used <= d.capBlocks*highPct/100 {
		d.mu.Unlock()
		return
	}
	victims := d.pickVictims(d.used - d.capBlocks*lowPct/100)
	if err := d.evictLocked(victims); err != nil {
		victims = nil
	}
	d.mu.Unlock()
	d.punchVictims(victims)
}
