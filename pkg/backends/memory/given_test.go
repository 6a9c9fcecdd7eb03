package memory

import (
	"bytes"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// pipeGive returns a Giver of d whose client is a fresh pipe, a give
// function that vmsplices into the pipe (by reference, as the server
// does) or writes to it (by copy), a function that reads back everything
// the pipe holds, and the count of pieces given by reference.
func pipeGive(t *testing.T, d *Device) (backends.PageGiver, func([]byte, bool) error, func() []byte, *int) {
	t.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	if _, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, 1<<20); err != nil {
		t.Logf("F_SETPIPE_SZ: %v (default pipe size)", err)
	}
	byRefs := new(int)
	give := func(b []byte, byRef bool) error {
		if byRef {
			*byRefs++
		}
		for len(b) > 0 {
			var n int
			var err error
			if byRef {
				n, err = unix.Vmsplice(p[1], []unix.Iovec{{Base: &b[0], Len: uint64(len(b))}}, unix.SPLICE_F_NONBLOCK)
			} else {
				n, err = unix.Write(p[1], b)
			}
			if err != nil {
				return fmt.Errorf("vmsplice or write: %w", err)
			}
			b = b[n:]
		}
		return nil
	}
	drain := func() []byte {
		var out []byte
		buf := make([]byte, 1<<20)
		for {
			n, err := unix.Read(p[0], buf)
			if n <= 0 || err != nil {
				return out
			}
			out = append(out, buf[:n]...)
		}
	}
	gv := d.NewGiver(func() bool {
		n, err := unix.IoctlGetInt(p[0], unix.SIOCINQ) // FIONREAD, same number
		return err == nil && n == 0
	})
	return gv, give, drain, byRefs
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/4096)
	}
	return b
}

// scribbleRetired makes the retirement of each page at the given
// addresses scribble over it, as the heap's next owner of the memory
// would, and returns a function that collects garbage until all of them
// have been retired (failing the test after a while).
func scribbleRetired(t *testing.T, addrs map[uintptr]bool) func() {
	t.Helper()
	var mu sync.Mutex
	left := len(addrs)
	f := func(pg *page) {
		mu.Lock()
		defer mu.Unlock()
		if a := uintptr(unsafe.Pointer(pg)); addrs[a] {
			for i := range pg {
				pg[i] = 0xEE
			}
			delete(addrs, a)
			left--
		}
	}
	onRetired.Store(&f)
	t.Cleanup(func() { onRetired.Store(nil) })
	return func() {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; {
			runtime.GC()
			mu.Lock()
			n := left
			mu.Unlock()
			if n == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d pages that left the table were never retired", n)
			}
			time.Sleep(time.Millisecond)
		}
	}
}

