package memory

import (
	"bytes"
	"sync"
	"sync/atomic"
	"unsafe"
)

// The volume is a sparse radix table of fixed pages, so a huge volume
// costs nothing until written:
//
//	top []*mid  --(midShift bits)-->  *leaf  --(leafShift bits)-->  *page
//
// Only top is allocated at Open (8 bytes per 4 TiB of size); mids and
// leaves appear on first write to their range and go again when a trim
// covers them whole. Table pointers are atomics so lookups need no lock.
// Page contents are guarded by a striped RWMutex chosen by page index,
// which keeps connections touching different pages out of each other's
// way while making concurrent access to one page race-free.
const (
	pageShift = 16 // 64 KiB pages
	pageSize  = 1 << pageShift
	leafShift = 12 // pages per leaf: a leaf spans 256 MiB and weighs 32 KiB
	leafFan   = 1 << leafShift
	midShift  = 14 // leaves per mid: a mid spans 4 TiB and weighs 128 KiB
	midFan    = 1 << midShift

	leafBytes = pageSize << leafShift
	midBytes  = leafBytes << midShift

	stripes = 512 // page lock stripes
)

type (
	page [pageSize]byte
	leaf [leafFan]atomic.Pointer[page]
	mid  [midFan]atomic.Pointer[leaf]
)

// stripe is a lock padded to its own cache line so neighbours don't
// false-share.
type stripe struct {
	sync.RWMutex
	// pinned counts pages of this stripe lent out for a write in place
	// (borrow … commit). While any is, nothing frees a page of the
	// stripe for being all zeros: the borrower fills it without the lock.
	pinned int32
	// given holds the stripe's pages given to the kernel, with their
	// indices (see given.go). It changes under the read lock (gmu
	// orders the givers) or the write lock.
	gmu   sync.Mutex
	given map[*page]mark
	_     [64 - (unsafe.Sizeof(sync.RWMutex{})+8+unsafe.Sizeof(sync.Mutex{})+8)%64]byte
}

// zeroPage is compared against to detect all-zero data, and stands in for
// absent pages in lent reads. Nothing ever writes it.
var zeroPage page

// isZero reports whether b (at most a page) is all zeros.
func isZero(b []byte) bool { return bytes.Equal(b, zeroPage[:len(b)]) }

type table struct {
	top    []atomic.Pointer[mid] // covers capacity bytes, at least the size
	npages atomic.Uint64         // pages in the volume; the last mid may extend past them
	locks  [stripes]stripe
	giving giving // pages given to the kernel (given.go)
}

// growRoom is how large a volume can grow without rebuilding top: top
// is sized for at least this much (2 KiB of pointers), so a resize only
// moves the end.
const growRoom = 1 << 50

func newTable(size uint64) *table {
	capacity := max(size, growRoom)
	t := &table{top: make([]atomic.Pointer[mid], (capacity+midBytes-1)/midBytes)}
	t.setSize(size)
	return t
}

// capacity is the largest size the table can hold.
func (t *table) capacity() uint64 { return uint64(len(t.top)) * midBytes }

func (t *table) setSize(size uint64) { t.npages.Store((size + pageSize - 1) / pageSize) }

func (t *table) lock(pi uint64) *stripe { return &t.locks[pi%stripes] }

// slot returns page pi's slot, or nil if its leaf does not exist.
func (t *table) slot(pi uint64) *atomic.Pointer[page] {
	m := t.top[pi>>(leafShift+midShift)].Load()
	if m == nil {
		return nil
	}
	l := m[(pi>>leafShift)%midFan].Load()
	if l == nil {
		return nil
	}
	return &l[pi%leafFan]
}

// makeSlot returns page pi's slot, creating its mid and leaf if needed.
func (t *table) makeSlot(pi uint64) *atomic.Pointer[page] {
	mp := &t.top[pi>>(leafShift+midShift)]
	m := mp.Load()
	for m == nil {
		mp.CompareAndSwap(nil, new(mid))
		m = mp.Load() // ours or a concurrent winner's (or nil again after a trim)
	}
	lp := &m[(pi>>leafShift)%midFan]
	l := lp.Load()
	for l == nil {
		lp.CompareAndSwap(nil, new(leaf))
		l = lp.Load()
	}
	return &l[pi%leafFan]
}

// read copies page pi from byte po into p (zeros if absent).
func (t *table) read(p []byte, pi, po uint64) {
	s := t.slot(pi)
	if s == nil {
		clear(p)
		return
	}
	mu := t.lock(pi)
	mu.RLock()
	if pg := s.Load(); pg != nil {
		copy(p, pg[po:])
	} else {
		clear(p)
	}
	mu.RUnlock()
}

// lend returns bytes [po, po+n) of page pi itself (not a copy), and
// whether they come from the shared zero page.
func (t *table) lend(pi, po, n uint64) ([]byte, bool) {
	var pg *page
	if s := t.slot(pi); s != nil {
		mu := t.lock(pi)
		mu.RLock()
		pg = s.Load()
		mu.RUnlock()
	}
	if pg == nil {
		return zeroPage[po : po+n], true
	}
	return pg[po : po+n], false
}

