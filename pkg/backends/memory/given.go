package memory

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// Pages given to the kernel.
//
// A Giver hands a read's pages to a function that passes them to the
// kernel by reference (vmsplice(2) into a pipe, then splice(2) into the
// client's socket): the server copies nothing, and the client copies
// straight from the volume's pages. The kernel holds those physical
// pages until the client has read them. Until then a given page must not
// change in place, and its memory must not go back to the Go heap while
// it maps the same physical pages: either would show the client data it
// never read, possibly another volume's.
//
// So the table marks each page it gives, with the generation current at
// the time. A change to a page with a live mark is copy-on-write: the
// table gets a changed copy and the old page is retired. Nothing writes a
// retired page again; lent reads still holding it (see Lend) keep
// reading consistent bytes. When the garbage collector finds it
// unreachable, a finalizer takes its physical memory away from our
// mapping with madvise(MADV_DONTNEED), so that the kernel's references
// keep the old bytes and the heap's next owner of that address range gets
// fresh memory. A dropped page with a live mark (trim, zeros, Close) is
// retired the same way.
//
// Copies are not free: each needs fresh memory, which costs page faults,
// and a volume read whole and then rewritten would be rewritten at two
// thirds of the speed. Most of the time, though, the client has read
// everything long before anything is written (nbdcopy reads, then
// writes). Each Giver can tell whether its client has read all it was
// given (its pipe and its socket's send queue are empty). A change that
// meets a live mark first tries to settle: it starts a new generation,
// waits for gives of the old one to finish, and asks every Giver; if all
// of their clients have read everything, every older mark is stale, and
// pages change in place again.
//
// A page lent for a write in place (BorrowWrite) may be filled without
// the lock; while any page of its stripe is, the stripe's pages are given
// as copies, never by reference.

// errClosed refuses gives after Close, which has retired every given page.
var errClosed = errors.New("memory: device closed")

// settleBackoff is how long after a failed settle changes copy without
// trying again: the clients are still reading.
const settleBackoff = time.Millisecond

// onRetired, if set (by tests), is called by the finalizer with a
// retired page after its memory has been taken back.
var onRetired atomic.Pointer[func(*page)]

// mark records a page given: its index and the generation it was given in.
type mark struct{ pi, gen uint64 }

// giving is the table's state for pages given to the kernel.
type giving struct {
	any       atomic.Bool   // a page has been given: until then no change looks
	gen       atomic.Uint64 // the generation of new marks
	validFrom atomic.Uint64 // marks of older generations are stale
	inflight  [2]atomic.Int64
	closed    atomic.Bool // no more giving
	lastFail  atomic.Int64

	mu      sync.Mutex // holders, stuck, settling
	holders map[*Giver]struct{}
	// stuck is set when a Giver left with pages its client may still
	// hold: no mark can go stale after that.
	stuck bool
}

// Giver gives a volume's pages to the kernel on behalf of one client,
// whose reading it can observe.
type Giver struct {
	d        *Device
	consumed func() bool
	gave     atomic.Bool // GiveRead has been called
}

var _ backends.PageGiver = (*Giver)(nil)

// NewGiver implements backends.PageGivingDevice. consumed reports whether
// the client has read everything given so far: it must not block, and
// may be called from any goroutine until Close.
func (d *Device) NewGiver(consumed func() bool) backends.PageGiver {
	g := &Giver{d: d, consumed: consumed}
	gv := &d.t.giving
	gv.mu.Lock()
	if gv.holders == nil {
		gv.holders = map[*Giver]struct{}{}
	}
	gv.holders[g] = struct{}{}
	gv.mu.Unlock()
	return g
}

// Close ends the Giver. If its client may still hold pages (it was given
// some and has not read everything), marks can never go stale again:
// changes to given pages copy from then on.
func (g *Giver) Close() {
	gv := &g.d.t.giving
	gv.mu.Lock()
	defer gv.mu.Unlock()
	if _, ok := gv.holders[g]; !ok {
		return
	}
	delete(gv.holders, g)
	if g.gave.Load() && !g.consumed() {
		gv.stuck = true
	}
}

// GiveRead calls give with the pieces of [off, off+length) in order, at
// most a page each, byRef when give may pass them to the kernel by
// reference (vmsplice(2)); otherwise give must copy them. A page given
// by reference does not change until the client has read it. give must
// not block: it runs under the page's lock.
func (g *Giver) GiveRead(off, length uint64, give func(b []byte, byRef bool) error) error {
	if err := g.d.check(off, length); err != nil {
		return err
	}
	if !g.gave.Load() {
		g.gave.Store(true)
	}
	var err error
	eachPage(off, length, func(pi, po, n uint64) {
		if err == nil {
			err = g.d.t.give(pi, po, n, give)
		}
	})
	return err
}

// isLive tells whether a mark still counts: the kernel may hold its page.
func (gv *giving) isLive(m mark) bool { return m.gen >= gv.validFrom.Load() }

// live tells whether pg, a page of mu's stripe, has a live mark. Called
// with mu write-locked.
func (t *table) live(mu *stripe, pg *page) bool {
	if !t.giving.any.Load() {
		return false
	}
	mu.gmu.Lock()
	m, ok := mu.given[pg]
	mu.gmu.Unlock()
	return ok && t.giving.isLive(m)
}

// left drops the mark of pg, just taken out of the table, and retires pg
// if the mark was live. Called with mu write-locked.
func (t *table) left(mu *stripe, pg *page) {
	if !t.giving.any.Load() {
		return
	}
	mu.gmu.Lock()
	m, ok := mu.given[pg]
	delete(mu.given, pg)
	mu.gmu.Unlock()
	if ok && t.giving.isLive(m) {
		retire(pg)
	}
}