// A page handed to the kernel by reference must keep showing the kernel
// what it held when given, whatever then happens to the volume: the
// client reads the pipe (the socket) later. And once the page has left
// the volume and its memory goes back to the Go heap, whatever the heap
// writes there must not reach the kernel either.
func TestGiveReadSurvivesChanges(t *testing.T) {
	const span = 3 * pageSize
	changes := []struct {
		name string
		do   func(d *Device) error
		// want is the volume's content of [0, span) after the change.
		want func(old []byte) []byte
	}{
		{"partial write", func(d *Device) error {
			return d.WriteAt(ctx, bytes.Repeat([]byte{0xAA}, 100), pageSize+10, false)
		}, func(old []byte) []byte {
			w := bytes.Clone(old)
			copy(w[pageSize+10:], bytes.Repeat([]byte{0xAA}, 100))
			return w
		}},
		{"whole-page write", func(d *Device) error {
			return d.WriteAt(ctx, bytes.Repeat([]byte{0xBB}, pageSize), pageSize, false)
		}, func(old []byte) []byte {
			w := bytes.Clone(old)
			copy(w[pageSize:], bytes.Repeat([]byte{0xBB}, pageSize))
			return w
		}},
		{"zeros over a page", func(d *Device) error {
			return d.WriteAt(ctx, make([]byte, pageSize), 0, false)
		}, func(old []byte) []byte {
			w := bytes.Clone(old)
			clear(w[:pageSize])
			return w
		}},
		{"trim part", func(d *Device) error { return d.Trim(ctx, 5, 1000, false) },
			func(old []byte) []byte { w := bytes.Clone(old); clear(w[5:1005]); return w }},
		{"trim pages", func(d *Device) error { return d.Trim(ctx, 0, 2*pageSize, false) },
			func(old []byte) []byte { w := bytes.Clone(old); clear(w[:2*pageSize]); return w }},
		{"trim whole volume (drops leaves)", func(d *Device) error { return d.Trim(ctx, 0, d.Size(), false) },
			func(old []byte) []byte { return make([]byte, len(old)) }},
		{"write in place", func(d *Device) error {
			vec, err := d.BorrowWrite(pageSize/2, pageSize, nil)
			if err != nil {
				return err
			}
			for _, b := range vec {
				for i := range b {
					b[i] = 0xCC
				}
			}
			d.CommitWrite(pageSize/2, pageSize)
			return nil
		}, func(old []byte) []byte {
			w := bytes.Clone(old)
			copy(w[pageSize/2:], bytes.Repeat([]byte{0xCC}, pageSize))
			return w
		}},
		{"whole page written in place", func(d *Device) error {
			vec, err := d.BorrowWrite(2*pageSize, pageSize, nil)
			if err != nil {
				return err
			}
			for i := range vec[0] {
				vec[0][i] = 0xDD
			}
			d.CommitWrite(2*pageSize, pageSize)
			return nil
		}, func(old []byte) []byte {
			w := bytes.Clone(old)
			copy(w[2*pageSize:], bytes.Repeat([]byte{0xDD}, pageSize))
			return w
		}},
	}
	for _, c := range changes {
		t.Run(c.name, func(t *testing.T) {
			d := New(2 * leafBytes)
			old := pattern(span, 3)
			if err := d.WriteAt(ctx, old, 0, false); err != nil {
				t.Fatal(err)
			}
			gv, give, drain, byRefs := pipeGive(t, d)
			// Unaligned at both ends, across all three pages.
			const off, n = 100, span - 300
			if err := gv.GiveRead(off, n, give); err != nil {
				t.Fatal(err)
			}
			if *byRefs != 3 {
				t.Fatalf("%d pieces given by reference, want 3", *byRefs)
			}
			var before [3]uintptr // addresses only: the test must not keep old pages alive
			for i := range before {
				before[i] = uintptr(unsafe.Pointer(d.t.current(uint64(i))))
			}
			if err := c.do(d); err != nil {
				t.Fatal(err)
			}
			gone := map[uintptr]bool{}
			for i, a := range before {
				if uintptr(unsafe.Pointer(d.t.current(uint64(i)))) != a {
					gone[a] = true
				}
			}
			if len(gone) == 0 {
				t.Fatal("the change left every given page in the table: it changed one in place")
			}
			scribbleRetired(t, gone)()
			if got := drain(); !bytes.Equal(got, old[off:off+n]) {
				t.Fatalf("the kernel saw the change or the heap's reuse: %d bytes differ", diffCount(got, old[off:off+n]))
			}
			got := make([]byte, span)
			if err := d.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, c.want(old)) {
				t.Fatalf("the volume lost the change or its old bytes: %d bytes differ", diffCount(got, c.want(old)))
			}
			// Given again after the copy-on-write, and changed again.
			if err := gv.GiveRead(0, span, give); err != nil {
				t.Fatal(err)
			}
			if err := d.WriteAt(ctx, bytes.Repeat([]byte{0x11}, 10), 2*pageSize, false); err != nil {
				t.Fatal(err)
			}
			if got2 := drain(); !bytes.Equal(got2, got) {
				t.Fatal("second giving: the kernel saw the change")
			}
		})
	}
}