// write copies p into page pi at byte po. Zeros are not stored: they
// neither allocate an absent page nor keep a wholly overwritten one.
func (t *table) write(p []byte, pi, po uint64) {
	mu := t.lock(pi)
	mu.Lock()
	defer mu.Unlock()
	s := t.slot(pi)
	var pg *page
	if s != nil {
		pg = s.Load()
	}
	switch {
	case pg == nil:
		if isZero(p) {
			return
		}
		pg = new(page)
		copy(pg[po:], p)
		t.makeSlot(pi).Store(pg)
	case len(p) == pageSize && isZero(p):
		s.Store(nil)
		t.left(mu, pg)
	default:
		np := t.cow(mu, pg, len(p) == pageSize)
		copy(np[po:], p)
		if np != pg {
			s.Store(np)
			t.left(mu, pg)
		}
	}
}

// borrow returns bytes [po, po+n) of page pi, allocating the page if
// absent, for the caller to fill without holding the lock; commit must
// follow. Until then the page is pinned: zeroPart does not free it under
// the filler (a trim of other bytes of the page must not lose the write).
func (t *table) borrow(pi, po, n uint64) []byte {
	mu := t.lock(pi)
	mu.Lock()
	defer mu.Unlock()
	s := t.makeSlot(pi)
	pg := s.Load()
	if pg == nil {
		pg = new(page)
		s.Store(pg)
	} else if np := t.cow(mu, pg, n == pageSize); np != pg {
		// A failed fill leaves its range undefined, so a whole-page
		// borrow need not copy the old bytes.
		s.Store(np)
		t.left(mu, pg)
		pg = np
	}
	mu.pinned++
	return pg[po : po+n]
}

// commit ends a borrow of [po, po+n) of page pi. The page is freed if it
// is now all zeros (zeros are not stored), unless another borrower of the
// stripe may still be filling it. The bytes written are looked at first:
// data ends the check at once, without scanning the rest of the page.
func (t *table) commit(pi, po, n uint64) {
	mu := t.lock(pi)
	mu.Lock()
	defer mu.Unlock()
	mu.pinned--
	if mu.pinned != 0 {
		return
	}
	s := t.slot(pi)
	if s == nil {
		return // freed by an overlapping trim
	}
	if pg := s.Load(); pg != nil && isZero(pg[po:po+n]) && isZero(pg[:]) {
		s.Store(nil)
		t.left(mu, pg)
	}
}

// zeroPart zeros [po, po+n) of page pi, freeing it if it becomes all
// zeros.
func (t *table) zeroPart(pi, po, n uint64) {
	s := t.slot(pi)
	if s == nil || s.Load() == nil {
		return
	}
	mu := t.lock(pi)
	mu.Lock()
	if pg := s.Load(); pg != nil {
		np := t.cow(mu, pg, false)
		clear(np[po : po+n])
		switch {
		case mu.pinned == 0 && isZero(np[:]):
			s.Store(nil)
		case np != pg:
			s.Store(np)
		}
		if s.Load() != pg {
			t.left(mu, pg)
		}
	}
	mu.Unlock()
}

// free drops pages [pi, end), whole leaves and mids at a time where the
// range covers them. A write racing with the free may be lost, which is
// fine: the two overlap, so either order is a valid outcome.
func (t *table) free(pi, end uint64) {
	start, dropped := pi, false
	defer func() {
		if dropped {
			t.retireDropped(start, end)
		}
	}()
	if end >= t.npages.Load() {
		// Through the end of the volume: the tables' unused tail counts
		// as covered, so a whole-volume trim frees every table.
		end = uint64(len(t.top)) << (leafShift + midShift)
	}
	for pi < end {
		mp := &t.top[pi>>(leafShift+midShift)]
		midStart := pi &^ (leafFan*midFan - 1)
		midEnd := midStart + leafFan*midFan
		m := mp.Load()
		if m == nil {
			pi = midEnd
			continue
		}
		if pi == midStart && end >= midEnd {
			mp.Store(nil)
			dropped = true
			pi = midEnd
			continue
		}
		lp := &m[(pi>>leafShift)%midFan]
		leafStart := pi &^ (leafFan - 1)
		leafEnd := leafStart + leafFan
		l := lp.Load()
		if l == nil {
			pi = leafEnd
			continue
		}
		if pi == leafStart && end >= leafEnd {
			lp.Store(nil)
			dropped = true
			pi = leafEnd
			continue
		}
		for ; pi < min(end, leafEnd); pi++ {
			s := &l[pi%leafFan]
			if s.Load() == nil {
				continue
			}
			mu := t.lock(pi)
			mu.Lock()
			if pg := s.Load(); pg != nil {
				s.Store(nil)
				t.left(mu, pg)
			}
			mu.Unlock()
		}
	}
}

// status reports whether the byte at off is in a stored page, and where
// the run of equal status that the table can see at once ends (the end
// of the page, or of an absent leaf or mid).
func (t *table) status(off uint64) (present bool, next uint64) {
	pi := off >> pageShift
	m := t.top[pi>>(leafShift+midShift)].Load()
	if m == nil {
		return false, (off | (midBytes - 1)) + 1
	}
	l := m[(pi>>leafShift)%midFan].Load()
	if l == nil {
		return false, (off | (leafBytes - 1)) + 1
	}
	return l[pi%leafFan].Load() != nil, (off | (pageSize - 1)) + 1
}
