package readahead

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// counting is a memory device that counts what reaches it, optionally
// claims a cache (so readahead goes there as Cache calls) and optionally
// delays every read like a remote origin.
type counting struct {
	*memory.Device
	cache bool
	delay time.Duration

	reads, readBytes atomic.Int64
	mu               sync.Mutex
	caches           [][2]uint64 // Cache calls: offset, length
}

func newCounting(size uint64, cache bool) *counting {
	return &counting{Device: memory.New(size), cache: cache}
}

func (c *counting) Caps() backends.Caps {
	caps := c.Device.Caps()
	caps.Cache = c.cache
	caps.Fast = c.delay == 0
	return caps
}

func (c *counting) ReadAt(ctx context.Context, p []byte, off uint64) error {
	c.reads.Add(1)
	c.readBytes.Add(int64(len(p)))
	if c.delay > 0 {
		time.Sleep(c.delay)
	}
	return c.Device.ReadAt(ctx, p, off)
}

func (c *counting) Cache(_ context.Context, off, length uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.caches = append(c.caches, [2]uint64{off, length})
	return nil
}

func (c *counting) cacheCalls() [][2]uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([][2]uint64(nil), c.caches...)
}

// fill writes a pattern that differs in every 8 bytes.
func fill(t *testing.T, dev backends.Device, size int) []byte {
	t.Helper()
	data := make([]byte, size)
	for i := 0; i < size; i += 8 {
		binary.LittleEndian.PutUint64(data[i:], uint64(i)*0x9e3779b97f4a7c15)
	}
	if err := dev.WriteAt(context.Background(), data, 0, false); err != nil {
		t.Fatal(err)
	}
	return data
}