// Pages never given change in place: copy-on-write is only for pages the
// kernel may hold.
func TestUngivenPagesChangeInPlace(t *testing.T) {
	d := New(leafBytes)
	if err := d.WriteAt(ctx, pattern(2*pageSize, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	gv, give, _, _ := pipeGive(t, d)
	if err := gv.GiveRead(0, 10, give); err != nil { // page 0 only, left unread
		t.Fatal(err)
	}
	p0, p1 := d.t.current(0), d.t.current(1)
	if err := d.WriteAt(ctx, []byte{1, 2, 3}, pageSize+7, false); err != nil {
		t.Fatal(err)
	}
	if d.t.current(1) != p1 {
		t.Fatal("a write to a page never given copied it")
	}
	if err := d.WriteAt(ctx, []byte{1, 2, 3}, 7, false); err != nil {
		t.Fatal(err)
	}
	if d.t.current(0) == p0 {
		t.Fatal("a write to a given page changed it in place")
	}
	// The copy is not given: the next write changes it in place.
	p0 = d.t.current(0)
	if err := d.WriteAt(ctx, []byte{4}, 70, false); err != nil {
		t.Fatal(err)
	}
	if d.t.current(0) != p0 {
		t.Fatal("a write to the copy of a given page copied it again")
	}
}

// Once every client has read all it was given, marks go stale and pages
// change in place again: no copy, no fresh memory. Until then they copy.
func TestSettledPagesChangeInPlace(t *testing.T) {
	d := New(leafBytes)
	if err := d.WriteAt(ctx, pattern(3*pageSize, 2), 0, false); err != nil {
		t.Fatal(err)
	}
	gv, give, drain, _ := pipeGive(t, d)
	other, give2, drain2, _ := pipeGive(t, d)
	defer gv.Close()
	if err := gv.GiveRead(0, 3*pageSize, give); err != nil {
		t.Fatal(err)
	}
	drain() // the client has read everything
	p1 := d.t.current(1)
	if err := d.WriteAt(ctx, []byte{1, 2, 3}, pageSize+5, false); err != nil {
		t.Fatal(err)
	}
	if d.t.current(1) != p1 {
		t.Fatal("a given page copied on write after its client had read it")
	}

	// Another client still has page 2 unread: a change copies.
	if err := other.GiveRead(2*pageSize, 100, give2); err != nil {
		t.Fatal(err)
	}
	p2 := d.t.current(2)
	if err := d.WriteAt(ctx, []byte{4}, 2*pageSize+7, false); err != nil {
		t.Fatal(err)
	}
	if d.t.current(2) == p2 {
		t.Fatal("a page changed in place while a client had not read it")
	}
	if got := drain2(); !bytes.Equal(got, pattern(3*pageSize, 2)[2*pageSize:2*pageSize+100]) {
		t.Fatal("the unread client saw the change")
	}
	// It has read it now, and leaves: the next change settles.
	other.Close()
	time.Sleep(2 * settleBackoff) // past the failed settle's backoff
	if err := gv.GiveRead(0, pageSize, give); err != nil {
		t.Fatal(err)
	}
	drain()
	p0 := d.t.current(0)
	if err := d.WriteAt(ctx, []byte{5}, 9, false); err != nil {
		t.Fatal(err)
	}
	if d.t.current(0) != p0 {
		t.Fatal("no settling after every client had read everything")
	}
}

// A client that leaves with pages unread may still hold them for good:
// from then on changes to pages given before always copy.
func TestGiverLeavingUnreadSticks(t *testing.T) {
	d := New(leafBytes)
	if err := d.WriteAt(ctx, pattern(pageSize, 4), 0, false); err != nil {
		t.Fatal(err)
	}
	gv, give, drain, _ := pipeGive(t, d)
	if err := gv.GiveRead(0, pageSize, give); err != nil {
		t.Fatal(err)
	}
	// A client that was never given anything leaves unread data (copied
	// replies, say) without consequence.
	idle, copyTo, _, _ := pipeGive(t, d)
	if err := copyTo([]byte("unread"), false); err != nil {
		t.Fatal(err)
	}
	idle.Close()
	if d.t.giving.stuck {
		t.Fatal("a giver that gave nothing made marks stick")
	}
	gv.Close() // with the page unread
	if !d.t.giving.stuck {
		t.Fatal("a giver leaving with a page unread did not make marks stick")
	}
	p0 := d.t.current(0)
	if err := d.WriteAt(ctx, []byte{1}, 0, false); err != nil {
		t.Fatal(err)
	}
	if d.t.current(0) == p0 {
		t.Fatal("a page changed in place after its client left without reading it")
	}
	if got := drain(); !bytes.Equal(got, pattern(pageSize, 4)) {
		t.Fatal("the client that left saw the change")
	}
}

// Givers give and read back pages that a writer keeps refilling, each
// fill one byte value. What a client reads must be what the page held
// when it was given (looked at under the page's lock), however the
// settling and the copies interleave.
func TestSettleRace(t *testing.T) {
	const pages = 4 // in different stripes
	d := New(leafBytes)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 2 {
		gv, give, drain, _ := pipeGive(t, d)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer gv.Close()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				pi := uint64((i + w) % pages)
				var seen byte
				err := gv.GiveRead(pi*pageSize, pageSize, func(b []byte, byRef bool) error {
					seen = b[0]
					return give(b, byRef)
				})
				if err != nil {
					t.Error(err)
					return
				}
				if i%3 != 0 {
					runtime.Gosched() // let writes come while it is unread
				}
				got := drain()
				if len(got) != pageSize || !bytes.Equal(got, bytes.Repeat([]byte{seen}, pageSize)) {
					t.Errorf("giver %d: page %d given holding %#x, read back %d bytes, %d of them differ",
						w, pi, seen, len(got), diffCount(got, bytes.Repeat([]byte{seen}, pageSize)))
					return
				}
			}
		}()
	}
	fill := make([]byte, pageSize)
	for v := 1; v < 3000; v++ {
		for i := range fill {
			fill[i] = byte(v%255 + 1)
		}
		if err := d.WriteAt(ctx, fill, uint64(v%pages)*pageSize, false); err != nil {
			t.Fatal(err)
		}
		if v%100 == 0 {
			time.Sleep(2 * settleBackoff) // let settling be tried again
		}
	}
	close(stop)
	wg.Wait()
}

