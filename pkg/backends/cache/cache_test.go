package cache

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/data"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// A slow origin (5 ms per request) behind the cache: the second pass is
// served without one backend read.
func TestHitsSkipSlowOrigin(t *testing.T) {
	const size, bs = 2 << 20, 64 << 10
	org := newMem(size)
	want := pattern(size, 3)
	if err := org.Device.WriteAt(ctx, want, 0, false); err != nil {
		t.Fatal(err)
	}
	org.delay = 5 * time.Millisecond
	d := mustOpen(t, org, cfg(t, modeWriteback, 64<<20, bs))
	defer d.Close()
	for i := uint64(0); i < size; i += 4096 {
		devtest.CheckRead(t, "first pass", d, i, want[i:i+4096])
	}
	misses := org.reads.Load()
	if misses != size/bs {
		t.Fatalf("first pass made %d backend reads, want one per block (%d)", misses, size/bs)
	}
	for i := uint64(0); i < size; i += 4096 {
		devtest.CheckRead(t, "second pass", d, i, want[i:i+4096])
	}
	if n := org.reads.Load() - misses; n != 0 {
		t.Fatalf("second pass made %d backend reads, want 0", n)
	}
	// One large read over cached and uncached ranges fetches the missing
	// run in one request.
	devtest.CheckRead(t, "whole", d, 0, want)
	if n := org.reads.Load() - misses; n != 0 {
		t.Fatalf("whole read made %d backend reads, want 0", n)
	}
}

// A block-aligned miss is fetched straight into the caller's buffer; the
// blocks it stored must still serve later reads without the backend.
func TestAlignedMissIsCached(t *testing.T) {
	const size, bs = 1 << 20, 64 << 10
	org := newMem(size)
	want := pattern(size, 5)
	if err := org.Device.WriteAt(ctx, want, 0, false); err != nil {
		t.Fatal(err)
	}
	d := mustOpen(t, org, cfg(t, modeWriteback, 64<<20, bs))
	defer d.Close()
	devtest.CheckRead(t, "aligned miss", d, bs, want[bs:4*bs])
	misses := org.reads.Load()
	if misses == 0 {
		t.Fatal("aligned miss made no backend read")
	}
	for i := uint64(bs); i < 4*bs; i += 4096 {
		devtest.CheckRead(t, "hit", d, i, want[i:i+4096])
	}
	if n := org.reads.Load() - misses; n != 0 {
		t.Fatalf("reads of fetched blocks made %d backend reads, want 0", n)
	}
}

// Concurrent misses on one block fetch it once.
func TestConcurrentMissesFetchOnce(t *testing.T) {
	org := newMem(1 << 20)
	want := pattern(1<<20, 9)
	org.Device.WriteAt(ctx, want, 0, false)
	org.gate = make(chan struct{})
	d := mustOpen(t, org, cfg(t, modeWritethrough, 8<<20, 64<<10))
	defer d.Close()
	const n = 32
	var started, wg sync.WaitGroup
	started.Add(n)
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 512)
			off := uint64(i * 1000)
			started.Done()
			if err := d.ReadAt(ctx, p, off); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(p, want[off:off+512]) {
				errs <- errors.New("wrong data")
			}
		}()
	}
	started.Wait()
	// Let the readers reach the miss (more of them pile up the longer we
	// wait; the assertion holds however many do).
	for range 100 {
		d.mu.Lock()
		e := d.entries[0]
		waiting := e != nil && e.wait != nil
		d.mu.Unlock()
		if waiting {
			break
		}
		time.Sleep(time.Millisecond)
	}
	close(org.gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if r := org.reads.Load(); r != 1 {
		t.Fatalf("%d concurrent misses on one block made %d backend reads, want 1", n, r)
	}
}