func readSeq(t *testing.T, d backends.Device, want []byte, bs int) {
	t.Helper()
	ctx := context.Background()
	buf := make([]byte, bs)
	for off := 0; off < len(want); off += bs {
		if err := d.ReadAt(ctx, buf, uint64(off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, want[off:off+bs]) {
			t.Fatalf("wrong data at %d", off)
		}
	}
}

func TestSequentialReadsAreServedFromTheWindow(t *testing.T) {
	const size, bs = 16 << 20, 64 << 10
	inner := newCounting(size, false)
	want := fill(t, inner, size)
	d := New(inner, DefaultMax)
	defer d.Close()
	readSeq(t, d, want, bs)

	st := d.Stats()
	reads := int64(size / bs)
	t.Logf("%d reads: %d reached the device, stats %+v", reads, inner.reads.Load(), st)
	if st.Prefetches == 0 || st.HitBytes < size/2 {
		t.Errorf("stats %+v: want readahead answering most of %d bytes", st, size)
	}
	if n := inner.reads.Load(); n > reads/4 {
		t.Errorf("%d of %d reads reached the device", n, reads)
	}
	// The window grows to readahead-max and stays within the budget.
	d.mu.Lock()
	held := d.held
	d.mu.Unlock()
	if held > d.budget {
		t.Errorf("window holds %d bytes, budget %d", held, d.budget)
	}
}

func TestRandomReadsDoNotReadAhead(t *testing.T) {
	const size, bs, n = 1 << 30, 4096, 500
	inner := newCounting(size, false)
	d := New(inner, DefaultMax)
	defer d.Close()
	rng := rand.New(rand.NewPCG(1, 2)) // fixed: the test is deterministic
	buf := make([]byte, bs)
	for range n {
		off := rng.Uint64N(size/bs) * bs
		if err := d.ReadAt(context.Background(), buf, off); err != nil {
			t.Fatal(err)
		}
	}
	if st := d.Stats(); st.Prefetches != 0 {
		t.Errorf("random reads read ahead: %+v", st)
	}
	if got := inner.readBytes.Load(); got != n*bs {
		t.Errorf("device read %d bytes for %d random reads of %d", got, n, bs)
	}
}

func TestStreamStopsOnRandomAccess(t *testing.T) {
	const size = 1 << 30
	inner := newCounting(size, true)
	d := NewOverCache(inner, DefaultMax)
	defer d.Close()
	ctx := context.Background()
	buf := make([]byte, 64<<10)
	for off := uint64(0); off < 1<<20; off += uint64(len(buf)) {
		d.ReadAt(ctx, buf, off)
	}
	d.wg.Wait()
	before := len(inner.cacheCalls())
	if before == 0 {
		t.Fatal("sequential reads did not read ahead")
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 200 {
		d.ReadAt(ctx, buf, rng.Uint64N(size/4096)*4096)
	}
	d.wg.Wait()
	if after := len(inner.cacheCalls()); after != before {
		t.Errorf("random reads after a stream read ahead %d more times", after-before)
	}
}

func TestReadaheadGoesToTheCacheBelow(t *testing.T) {
	const size, bs = 32 << 20, 64 << 10
	const maxWin = 1 << 20
	inner := newCounting(size, true)
	want := fill(t, inner, size)
	d := NewOverCache(inner, maxWin)
	defer d.Close()
	readSeq(t, d, want, bs)
	d.wg.Wait()

	calls := inner.cacheCalls()
	// Cache calls run in the background: they arrive in any order.
	slices.SortFunc(calls, func(a, b [2]uint64) int { return cmp.Compare(a[0], b[0]) })
	if len(calls) == 0 {
		t.Fatal("no Cache calls")
	}
	if st := d.Stats(); st.HitBytes != 0 {
		t.Errorf("window used although the device below caches: %+v", st)
	}
	if got, want := inner.reads.Load(), int64(size/bs); got != want {
		t.Errorf("%d reads reached the device, want all %d", got, want)
	}
	// Windows start at 64 KiB, double, stop at readahead-max and never ask
	// twice for the same range. (They
	// may skip a range the reader got to first while the readaheads in
	// flight were at their bound.)
	if calls[0][1] != MinWindow {
		t.Errorf("first readahead %d bytes, want %d", calls[0][1], MinWindow)
	}
	next := calls[0][0]
	biggest := uint64(0)
	for i, c := range calls {
		if c[0] < next {
			t.Errorf("readahead %d at %d overlaps the one before, up to %d", i, c[0], next)
		}
		if i > 0 && c[1] < calls[i-1][1] && c[0]+c[1] != size {
			t.Errorf("readahead %d shrank: %d after %d", i, c[1], calls[i-1][1])
		}
		next = c[0] + c[1]
		biggest = max(biggest, c[1])
	}
	if biggest != maxWin {
		t.Errorf("largest readahead %d, want readahead-max %d", biggest, maxWin)
	}
	// Whether the last windows reach the end depends on how far the
	// background Cache calls lag behind the reader (a loaded machine
	// lets the reader catch up), so that is not asserted.
}

// A reader must never see data older than a write that returned before
// its read began, even while the window is full of readahead.
func TestWritesInvalidateTheWindow(t *testing.T) {
	const size, block = 8 << 20, 4096
	inner := newCounting(size, false)
	inner.delay = 50 * time.Microsecond // widen the readahead-vs-write races
	d := New(inner, 1<<20)
	defer d.Close()
	ctx := context.Background()

	// One writer, so each block's generation only grows; committed is
	// set once the write has returned.
	var committed [size / block]atomic.Uint64
	stop := make(chan struct{})
	var writer sync.WaitGroup
	var writes atomic.Int64
	writer.Add(1)
	go func() {
		defer writer.Done()
		rng := rand.New(rand.NewPCG(7, 9))
		buf := make([]byte, block)
		for gen := uint64(1); ; gen++ {
			select {
			case <-stop:
				return
			default:
			}
			b := rng.Uint64N(size / block)
			binary.LittleEndian.PutUint64(buf, gen)
			if err := d.WriteAt(ctx, buf, b*block, false); err != nil {
				t.Error(err)
				return
			}
			committed[b].Store(gen)
			writes.Add(1)
		}
	}()
	var readers sync.WaitGroup
	var errs atomic.Int64
	for r := range 3 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			buf := make([]byte, 64<<10)
			for pass := 0; pass < 4; pass++ {
				for off := uint64(0); off < size; off += uint64(len(buf)) {
					var floor [16]uint64 // 64 KiB of blocks
					for i := range floor {
						floor[i] = committed[off/block+uint64(i)].Load()
					}
					if err := d.ReadAt(ctx, buf, off); err != nil {
						t.Error(err)
						return
					}
					for i := range floor {
						got := binary.LittleEndian.Uint64(buf[i*block:])
						if got < floor[i] && errs.Add(1) < 5 {
							t.Errorf("reader %d: block %d has generation %d, older than %d written before the read",
								r, off/block+uint64(i), got, floor[i])
						}
					}
				}
			}
		}()
	}
	readers.Wait()
	close(stop)
	writer.Wait()
	st := d.Stats()
	t.Logf("%d writes, stats %+v", writes.Load(), st)
	if st.HitBytes == 0 || st.Invalidated == 0 {
		t.Errorf("the race was not exercised: %+v", st)
	}
}

