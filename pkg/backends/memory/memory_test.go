package memory

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

var ctx = context.Background()

// pages counts the stored pages (for checking that zeros cost nothing).
func (t *table) pages() int {
	n := 0
	for i := range t.top {
		m := t.top[i].Load()
		if m == nil {
			continue
		}
		for j := range m {
			l := m[j].Load()
			if l == nil {
				continue
			}
			for k := range l {
				if l[k].Load() != nil {
					n++
				}
			}
		}
	}
	return n
}

// checkExtents verifies Extents over [off, off+n) against the model: the
// extents must tile the range exactly, holes must read as zeros, and data
// must sit on stored pages.
func checkExtents(t *testing.T, d *Device, model []byte, off, n uint64) {
	t.Helper()
	pos := off
	var prev backends.ExtentFlags = 99
	err := d.Extents(ctx, off, n, func(e backends.Extent) {
		if e.Length == 0 {
			t.Fatalf("empty extent at %d", pos)
		}
		if e.Flags == prev {
			t.Fatalf("unmerged extents at %d", pos)
		}
		prev = e.Flags
		switch e.Flags {
		case backends.ExtentHole | backends.ExtentZero:
			if len(bytes.Trim(model[pos:pos+e.Length], "\x00")) != 0 {
				t.Fatalf("hole %d+%d has data", pos, e.Length)
			}
		case 0:
			present, _ := d.t.status(pos)
			if !present {
				t.Fatalf("data extent at %d over an absent page", pos)
			}
		default:
			t.Fatalf("bad flags %v", e.Flags)
		}
		pos += e.Length
	})
	if err != nil {
		t.Fatal(err)
	}
	if pos != off+n {
		t.Fatalf("extents of %d+%d end at %d", off, n, pos)
	}
}

// TestRandomOps runs random operations against a plain []byte model.
func TestRandomOps(t *testing.T) {
	const size = 5*pageSize + 1234 // not a page multiple
	d := New(size)
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, size)
	noise := make([]byte, 4*pageSize) // non-zero bytes to write from
	for j := range noise {
		noise[j] = byte(rng.UintN(255) + 1)
	}
	for i := range 20000 {
		off := rng.Uint64N(size)
		n := rng.Uint64N(min(size-off, 3*pageSize) + 1)
		if rng.IntN(4) == 0 { // favour page-aligned ranges
			off = off &^ (pageSize - 1)
			n = min(uint64(rng.IntN(3)+1)*pageSize, size-off)
		}
		switch op := rng.IntN(6); op {
		case 0, 1: // write: random bytes, or zeros a third of the time
			p := buf[:n]
			if rng.IntN(3) == 0 {
				clear(p)
			} else {
				k := rng.Uint64N(uint64(len(noise)) - n + 1)
				p = noise[k : k+n]
			}
			if i%2 == 0 {
				if err := d.WriteAt(ctx, p, off, false); err != nil {
					t.Fatal(err)
				}
			} else {
				writeBorrowed(t, d, p, off) // the server's write in place
			}
			copy(model[off:], p)
		case 2:
			if err := d.Trim(ctx, off, n, false); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
		case 3:
			if err := d.Zero(ctx, off, n, backends.ZeroFast); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
		case 4:
			p := buf[:n]
			if err := d.ReadAt(ctx, p, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, model[off:off+n]) {
				t.Fatalf("op %d: read %d+%d differs from model", i, off, n)
			}
		case 5:
			checkExtents(t, d, model, off, n)
		}
	}
	all := make([]byte, size)
	if err := d.ReadAt(ctx, all, 0); err != nil || !bytes.Equal(all, model) {
		t.Fatalf("final read differs: %v", err)
	}
	checkExtents(t, d, model, 0, size)
	// Every stored page holds some non-zero byte.
	for pi := uint64(0); pi*pageSize < size; pi++ {
		if s := d.t.slot(pi); s != nil && s.Load() != nil && isZero(s.Load()[:]) {
			t.Errorf("page %d stored but all zeros", pi)
		}
	}
}