// The cap holds: least recently used clean blocks go, holes are punched,
// recent blocks stay.
func TestLRUEvictionUnderCap(t *testing.T) {
	const bs, capBlocks = 64 << 10, 16
	org := newMem(8 << 20)
	want := pattern(8<<20, 1)
	org.Device.WriteAt(ctx, want, 0, false)
	c := cfg(t, modeWriteback, capBlocks*bs, bs)
	d := mustOpen(t, org, c)
	defer d.Close()
	for b := uint64(0); b < 64; b++ {
		devtest.CheckRead(t, "read", d, b*bs, want[b*bs:(b+1)*bs])
		if used, _ := d.stats(); used > capBlocks {
			t.Fatalf("after block %d: %d blocks cached, cap %d", b, used, capBlocks)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(c.Dir, "data"), &st); err != nil {
		t.Fatal(err)
	}
	// 64 blocks went through; without hole punching all would be
	// allocated. (The slack is for file systems' preallocation.)
	if alloc := st.Blocks * 512; alloc > 2*capBlocks*bs {
		t.Fatalf("data file holds %d bytes, cap %d: holes not punched", alloc, capBlocks*bs)
	}
	before := org.reads.Load()
	devtest.ReadAll(t, d, 63*bs, bs) // most recent: a hit
	if org.reads.Load() != before {
		t.Fatal("most recently read block was evicted")
	}
	devtest.ReadAll(t, d, 0, bs) // least recent: gone
	if org.reads.Load() != before+1 {
		t.Fatal("least recently read block is still cached")
	}
	// Touching a block keeps it: read 10, then fill past the cap again.
	devtest.ReadAll(t, d, 10*bs, bs)
	devtest.ReadAll(t, d, 10*bs, bs)
	for b := uint64(20); b < 34; b++ {
		devtest.ReadAll(t, d, b*bs, bs)
		devtest.ReadAll(t, d, 10*bs, bs)
	}
	if d.stateOf(10) != stateClean {
		t.Fatal("a block read all along was evicted")
	}
	// The background reclaim brings the cache to the low watermark.
	d.reclaim()
	d.reclaim()
	if used, _ := d.stats(); used > capBlocks*highPct/100 {
		t.Fatalf("after reclaim %d blocks cached, high watermark %d", used, capBlocks*highPct/100)
	}
}

// Dirty blocks are never evicted before they are written back; with the
// cap all dirty, reads go around the cache and writes through it.
func TestDirtyNeverEvicted(t *testing.T) {
	const bs, capBlocks = 64 << 10, 8
	mem := newMem(4 << 20)
	g := &gateWrites{Device: mem, gate: make(chan struct{})}
	d := mustOpen(t, g, cfg(t, modeWriteback, capBlocks*bs, bs))
	model := make([]byte, 4<<20)
	for b := uint64(0); b < capBlocks; b++ {
		p := pattern(bs, byte(b))
		if err := d.WriteAt(ctx, p, b*bs, false); err != nil {
			t.Fatal(err)
		}
		copy(model[b*bs:], p)
	}
	if _, dirty := d.stats(); dirty != capBlocks {
		t.Fatalf("%d dirty blocks, want %d", dirty, capBlocks)
	}
	// More reads than the cap: all around the cache.
	for b := uint64(capBlocks); b < 3*capBlocks; b++ {
		devtest.CheckRead(t, "read around", d, b*bs, model[b*bs:(b+1)*bs])
	}
	for b := uint64(0); b < capBlocks; b++ {
		if s := d.stateOf(b); s != stateDirty {
			t.Fatalf("block %d is %s, want dirty", b, fmtState(s))
		}
	}
	// A write with no room goes to the backend before it is acknowledged.
	g.mu.Lock()
	close(g.gate)
	g.gate = nil
	g.mu.Unlock()
	p := pattern(bs, 77)
	copy(model[20*bs:], p)
	if err := d.WriteAt(ctx, p, 20*bs, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	devtest.CheckRead(t, "backend after close", mem.Device, 0, model)
}

func TestWritebackFlushAndFUA(t *testing.T) {
	const bs = 64 << 10
	org := newMem(4 << 20)
	d := mustOpen(t, org, cfg(t, modeWriteback, 1<<20, bs))
	defer d.Close()
	p := pattern(3*bs+100, 5)
	if err := d.WriteAt(ctx, p, 1000, false); err != nil {
		t.Fatal(err)
	}
	if org.writes.Load() != 0 {
		t.Fatal("writeback wrote the backend before a flush")
	}
	devtest.CheckRead(t, "read back", d, 1000, p)
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	devtest.CheckRead(t, "backend after flush", org.Device, 1000, p)
	if org.flushes.Load() == 0 {
		t.Fatal("flush did not flush the backend")
	}
	if _, dirty := d.stats(); dirty != 0 {
		t.Fatalf("%d dirty blocks after flush", dirty)
	}
	q := pattern(5000, 99)
	if err := d.WriteAt(ctx, q, 2<<20+10, true); err != nil {
		t.Fatal(err)
	}
	devtest.CheckRead(t, "backend after FUA", org.Device, 2<<20+10, q)
}

func TestWritethroughAcksAfterBackend(t *testing.T) {
	const bs = 64 << 10
	org := newMem(4 << 20)
	d := mustOpen(t, org, cfg(t, modeWritethrough, 1<<20, bs))
	defer d.Close()
	devtest.ReadAll(t, d, 0, 2*bs) // cache two blocks
	p := pattern(bs, 7)
	if err := d.WriteAt(ctx, p, bs/2, false); err != nil {
		t.Fatal(err)
	}
	devtest.CheckRead(t, "backend", org.Device, bs/2, p)
	reads := org.reads.Load()
	devtest.CheckRead(t, "cache", d, bs/2, p)
	if org.reads.Load() != reads {
		t.Fatal("a written cached block was not served from the cache")
	}
	if _, dirty := d.stats(); dirty != 0 {
		t.Fatal("writethrough left dirty blocks")
	}
	// A whole block written is cached too.
	if err := d.WriteAt(ctx, p, 3*bs, false); err != nil {
		t.Fatal(err)
	}
	if d.stateOf(3) != stateClean {
		t.Fatal("a whole block written through is not cached")
	}
}

func TestUnsafeIgnoresFlushButCloseWritesBack(t *testing.T) {
	org := newMem(1 << 20)
	d := mustOpen(t, org, cfg(t, modeUnsafe, 1<<20, 4096))
	p := pattern(10000, 1)
	if err := d.WriteAt(ctx, p, 0, true); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if org.writes.Load() != 0 || org.flushes.Load() != 0 {
		t.Fatal("unsafe mode honoured FLUSH/FUA")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	devtest.CheckRead(t, "backend after close", org.Device, 0, p)
	if !org.closed.Load() {
		t.Fatal("Close did not close the backend")
	}
}

// A read-only backend gets a read cache and stays read-only.
func TestReadOnlyBackendIsReadCache(t *testing.T) {
	img := pattern(300000, 4)
	org := &countDev{Device: data.New(img, 1<<20)}
	d := mustOpen(t, org, cfg(t, modeWriteback, 1<<20, 64<<10))
	defer d.Close()
	if !d.Caps().ReadOnly {
		t.Fatal("Caps.ReadOnly lost")
	}
	devtest.CheckRead(t, "read", d, 0, img)
	n := org.reads.Load()
	devtest.CheckRead(t, "again", d, 1000, img[1000:201000])
	if org.reads.Load() != n {
		t.Fatal("read-only backend not cached")
	}
	devtest.CheckReadOnly(t, d)
}

// A closed cache is reopened warm: its blocks are served without the
// backend.
func TestReopenKeepsCleanBlocks(t *testing.T) {
	org := newMem(2 << 20)
	want := pattern(2<<20, 8)
	org.Device.WriteAt(ctx, want, 0, false)
	c := cfg(t, modeWriteback, 4<<20, 64<<10)
	d := mustOpen(t, org, c)
	devtest.ReadAll(t, d, 0, 1<<20)
	d.Close()
	org2 := &countDev{Device: org.Device}
	d = mustOpen(t, org2, c)
	defer d.Close()
	devtest.CheckRead(t, "warm", d, 0, want[:1<<20])
	if org2.reads.Load() != 0 {
		t.Fatalf("reopened cache made %d backend reads", org2.reads.Load())
	}
	// A second opener of the same directory is refused.
	if _, err := Open(ctx, org2, c); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second open of one cache dir: %v", err)
	}
}

func TestExtentsReportDirtyAsData(t *testing.T) {
	const bs = 64 << 10
	org := newMem(1 << 20)
	d := mustOpen(t, org, cfg(t, modeWriteback, 1<<20, bs))
	defer d.Close()
	if err := d.WriteAt(ctx, []byte{1}, 3*bs+5, false); err != nil {
		t.Fatal(err)
	}
	var got []backends.Extent
	if err := d.Extents(ctx, 0, 1<<20, func(e backends.Extent) { got = append(got, e) }); err != nil {
		t.Fatal(err)
	}
	hole := backends.ExtentHole | backends.ExtentZero
	want := []backends.Extent{{Length: 3 * bs, Flags: hole}, {Length: bs}, {Length: 1<<20 - 4*bs, Flags: hole}}
	if !slices.Equal(got, want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
}

func TestZeroAndTrim(t *testing.T) {
	const bs = 4096
	for _, m := range []mode{modeWriteback, modeWritethrough} {
		t.Run(m.String(), func(t *testing.T) {
			org := newMem(64 * bs)
			org.Device.WriteAt(ctx, pattern(64*bs, 1), 0, false)
			d := mustOpen(t, org, cfg(t, m, 1<<20, bs))
			defer d.Close()
			model := devtest.ReadAll(t, d, 0, 64*bs)
			d.WriteAt(ctx, pattern(3*bs, 2), 10*bs, false)
			copy(model[10*bs:], pattern(3*bs, 2))
			if err := d.Zero(ctx, 5*bs+100, 7*bs, 0); err != nil {
				t.Fatal(err)
			}
			clear(model[5*bs+100 : 12*bs+100])
			devtest.CheckRead(t, "after zero", d, 0, model)
			if err := d.Trim(ctx, 30*bs, 4*bs, false); err != nil {
				t.Fatal(err)
			}
			clear(model[30*bs : 34*bs])
			devtest.CheckRead(t, "after trim", d, 0, model)
			if err := d.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			devtest.CheckRead(t, "backend", org.Device, 0, model)
		})
	}
}

// Random operations from several goroutines on disjoint regions, in every
// mode, with a tiny cap (eviction, write-around, background writeback all
// interleave), checked against a model, then the backend after Close.
func TestRandomConcurrentModel(t *testing.T) {
	for _, m := range []mode{modeWriteback, modeWritethrough, modeUnsafe} {
		t.Run(m.String(), func(t *testing.T) {
			const bs = 4096
			const region = 40 * bs
			const workers = 4
			size := uint64(workers * region)
			org := newMem(size)
			d := mustOpen(t, org, cfg(t, m, 24*bs, bs))
			model := make([]byte, size)
			var wg sync.WaitGroup
			errc := make(chan error, workers)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(w), 1))
					base := uint64(w * region)
					for i := 0; i < 400; i++ {
						off := base + r.Uint64N(region-1)
						n := 1 + r.Uint64N(min(region-(off-base), 3*bs))
						switch r.IntN(8) {
						case 0, 1, 2:
							p := make([]byte, n)
							for j := range p {
								p[j] = byte(r.Uint32())
							}
							if err := d.WriteAt(ctx, p, off, r.IntN(8) == 0); err != nil {
								errc <- err
								return
							}
							copy(model[off:], p)
						case 3:
							if err := d.Zero(ctx, off, n, 0); err != nil {
								errc <- err
								return
							}
							clear(model[off : off+n])
						case 4:
							if err := d.Flush(ctx); err != nil {
								errc <- err
								return
							}
						case 5:
							if err := d.Cache(ctx, off, n); err != nil {
								errc <- err
								return
							}
						default:
							p := make([]byte, n)
							if err := d.ReadAt(ctx, p, off); err != nil {
								errc <- err
								return
							}
							if !bytes.Equal(p, model[off:off+n]) {
								errc <- errors.New("read does not match the model")
								return
							}
						}
					}
				}()
			}
			wg.Wait()
			close(errc)
			for err := range errc {
				t.Fatal(err)
			}
			devtest.CheckRead(t, "through cache", d, 0, model)
			if used, _ := d.stats(); used > 24 {
				t.Fatalf("%d blocks cached over a cap of 24", used)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			devtest.CheckRead(t, "backend after close", org.Device, 0, model)
		})
	}
}