func TestOptions(t *testing.T) {
	for _, c := range []struct {
		spec    string
		on      bool
		wantErr string // from Parse or Open
	}{
		{"memory:", false, ""},
		{"readahead=true;memory:", true, ""},
		{"readahead=false;memory:", false, ""},
		{"readahead-max=1Mi;memory:", true, ""},
		{"readahead=true,readahead-max=4Mi;memory:", true, ""},
		{"readahead=false,readahead-max=1Mi;memory:", false, `"readahead"`},
		{"readahead=maybe;memory:", false, `"readahead"`},
		{"readahead-max=lots;memory:", false, `"readahead-max"`},
		{"readahead-max=1Ki;memory:", false, `"readahead-max"`},
		{"readahead-max=1Gi;memory:", false, `"readahead-max"`},
	} {
		t.Run(c.spec, func(t *testing.T) {
			dev, err := devtest.TryOpen(c.spec, backends.Env{})
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err %v, want one naming %s", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Close()
			if _, on := dev.(*Device); on != c.on {
				t.Errorf("filter on: %v, want %v", on, c.on)
			}
		})
	}
}

func TestCloseStopsReadahead(t *testing.T) {
	inner := newCounting(64<<20, false)
	inner.delay = time.Millisecond
	d := New(inner, DefaultMax)
	buf := make([]byte, 64<<10)
	for off := uint64(0); off < 1<<20; off += uint64(len(buf)) {
		if err := d.ReadAt(context.Background(), buf, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// Close waited for every readahead: nothing touches the device now.
	n := inner.reads.Load()
	time.Sleep(5 * time.Millisecond)
	if inner.reads.Load() != n {
		t.Error("readahead still running after Close")
	}
}

// A stand-in for the cache filter, registered for this test binary only:
// it claims Caps.Cache and records Cache calls.
var lastFakeCache *counting

func init() {
	backends.RegisterFilter(backends.Filter{
		Name: "tst-cache", Order: 10,
		Options: []backends.Option{{Key: "tst-cache", Kind: backends.OptBool}},
		Wrap: func(_ context.Context, _ backends.Spec, _ backends.Env, inner backends.Device) (backends.Device, error) {
			inner.Close()
			lastFakeCache = newCounting(inner.Size(), true)
			return lastFakeCache, nil
		},
	})
}

// Readahead goes into a cache filter below, but not into a backend that
// merely reports Caps.Cache (an nbd: origin forwards Cache to its server,
// which keeps nothing for us).
func TestWrapChoosesCacheOnlyWithACacheFilter(t *testing.T) {
	dev, err := devtest.TryOpen("tst-cache=true,readahead=true;memory:", backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if d := dev.(*Device); !d.useCache {
		t.Error("readahead over the cache filter uses its own window")
	}
	ctx := context.Background()
	buf := make([]byte, 64<<10)
	for off := uint64(0); off < 1<<20; off += uint64(len(buf)) {
		if err := dev.ReadAt(ctx, buf, off); err != nil {
			t.Fatal(err)
		}
	}
	dev.(*Device).wg.Wait()
	if len(lastFakeCache.cacheCalls()) == 0 {
		t.Error("no Cache calls reached the cache filter")
	}

	caching := newCounting(1<<20, true)
	s, _ := backends.Parse("readahead=true;memory:")
	f := filterNamed(t, "readahead")
	w, err := f.Wrap(ctx, s, backends.Env{}, caching)
	if err != nil {
		t.Fatal(err)
	}
	if w.(*Device).useCache {
		t.Error("readahead over a backend reporting Caps.Cache uses Cache calls")
	}
}

func filterNamed(t *testing.T, name string) backends.Filter {
	for _, f := range backends.Filters() {
		if f.Name == name {
			return f
		}
	}
	t.Fatalf("no filter %q", name)
	return backends.Filter{}
}