// A give in flight (marked, not yet in its pipe) when a change settles
// elsewhere must hold the settling up: its client's pipe still looks
// empty, and its mark must not go stale before its page is in the pipe.
func TestSettleWaitsForGivesInFlight(t *testing.T) {
	d := New(leafBytes)
	old := pattern(2*pageSize, 6)
	if err := d.WriteAt(ctx, old, 0, false); err != nil {
		t.Fatal(err)
	}
	// Page 0 has a live mark, read by its client: a change to it settles.
	b, giveB, drainB, _ := pipeGive(t, d)
	defer b.Close()
	if err := b.GiveRead(0, pageSize, giveB); err != nil {
		t.Fatal(err)
	}
	drainB()
	// Page 1 (another stripe) is being given, paused inside the give.
	a, giveA, drainA, _ := pipeGive(t, d)
	defer a.Close()
	entered, release, gave := make(chan struct{}), make(chan struct{}), make(chan error)
	go func() {
		gave <- a.GiveRead(pageSize, pageSize, func(b []byte, byRef bool) error {
			close(entered)
			<-release
			return giveA(b, byRef)
		})
	}()
	<-entered
	wrote := make(chan error)
	go func() { wrote <- d.WriteAt(ctx, []byte{1}, 0, false) }()
	time.Sleep(20 * time.Millisecond) // the write settles meanwhile, or waits
	close(release)
	if err := <-gave; err != nil {
		t.Fatal(err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * settleBackoff)
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{0xAB}, 100), pageSize+50, false); err != nil {
		t.Fatal(err)
	}
	if got := drainA(); !bytes.Equal(got, old[pageSize:]) {
		t.Fatalf("the client saw a change made after its page was given: %d bytes differ", diffCount(got, old[pageSize:]))
	}
}