// cow returns the page to change for a change to pg: pg itself, or if
// the kernel may hold pg a copy (of its bytes unless whole: the change
// overwrites them all), which the table must then hold instead (and call
// left for pg). Called with mu write-locked, so pg's mark predates any
// settling done here, which then makes it stale.
func (t *table) cow(mu *stripe, pg *page, whole bool) *page {
	if !t.live(mu, pg) || t.settle() {
		return pg
	}
	np := new(page)
	if !whole {
		*np = *pg
	}
	return np
}

// settle makes every mark stale if no client holds given pages any more,
// and reports whether it did. It never waits on a lock, so it may be
// called with a stripe locked.
func (t *table) settle() bool {
	gv := &t.giving
	if time.Duration(time.Now().UnixNano()-gv.lastFail.Load()) < settleBackoff || !gv.mu.TryLock() {
		return false
	}
	defer gv.mu.Unlock()
	if gv.stuck {
		return false
	}
	g := gv.gen.Add(1) - 1
	// Gives of generation g hold their stripes' read locks, not ours,
	// and do not block: wait for them to have reached their pipes.
	for gv.inflight[g&1].Load() != 0 {
		runtime.Gosched()
	}
	for h := range gv.holders {
		if !h.consumed() {
			gv.lastFail.Store(time.Now().UnixNano())
			return false
		}
	}
	gv.validFrom.Store(g + 1)
	return true
}

// retire arranges for pg's memory to be taken back once nothing of ours
// holds it. Each page is retired at most once: it is out of the given
// set, out of the table, and can never be given again.
func retire(pg *page) {
	runtime.SetFinalizer(pg, func(pg *page) {
		if err := unix.Madvise(pg[:], unix.MADV_DONTNEED); err != nil {
			// Cannot happen for an aligned range of our own heap; if it
			// did, the heap's next owner could write into a page the
			// kernel still holds.
			panic("memory: madvise(MADV_DONTNEED) of a retired page: " + err.Error())
		}
		if f := onRetired.Load(); f != nil {
			(*f)(pg)
		}
	})
}

// givable tells whether pg can be given: madvise works on whole system
// pages. The Go heap aligns objects this large to its 8 KiB pages, so
// this only guards the assumption.
func givable(pg *page) bool {
	return uintptr(unsafe.Pointer(pg))%uintptr(unix.Getpagesize()) == 0
}

// retireDropped retires the given pages of [pi, end) that the table no
// longer holds, after free dropped whole leaves or mids. A reader that
// still held a dropped leaf looks the page up again under the stripe's
// read lock before giving it (see give), so once each stripe has been
// write-locked here no dropped page can be given any more.
func (t *table) retireDropped(pi, end uint64) {
	if !t.giving.any.Load() {
		return
	}
	for i := range t.locks {
		mu := &t.locks[i]
		mu.Lock()
		mu.gmu.Lock()
		for pg, m := range mu.given {
			if m.pi >= pi && m.pi < end && t.current(m.pi) != pg {
				delete(mu.given, pg)
				if t.giving.isLive(m) {
					retire(pg)
				}
			}
		}
		mu.gmu.Unlock()
		mu.Unlock()
	}
}

// current is the page the table holds at pi, or nil.
func (t *table) current(pi uint64) *page {
	if s := t.slot(pi); s != nil {
		return s.Load()
	}
	return nil
}

// give calls f with bytes [po, po+n) of page pi (the zero page if
// absent) while holding the stripe's read lock, byRef if f may pass
// them to the kernel by reference (the page is then marked given); f
// must not block.
func (t *table) give(pi, po, n uint64, f func(b []byte, byRef bool) error) error {
	mu := t.lock(pi)
	mu.RLock()
	defer mu.RUnlock()
	gv := &t.giving
	if gv.closed.Load() {
		return errClosed
	}
	pg := t.current(pi) // looked up under the lock: never a dropped page
	switch {
	case pg == nil:
		return f(zeroPage[po:po+n], true) // nothing ever writes it
	case mu.pinned != 0:
		// Being filled without the lock: a copy-on-write now would lose
		// the rest of the fill.
		return f(pg[po:po+n], false)
	case !givable(pg):
		return fmt.Errorf("memory: page %d at %p is not aligned to a system page: %w", pi, pg, syscall.EIO)
	}
	// Counted in flight from before the mark until the page is in the
	// pipe, for settle; taken after the stripe's lock, so that settle
	// never waits for a give that waits for a lock.
	var g uint64
	for {
		g = gv.gen.Load()
		gv.inflight[g&1].Add(1)
		if gv.gen.Load() == g {
			break
		}
		gv.inflight[g&1].Add(-1)
	}
	defer gv.inflight[g&1].Add(-1)
	mu.gmu.Lock()
	if mu.given == nil {
		mu.given = make(map[*page]mark)
	}
	mu.given[pg] = mark{pi: pi, gen: g}
	mu.gmu.Unlock()
	if !gv.any.Load() { // not a store per page: every connection reads it
		gv.any.Store(true)
	}
	return f(pg[po:po+n], true)
}

// close retires every page the kernel may hold, for Close: the device's
// memory may go back to the Go heap after it. No give succeeds afterwards.
func (t *table) close() {
	// A give in progress holds its stripe's read lock: it is done, and
	// its page marked, by the time that stripe is locked below.
	t.giving.closed.Store(true)
	for i := range t.locks {
		mu := &t.locks[i]
		mu.Lock()
		mu.gmu.Lock()
		for pg, m := range mu.given {
			if t.giving.isLive(m) {
				retire(pg)
			}
		}
		mu.given = nil
		mu.gmu.Unlock()
		mu.Unlock()
	}
}