// Every bad option is refused with a message naming it.
func TestBadOptionsNamed(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ spec, key string }{
		{"cache=fast;memory:", "cache"},
		{"cache=writeback,cache-size=lots;memory:", "cache-size"},
		{"cache=writeback,cache-on-read=maybe;memory:", "cache-on-read"},
		{"cache=writeback,cache-block=-1;memory:", "cache-block"},
		{"cache=writeback,cache-block=6000;memory:", "cache-block"},
		{"cache=writeback,cache-block=2Ki;memory:", "cache-block"},
		{"cache=writeback,cache-block=32Mi;memory:", "cache-block"},
		{"cache=writeback,cache-size=16Ki;memory:", "cache-size"},
		{"cache=writeback,cache-dir=relative/dir;memory:", "cache-dir"},
		{"cache-size=2Gi;memory:", "cache-size"},
		{"cache-dir=" + dir + ";memory:", "cache-dir"},
		{"cache=writeback,cache-dir=/proc/no/such;memory:", "cache-dir"},
	} {
		s, err := backends.Parse(c.spec)
		if err == nil {
			err = Validate(s)
			if strings.Contains(c.spec, "/proc/") {
				err = nil // only opening finds this one
			}
			if err == nil {
				var dev backends.Device
				dev, err = backends.Open(ctx, s, backends.Env{StateDir: t.TempDir()})
				if err == nil {
					dev.Close()
				}
			}
		}
		if err == nil {
			t.Errorf("%q accepted", c.spec)
			continue
		}
		if !strings.Contains(err.Error(), `"`+c.key+`"`) {
			t.Errorf("%q: error %q does not name %q", c.spec, err, c.key)
		}
	}
	// And good ones open.
	for _, spec := range []string{
		"cache=writeback;memory:",
		"cache=writethrough,cache-block=4Ki,cache-size=1Mi,size=1Mi;memory:",
		"cache=unsafe,cache-on-read=false,cache-dir=" + filepath.Join(dir, "c") + ";memory:",
	} {
		dev, err := devtest.TryOpen(spec, backends.Env{StateDir: t.TempDir()})
		if err != nil {
			t.Fatalf("%q: %v", spec, err)
		}
		if _, ok := dev.(*Device); !ok {
			t.Fatalf("%q: not a cache device: %T", spec, dev)
		}
		dev.Close()
	}
}