func TestZerosDoNotAllocate(t *testing.T) {
	d := New(4 * pageSize)
	zeros := make([]byte, 2*pageSize+100)
	if err := d.WriteAt(ctx, zeros, 10, false); err != nil {
		t.Fatal(err)
	}
	if n := d.t.pages(); n != 0 {
		t.Errorf("writing zeros stored %d pages", n)
	}
	data := bytes.Repeat([]byte{7}, 2*pageSize)
	if err := d.WriteAt(ctx, data, 0, false); err != nil {
		t.Fatal(err)
	}
	if n := d.t.pages(); n != 2 {
		t.Errorf("%d pages after writing two", n)
	}
	// A whole zero page written over data frees it.
	if err := d.WriteAt(ctx, zeros[:pageSize], pageSize, false); err != nil {
		t.Fatal(err)
	}
	if n := d.t.pages(); n != 1 {
		t.Errorf("%d pages after zeroing one of two", n)
	}
	// Zeroing a page piecewise frees it once it is all zeros.
	if err := d.Zero(ctx, 0, 100, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(ctx, 100, pageSize-100, false); err != nil {
		t.Fatal(err)
	}
	if n := d.t.pages(); n != 0 {
		t.Errorf("%d pages after zeroing everything", n)
	}
}

func TestEdges(t *testing.T) {
	const size = 3*pageSize + 10
	d := New(size)
	// A write across a page boundary, and one ending at the device end.
	if err := d.WriteAt(ctx, []byte("abcd"), pageSize-2, false); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, []byte("0123456789"), 3*pageSize, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	if err := d.ReadAt(ctx, got, pageSize-3); err != nil || string(got) != "\x00abcd\x00" {
		t.Errorf("read across boundary = %q, %v", got, err)
	}
	got = make([]byte, 10)
	if err := d.ReadAt(ctx, got, size-10); err != nil || string(got) != "0123456789" {
		t.Errorf("read of last bytes = %q, %v", got, err)
	}
	// Out-of-range requests fail cleanly.
	for _, err := range []error{
		d.ReadAt(ctx, make([]byte, 2), size-1),
		d.WriteAt(ctx, []byte{1}, size, false),
		d.Trim(ctx, 1, 1<<63, false),
		d.Zero(ctx, size+1, 0, 0),
		d.Extents(ctx, ^uint64(0), 2, func(backends.Extent) {}),
	} {
		if !errors.Is(err, backends.ErrInvalid) {
			t.Errorf("out of range error = %v; want ErrInvalid", err)
		}
	}
	// Zero-length operations are fine at the end.
	if err := d.ReadAt(ctx, nil, size); err != nil {
		t.Error(err)
	}
	if err := d.Trim(ctx, size, 0, false); err != nil {
		t.Error(err)
	}
}

func extents(t *testing.T, d *Device, off, n uint64) []backends.Extent {
	t.Helper()
	var es []backends.Extent
	if err := d.Extents(ctx, off, n, func(e backends.Extent) { es = append(es, e) }); err != nil {
		t.Fatal(err)
	}
	return es
}

func ext(n uint64, f backends.ExtentFlags) backends.Extent {
	return backends.Extent{Length: n, Flags: f}
}

func equalExtents(a, b []backends.Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestExtentsAfterTrimAndZero(t *testing.T) {
	const hole = backends.ExtentHole | backends.ExtentZero
	d := New(8 * pageSize)
	if err := d.WriteAt(ctx, bytes.Repeat([]byte{1}, 6*pageSize), pageSize, false); err != nil {
		t.Fatal(err)
	}
	want := []backends.Extent{ext(pageSize, hole), ext(6*pageSize, 0), ext(pageSize, hole)}
	if es := extents(t, d, 0, 8*pageSize); !equalExtents(es, want) {
		t.Errorf("extents = %v; want %v", es, want)
	}
	// Trim pages 2-3 whole and half of page 4: 4 keeps data.
	if err := d.Trim(ctx, 2*pageSize, 2*pageSize+pageSize/2, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(ctx, 6*pageSize, pageSize, backends.ZeroNoHole); err != nil {
		t.Fatal(err)
	}
	want = []backends.Extent{ext(pageSize, hole), ext(pageSize, 0), ext(2*pageSize, hole), ext(2*pageSize, 0), ext(2*pageSize, hole)}
	if es := extents(t, d, 0, 8*pageSize); !equalExtents(es, want) {
		t.Errorf("extents = %v; want %v", es, want)
	}
	// A range starting and ending mid-page reports partial extents.
	want = []backends.Extent{ext(pageSize-5, 0), ext(2*pageSize, hole), ext(7, 0)}
	if es := extents(t, d, pageSize+5, 3*pageSize+2); !equalExtents(es, want) {
		t.Errorf("extents = %v; want %v", es, want)
	}
}

// A 1 TiB volume costs nothing to open, one page to write, and nothing
// again once trimmed; extents skip the empty tables quickly.
func TestHugeVolume(t *testing.T) {
	const size = 1 << 40
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	dev, err := backends.Open(ctx, backends.Spec{Options: map[string]string{"size": "1Ti"}, URL: "memory:huge"}, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	if got := after.TotalAlloc - before.TotalAlloc; got > 256<<10 {
		t.Errorf("opening 1 TiB allocated %d bytes", got)
	}
	d := dev.(*Device)
	if d.Size() != size {
		t.Fatalf("size %d", d.Size())
	}
	if err := d.WriteAt(ctx, []byte{0xAA}, size-1, false); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2)
	if err := d.ReadAt(ctx, b, size-2); err != nil || b[0] != 0 || b[1] != 0xAA {
		t.Errorf("read %x, %v", b, err)
	}
	const hole = backends.ExtentHole | backends.ExtentZero
	want := []backends.Extent{ext(size-pageSize, hole), ext(pageSize, 0)}
	if es := extents(t, d, 0, size); !equalExtents(es, want) {
		t.Errorf("extents = %v; want %v", es, want)
	}
	if err := d.Trim(ctx, 0, size, false); err != nil {
		t.Fatal(err)
	}
	if d.t.top[0].Load() != nil {
		t.Error("trimming everything left the table")
	}
}

// Many goroutines on interleaved and shared pages; run with -race.
func TestConcurrent(t *testing.T) {
	const (
		workers = 8
		chunk   = 3000 // not page aligned: neighbours share pages
		rounds  = 300
	)
	d := New(workers * chunk * 4)
	var wg sync.WaitGroup
	for w := range workers {
		// Pages given by reference and then changed by neighbours are
		// copied on write: a worker's own bytes must survive that.
		gv, give, drain, _ := pipeGive(t, d)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 0))
			mine := make([]byte, chunk)
			got := make([]byte, chunk)
			for r := range rounds {
				off := uint64((r%4*workers + w) * chunk)
				for i := range mine {
					mine[i] = byte(rng.UintN(256))
				}
				if r%2 == 0 {
					if err := d.WriteAt(ctx, mine, off, false); err != nil {
						t.Error(err)
						return
					}
				} else {
					vec, err := d.BorrowWrite(off, chunk, nil)
					if err != nil {
						t.Error(err)
						return
					}
					p := mine
					for _, b := range vec {
						p = p[copy(b, p):]
					}
					d.CommitWrite(off, chunk)
				}
				if err := d.ReadAt(ctx, got, off); err != nil || !bytes.Equal(got, mine) {
					t.Errorf("worker %d round %d: read back differs (%v)", w, r, err)
					return
				}
				switch r % 3 {
				case 0:
					err := d.Trim(ctx, off, chunk, false)
					if err == nil {
						err = d.ReadAt(ctx, got, off)
					}
					if err != nil || !isZero(got) {
						t.Errorf("worker %d: trimmed range not zero (%v)", w, err)
						return
					}
				case 1:
					_ = d.Extents(ctx, 0, d.Size(), func(backends.Extent) {})
				case 2:
					if err := gv.GiveRead(off, chunk, give); err != nil {
						t.Error(err)
						return
					}
					if g := drain(); !bytes.Equal(g, mine) {
						t.Errorf("worker %d round %d: given bytes differ", w, r)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
}

func TestCapsAndOpen(t *testing.T) {
	s, err := backends.Parse("memory:")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := backends.Open(ctx, s, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if dev.Size() != 1<<30 {
		t.Errorf("default size %d", dev.Size())
	}
	c := dev.Caps()
	if c.ReadOnly || !c.Trim || !c.Zero || !c.FastZero || !c.Extents || !c.MultiConn || !c.FUA || !c.Flush {
		t.Errorf("caps %+v", c)
	}
	if err := dev.Flush(ctx); err != nil {
		t.Error(err)
	}
	if err := dev.Cache(ctx, 0, 4096); err != nil {
		t.Error(err)
	}
}

// Trims covering whole leaves drop them; neighbours are untouched.
func TestLeafFree(t *testing.T) {
	d := New(3 * leafBytes)
	offs := []uint64{leafBytes - 1, leafBytes, 2*leafBytes - 1, 2*leafBytes + 5}
	for _, off := range offs {
		if err := d.WriteAt(ctx, []byte{0x5A}, off, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Trim(ctx, leafBytes, leafBytes, false); err != nil {
		t.Fatal(err)
	}
	m := d.t.top[0].Load()
	if m[0].Load() == nil || m[1].Load() != nil || m[2].Load() == nil {
		t.Errorf("leaves after trim: %v %v %v", m[0].Load() != nil, m[1].Load() != nil, m[2].Load() != nil)
	}
	for i, want := range []byte{0x5A, 0, 0, 0x5A} {
		b := []byte{1}
		if err := d.ReadAt(ctx, b, offs[i]); err != nil || b[0] != want {
			t.Errorf("byte at %d = %x, %v; want %x", offs[i], b[0], err, want)
		}
	}
	if n := d.t.pages(); n != 2 {
		t.Errorf("%d pages left; want 2", n)
	}
}

// Benchmarks over a 256 MiB working set, written first so that the
// steady state (no page allocation) is measured.
const benchSet = 256 << 20

func benchDevice(b *testing.B) *Device {
	d := New(1 << 30)
	buf := bytes.Repeat([]byte{0xC3}, 1<<20)
	for off := uint64(0); off < benchSet; off += uint64(len(buf)) {
		if err := d.WriteAt(ctx, buf, off, false); err != nil {
			b.Fatal(err)
		}
	}
	return d
}

func randomOffsets(n int, align uint64) []uint64 {
	rng := rand.New(rand.NewPCG(7, 7))
	offs := make([]uint64, n)
	for i := range offs {
		offs[i] = rng.Uint64N(benchSet/align) * align
	}
	return offs
}

func benchOp(b *testing.B, size int, random bool, write bool) {
	d := benchDevice(b)
	offs := randomOffsets(1<<16, uint64(size))
	buf := bytes.Repeat([]byte{0x3C}, size)
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		off := uint64(i*size) % benchSet
		if random {
			off = offs[i%len(offs)]
		}
		var err error
		if write {
			err = d.WriteAt(ctx, buf, off, false)
		} else {
			err = d.ReadAt(ctx, buf, off)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRead4KRandom(b *testing.B)  { benchOp(b, 4096, true, false) }
func BenchmarkWrite4KRandom(b *testing.B) { benchOp(b, 4096, true, true) }
func BenchmarkRead1MSeq(b *testing.B)     { benchOp(b, 1<<20, false, false) }
func BenchmarkWrite1MSeq(b *testing.B)    { benchOp(b, 1<<20, false, true) }

// Parallel 4 KiB random mixed I/O, as from many connections.
func BenchmarkParallel4KRandomRW(b *testing.B) {
	d := benchDevice(b)
	offs := randomOffsets(1<<16, 4096)
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := bytes.Repeat([]byte{0x3C}, 4096)
		i := rand.IntN(len(offs))
		for pb.Next() {
			off := offs[i%len(offs)]
			var err error
			if i%4 == 0 {
				err = d.WriteAt(ctx, buf, off, false)
			} else {
				err = d.ReadAt(ctx, buf, off)
			}
			if err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}

// Reads of never-written space return zeros without allocating.
func BenchmarkRead4KHole(b *testing.B) {
	d := New(1 << 40)
	buf := make([]byte, 4096)
	b.SetBytes(4096)
	b.ReportAllocs()
	for i := uint64(0); b.Loop(); i++ {
		if err := d.ReadAt(ctx, buf, (i*7919*4096)%(1<<40)); err != nil {
			b.Fatal(err)
		}
	}
}

// Lend hands out the very bytes ReadAt would copy, and knows holes.
func TestLendMatchesReadAt(t *testing.T) {
	ctx := context.Background()
	const size = 4 << 20
	d := New(size)
	rng := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < 50; i++ {
		p := make([]byte, 1+rng.IntN(200<<10))
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		off := uint64(rng.IntN(size - len(p)))
		if err := d.WriteAt(ctx, p, off, false); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 200; i++ {
		n := uint64(1 + rng.IntN(300<<10))
		off := uint64(rng.IntN(size - int(n)))
		want := make([]byte, n)
		if err := d.ReadAt(ctx, want, off); err != nil {
			t.Fatal(err)
		}
		vec, zero, err := d.Lend(off, n, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := bytes.Join(vec, nil); !bytes.Equal(got, want) {
			t.Fatalf("Lend(%d, %d) differs from ReadAt", off, n)
		}
		if zero && bytes.ContainsFunc(want, func(r rune) bool { return r != 0 }) {
			t.Fatalf("Lend(%d, %d) says zero over data", off, n)
		}
	}
	empty := New(1 << 40)
	vec, zero, err := empty.Lend(1<<39, 1<<20, nil)
	if err != nil || !zero || len(bytes.Join(vec, nil)) != 1<<20 {
		t.Fatalf("hole: zero=%v err=%v", zero, err)
	}
	if _, _, err := empty.Lend(1<<40-10, 20, nil); err == nil {
		t.Fatal("out-of-range Lend succeeded")
	}
}

func TestResize(t *testing.T) {
	ctx := context.Background()
	const size = 3*pageSize + 10
	d := New(size)
	full := bytes.Repeat([]byte{0xab}, size)
	if err := d.WriteAt(ctx, full, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := backends.Resize(ctx, d, size-1); !errors.Is(err, backends.ErrInvalid) {
		t.Errorf("shrink error = %v; want ErrInvalid", err)
	}
	if err := backends.Resize(ctx, d, 1<<51); !errors.Is(err, backends.ErrNotSupported) {
		t.Errorf("grow past capacity error = %v; want ErrNotSupported", err)
	}
	const grown = 10 * pageSize
	if err := backends.Resize(ctx, d, grown); err != nil {
		t.Fatal(err)
	}
	if d.Size() != grown {
		t.Fatalf("Size = %d after resize", d.Size())
	}
	got := make([]byte, grown)
	if err := d.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:size], full) || !isZero(got[size:size+pageSize]) || !bytes.Equal(got[size+pageSize:], make([]byte, grown-size-pageSize)) {
		t.Error("old data changed or new tail not zero")
	}
	if err := d.WriteAt(ctx, []byte{1}, grown-1, false); err != nil {
		t.Errorf("write at new end: %v", err)
	}
	if err := d.WriteAt(ctx, []byte{1}, grown, false); !errors.Is(err, backends.ErrInvalid) {
		t.Errorf("write past new end: %v", err)
	}
}

// writeBorrowed writes p at off the way the NBD server does for a memory
// device: into the lent pages, then committed.
func writeBorrowed(t *testing.T, d *Device, p []byte, off uint64) {
	t.Helper()
	vec, err := d.BorrowWrite(off, uint64(len(p)), nil)
	if err != nil {
		t.Fatal(err)
	}
	rest := p
	for _, b := range vec {
		rest = rest[copy(b, rest):]
	}
	if len(rest) != 0 {
		t.Fatalf("borrowed %d bytes short of %d", len(rest), len(p))
	}
	d.CommitWrite(off, uint64(len(p)))
}

func TestBorrowWrite(t *testing.T) {
	d := New(4 * pageSize)
	if _, err := d.BorrowWrite(3*pageSize, pageSize+1, nil); err == nil {
		t.Error("borrowing past the end succeeded")
	}
	// Zeros written in place do not stay stored.
	writeBorrowed(t, d, make([]byte, pageSize+300), 100)
	if n := d.t.pages(); n != 0 {
		t.Errorf("writing zeros in place stored %d pages", n)
	}
	data := bytes.Repeat([]byte{9}, 2*pageSize)
	writeBorrowed(t, d, data, 0)
	if n := d.t.pages(); n != 2 {
		t.Errorf("%d pages after writing two in place", n)
	}
	got := make([]byte, 2*pageSize)
	if err := d.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after write in place differs: %v", err)
	}
	// While a write of the first page's head is in flight, a trim of
	// the rest of that page must not free it and lose the write (the
	// page is all zeros until the borrower fills it).
	if err := d.Zero(ctx, 0, 100, 0); err != nil {
		t.Fatal(err)
	}
	vec, err := d.BorrowWrite(0, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(ctx, 100, pageSize-100, false); err != nil {
		t.Fatal(err)
	}
	copy(vec[0], bytes.Repeat([]byte{5}, 100))
	d.CommitWrite(0, 100)
	head := make([]byte, 101)
	if err := d.ReadAt(ctx, head, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(head, append(bytes.Repeat([]byte{5}, 100), 0)) {
		t.Errorf("write in place lost to a trim of the rest of its page: %v", head)
	}
	// A borrow left unfilled (the client went away) stores nothing new.
	if _, err := d.BorrowWrite(3*pageSize, 10, nil); err != nil {
		t.Fatal(err)
	}
	d.CommitWrite(3*pageSize, 10)
	if n := d.t.pages(); n != 2 {
		t.Errorf("%d pages after an unfilled borrow, want 2", n)
	}
}