// A lent read (Lend: the server writes the page to the socket without
// holding its lock) that overlaps a copy-on-write keeps reading the
// page's old bytes, all of them: none of its bytes are ever cleared, not
// even for a moment, as a retirement in place would.
func TestLentPageSurvivesCopyOnWrite(t *testing.T) {
	d := New(leafBytes)
	old := pattern(pageSize, 5)
	if err := d.WriteAt(ctx, old, 0, false); err != nil {
		t.Fatal(err)
	}
	lent, _, err := d.Lend(0, pageSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	gv, give, drain, _ := pipeGive(t, d)
	if err := gv.GiveRead(0, pageSize, give); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, []byte{9, 9, 9}, 1000, false); err != nil {
		t.Fatal(err)
	}
	runtime.GC() // the lent slice keeps the old page alive: no retirement yet
	runtime.GC()
	if !bytes.Equal(lent[0], old) {
		t.Fatalf("the lent page changed under its reader: %d bytes differ", diffCount(lent[0], old))
	}
	if !bytes.Equal(drain(), old) {
		t.Fatal("the kernel saw the change")
	}
}

// While a page of its stripe is being filled in place, a stripe's pages
// are given as copies: a copy-on-write then would lose the rest of the
// fill.
func TestGiveWhileBorrowedCopies(t *testing.T) {
	d := New(leafBytes)
	if err := d.WriteAt(ctx, pattern(pageSize, 7), 0, false); err != nil {
		t.Fatal(err)
	}
	vec, err := d.BorrowWrite(0, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	gv, give, drain, byRefs := pipeGive(t, d)
	if err := gv.GiveRead(0, pageSize, give); err != nil {
		t.Fatal(err)
	}
	if *byRefs != 0 {
		t.Fatal("a page being filled in place was given by reference")
	}
	copy(vec[0], bytes.Repeat([]byte{0x5A}, 100))
	d.CommitWrite(0, 100)
	drain()
	got := make([]byte, 100)
	if err := d.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, bytes.Repeat([]byte{0x5A}, 100)) {
		t.Fatal("the write in place was lost")
	}
	// Unpinned, the page goes by reference again.
	if err := gv.GiveRead(0, pageSize, give); err != nil || *byRefs != 1 {
		t.Fatalf("after the commit: err %v, %d pieces by reference", err, *byRefs)
	}
}

// Close retires the given pages still in the volume: the Go heap may
// reuse the device's memory after it, and the kernel must still see the
// old bytes. Nothing is given after Close.
func TestGiveReadClose(t *testing.T) {
	d := New(pageSize * 4)
	old := pattern(2*pageSize, 9)
	if err := d.WriteAt(ctx, old, 0, false); err != nil {
		t.Fatal(err)
	}
	gv, give, drain, _ := pipeGive(t, d)
	if err := gv.GiveRead(0, 2*pageSize, give); err != nil {
		t.Fatal(err)
	}
	wait := scribbleRetired(t, map[uintptr]bool{
		uintptr(unsafe.Pointer(d.t.current(0))): true,
		uintptr(unsafe.Pointer(d.t.current(1))): true,
	})
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gv.GiveRead(0, 10, give); err == nil {
		t.Fatal("GiveRead after Close succeeded")
	}
	gv.Close()
	d, gv = nil, nil // the pages are garbage now
	wait()
	if got := drain(); !bytes.Equal(got, old) {
		t.Fatalf("the kernel saw memory reused after Close: %d bytes differ", diffCount(got, old))
	}
}

// Holes are given as the shared zero page, and nothing is marked.
func TestGiveReadHole(t *testing.T) {
	d := New(leafBytes)
	gv, give, drain, _ := pipeGive(t, d)
	if err := gv.GiveRead(pageSize-10, 20, give); err != nil {
		t.Fatal(err)
	}
	if got := drain(); !bytes.Equal(got, make([]byte, 20)) {
		t.Fatalf("hole read %x", got)
	}
	if d.t.giving.any.Load() {
		t.Fatal("a hole marked the table as having given pages")
	}
	if err := gv.GiveRead(d.Size()-10, 20, give); err == nil {
		t.Fatal("a read past the end was given")
	}
	var _ backends.PageGivingDevice = d
}

func diffCount(a, b []byte) int {
	n := max(len(a), len(b)) - min(len(a), len(b))
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}