// A cache-on-read=false cache keeps only written blocks.
func TestNoCacheOnRead(t *testing.T) {
	org := newMem(1 << 20)
	c := cfg(t, modeWriteback, 1<<20, 4096)
	c.OnRead = false
	d := mustOpen(t, org, c)
	defer d.Close()
	devtest.ReadAll(t, d, 0, 8192)
	devtest.ReadAll(t, d, 0, 8192)
	if org.reads.Load() != 2 {
		t.Fatalf("%d backend reads, want 2 (nothing cached)", org.reads.Load())
	}
	d.WriteAt(ctx, pattern(4096, 1), 0, false)
	devtest.ReadAll(t, d, 0, 4096)
	if org.reads.Load() != 2 {
		t.Fatal("written block not served from the cache")
	}
}

func TestResizeForwards(t *testing.T) {
	// Without a Resizer underneath, the cache cannot grow either.
	d := mustOpen(t, newMem(1<<20), cfg(t, modeWriteback, 1<<20, 4096))
	if err := backends.Resize(ctx, d, 2<<20); !errors.Is(err, backends.ErrNotSupported) && d.Size() != 2<<20 {
		t.Fatalf("resize over a backend without Resizer: %v", err)
	}
	d.Close()

	// Over a growable backend: the short last block is refetched, the
	// grown part reads zeros and takes writes that reach the backend.
	const size = 100000 // not a block multiple
	fd := openFileDev(t, filepath.Join(t.TempDir(), "b"), size)
	want := pattern(size, 2)
	fd.WriteAt(ctx, want, 0, false)
	d = mustOpen(t, fd, cfg(t, modeWriteback, 1<<20, 16<<10))
	defer d.Close()
	devtest.CheckRead(t, "before", d, 0, want)
	if err := backends.Resize(ctx, d, 3*size); err != nil {
		t.Fatal(err)
	}
	if d.Size() != 3*size || fd.size != 3*size {
		t.Fatalf("sizes after resize: cache %d, backend %d", d.Size(), fd.size)
	}
	want = append(want, make([]byte, 2*size)...)
	devtest.CheckRead(t, "after", d, 0, want)
	p := pattern(5000, 9)
	if err := d.WriteAt(ctx, p, 2*size, false); err != nil {
		t.Fatal(err)
	}
	copy(want[2*size:], p)
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	devtest.CheckRead(t, "backend", fd, 0, want)
	if err := backends.Resize(ctx, d, size); !errors.Is(err, backends.ErrInvalid) {
		t.Fatalf("shrink: %v, want EINVAL", err)
	}
}

// The fixed order: cow above cache above the backend, whatever the
// spec's order, and the stack works as one volume.
func TestStackCowOverCacheOverData(t *testing.T) {
	img := pattern(50000, 3)
	dev := devtest.Open(t, "cow=true,cow-block=4Ki,cache=writeback,cache-block=4Ki,size=256Ki;data:;base64,"+
		base64.StdEncoding.EncodeToString(img), backends.Env{StateDir: t.TempDir()})
	if got := fmt.Sprintf("%T", dev); got != "*cow.Device" {
		t.Fatalf("outermost layer %s, want *cow.Device", got)
	}
	want := append(img, make([]byte, 256<<10-len(img))...)
	copy(want[1000:], "written over a read-only cached origin")
	if err := dev.WriteAt(ctx, []byte("written over a read-only cached origin"), 1000, false); err != nil {
		t.Fatal(err)
	}
	devtest.CheckRead(t, "stack", dev, 0, want)
}

func TestMain(m *testing.M) {
	if os.Getenv(crashChildEnv) != "" {
		crashChild()
		return
	}
	os.Exit(m.Run())
}

// Retuning the cache keeps its default directory (dirty blocks left by a
// crash must be found again); another backend gets another one.
func TestDefaultDirKeyedByBackend(t *testing.T) {
	env := backends.Env{StateDir: t.TempDir()}
	dir := func(spec string) string {
		dev, err := devtest.TryOpen(spec, env)
		if err != nil {
			t.Fatal(err)
		}
		defer dev.Close()
		return dev.(*Device).dir
	}
	a := dir("cache=writeback,size=1Mi;memory:a")
	if b := dir("cache=unsafe,cache-size=8Mi,cache-block=4Ki,size=1Mi;memory:a"); b != a {
		t.Fatalf("retuned cache moved from %s to %s", a, b)
	}
	if c := dir("cache=writeback,size=2Mi;memory:a"); c == a {
		t.Fatal("another backend shares the cache directory")
	}
}

// volume= tells apart volumes sharing one origin, so their caches too.
func TestDefaultDirKeepsVolumeOption(t *testing.T) {
	a, _ := backends.Parse("cache=writeback,volume=pvc-1;memory:")
	b, _ := backends.Parse("cache=writeback,volume=pvc-2;memory:")
	if backends.VolumeKey(backends.BackendSpec(a)) == backends.VolumeKey(backends.BackendSpec(b)) {
		t.Fatal("volume= dropped from the cache directory's key")
	}
}

// bufferedDev claims a write-back buffer in memory, as s3 does.
type bufferedDev struct{ *countDev }

func (b bufferedDev) Caps() backends.Caps {
	c := b.countDev.Caps()
	c.BufferedWrites = true
	return c
}

// A cache over a backend with a write-back buffer in memory holds every
// acknowledged write in its own files: the stack no longer says
// BufferedWrites (attach.Manager then resumes it after a crash). It does
// not hide that a memory backend's contents die with the process.
func TestCapsCoverBufferedWrites(t *testing.T) {
	for _, m := range []mode{modeWriteback, modeWritethrough} {
		d := mustOpen(t, bufferedDev{newMem(1 << 20)}, cfg(t, m, 1<<20, 64<<10))
		c := d.Caps()
		if c.BufferedWrites {
			t.Errorf("%v: the cache still reports BufferedWrites", m)
		}
		if !c.Volatile {
			t.Errorf("%v: the memory backend's Volatile was lost", m)
		}
		d.Close()
	}
}
