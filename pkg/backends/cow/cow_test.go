package cow

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/data"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

var ctx = context.Background()

// readOnly wraps a device as a read-only origin counting its reads.
type readOnly struct {
	backends.Device
	reads atomic.Int64
}

func (r *readOnly) Caps() backends.Caps {
	c := r.Device.Caps()
	c.ReadOnly = true
	return c
}

func (r *readOnly) ReadAt(ctx context.Context, p []byte, off uint64) error {
	r.reads.Add(1)
	return r.Device.ReadAt(ctx, p, off)
}

func (r *readOnly) WriteAt(context.Context, []byte, uint64, bool) error {
	return backends.ErrReadOnly
}

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// memOrigin is a read-only origin holding img (zeros past it).
func memOrigin(t testing.TB, img []byte, size uint64) *readOnly {
	t.Helper()
	m := memory.New(size)
	if err := m.WriteAt(ctx, img, 0, false); err != nil {
		t.Fatal(err)
	}
	return &readOnly{Device: m}
}

func mustOpen(t testing.TB, origin backends.Device, c Config) *Device {
	t.Helper()
	d, err := Open(ctx, origin, c)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func sum(b []byte) [32]byte { return sha256.Sum256(b) }

// Writes over a data: origin opened from a spec: the stack is writable,
// reads merge overlay and origin, and the origin's checksum never changes.
func TestCowOverDataURIWithChecksums(t *testing.T) {
	img := pattern(200000, 1)
	spec := "cow=true,cow-block=4Ki,size=1Mi;data:;base64," + base64.StdEncoding.EncodeToString(img)
	dev := devtest.Open(t, spec, backends.Env{StateDir: t.TempDir()})
	if dev.Caps().ReadOnly {
		t.Fatal("cow over a read-only origin is read-only")
	}
	model := make([]byte, 1<<20)
	copy(model, img)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 300; i++ {
		off := r.Uint64N(1<<20 - 1)
		n := 1 + r.Uint64N(min(1<<20-off, 20000))
		switch r.IntN(5) {
		case 0, 1:
			p := pattern(int(n), uint64(i))
			if err := dev.WriteAt(ctx, p, off, false); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		case 2:
			if err := dev.Zero(ctx, off, n, 0); err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
		default:
			if got := devtest.ReadAll(t, dev, off, n); !bytes.Equal(got, model[off:off+n]) {
				t.Fatalf("op %d: read %d+%d differs from the model", i, off, n)
			}
		}
	}
	if sum(devtest.ReadAll(t, dev, 0, 1<<20)) != sum(model) {
		t.Fatal("volume checksum differs from the model")
	}
	// The origin is untouched.
	orig := data.New(img, 1<<20)
	if sum(devtest.ReadAll(t, orig, 0, 1<<20)) != sum(append(img, make([]byte, 1<<20-len(img))...)) {
		t.Fatal("origin changed")
	}
}

func TestCopyUpReadsOriginOncePerBlock(t *testing.T) {
	const bs = 64 << 10
	img := pattern(4*bs, 2)
	org := memOrigin(t, img, 4*bs)
	d := mustOpen(t, org, Config{Block: bs, Dir: t.TempDir()})
	defer d.Close()
	// Partial writes to block 1: one copy-up.
	d.WriteAt(ctx, []byte("hello"), bs+10, false)
	d.WriteAt(ctx, []byte("world"), bs+100, false)
	if n := org.reads.Load(); n != 1 {
		t.Fatalf("%d origin reads for two partial writes to one block, want 1", n)
	}
	// A whole-block write copies nothing up.
	d.WriteAt(ctx, make([]byte, bs), 2*bs, false)
	if n := org.reads.Load(); n != 1 {
		t.Fatalf("whole-block write read the origin")
	}
	want := bytes.Clone(img)
	copy(want[bs+10:], "hello")
	copy(want[bs+100:], "world")
	clear(want[2*bs : 3*bs])
	if !bytes.Equal(devtest.ReadAll(t, d, 0, 4*bs), want) {
		t.Fatal("merged read wrong")
	}
}

func TestZeroWithoutOriginAndExtents(t *testing.T) {
	const bs = 4096
	// Origin: data in its first 64 KiB page (blocks 0-15), a hole after.
	org := memOrigin(t, pattern(4*bs, 3), 64*bs)
	d := mustOpen(t, org, Config{Block: bs, Dir: t.TempDir()})
	defer d.Close()
	if err := d.Zero(ctx, 2*bs, 2*bs, backends.ZeroFast); err != nil {
		t.Fatal(err)
	}
	if org.reads.Load() != 0 {
		t.Fatal("zeroing whole blocks read the origin")
	}
	if err := d.Zero(ctx, 100, 10, backends.ZeroFast); !errors.Is(err, backends.ErrNotSupported) {
		t.Fatalf("fast zero of a partial origin block: %v, want ENOTSUP", err)
	}
	if err := d.WriteAt(ctx, []byte{9}, 20*bs, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(devtest.ReadAll(t, d, 2*bs, 2*bs), make([]byte, 2*bs)) {
		t.Fatal("zeroed blocks do not read zeros")
	}
	var got []backends.Extent
	if err := d.Extents(ctx, 0, 64*bs, func(e backends.Extent) { got = append(got, e) }); err != nil {
		t.Fatal(err)
	}
	hole := backends.ExtentHole | backends.ExtentZero
	// Origin data, zeroed overlay blocks, origin data, the origin's hole,
	// the written block, the origin's hole.
	want := []backends.Extent{{Length: 2 * bs}, {Length: 2 * bs, Flags: hole}, {Length: 12 * bs},
		{Length: 4 * bs, Flags: hole}, {Length: bs}, {Length: 43 * bs, Flags: hole}}
	if !slices.Equal(got, want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
}

func TestVolatileOverlayDiscardedOnClose(t *testing.T) {
	dir := t.TempDir()
	org := memOrigin(t, pattern(8192, 4), 1<<20)
	d := mustOpen(t, org, Config{Block: 4096, Dir: dir})
	d.WriteAt(ctx, []byte("scratch"), 0, false)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "overlay")); !os.IsNotExist(err) {
		t.Fatalf("overlay file left after close: %v", err)
	}
	d = mustOpen(t, &readOnly{Device: org.Device}, Config{Block: 4096, Dir: dir})
	defer d.Close()
	if !bytes.Equal(devtest.ReadAll(t, d, 0, 8192), pattern(8192, 4)) {
		t.Fatal("a volatile overlay outlived its close")
	}
}

func TestPersistentOverlay(t *testing.T) {
	dir := t.TempDir()
	mem := memory.New(1 << 20)
	mem.WriteAt(ctx, pattern(1<<20, 5), 0, false)
	c := Config{Block: 16 << 10, Persist: true, Dir: dir}
	model := pattern(1<<20, 5)
	d := mustOpen(t, &readOnly{Device: mem}, c)
	for i := uint64(0); i < 20; i++ {
		p := pattern(3000, i)
		off := i * 50000
		d.WriteAt(ctx, p, off, false)
		copy(model[off:], p)
	}
	d.Zero(ctx, 512<<10, 64<<10, 0)
	clear(model[512<<10 : 576<<10])
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = mustOpen(t, &readOnly{Device: mem}, c)
	if sum(devtest.ReadAll(t, d, 0, 1<<20)) != sum(model) {
		t.Fatal("persistent overlay lost data across close and open")
	}
	// A crash after a flush keeps the flushed writes: save the files as
	// they are after Flush plus a later unflushed write, as kill -9 would
	// leave them, and open a copy.
	d.WriteAt(ctx, []byte("flushed"), 7, false)
	copy(model[7:], "flushed")
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	d.WriteAt(ctx, []byte("later"), 900000, false)
	crash := t.TempDir()
	for _, n := range []string{"overlay", "bitmap"} {
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(crash, n), b, 0o600)
	}
	d.Close()
	d = mustOpen(t, &readOnly{Device: mem}, Config{Block: 16 << 10, Persist: true, Dir: crash})
	defer d.Close()
	got := devtest.ReadAll(t, d, 0, 1<<20)
	if !bytes.Equal(got[:900000], model[:900000]) || !bytes.Equal(got[900005:], model[900005:]) {
		t.Fatal("flushed overlay data lost after a crash")
	}
	// A different block size is refused, naming the option.
	d2, err := Open(ctx, &readOnly{Device: mem}, Config{Block: 4096, Persist: true, Dir: dir})
	if err == nil {
		d2.Close()
		t.Fatal("opened a persistent overlay with another block size")
	}
	if !strings.Contains(err.Error(), `"cow-block"`) {
		t.Fatalf("error %q does not name cow-block", err)
	}
}

// Concurrent writers on disjoint ranges that share blocks (copy-up races)
// and readers, checked against a model.
func TestConcurrentCopyUp(t *testing.T) {
	const bs = 16 << 10
	img := pattern(64*bs, 6)
	org := memOrigin(t, img, 64*bs)
	d := mustOpen(t, org, Config{Block: bs, Dir: t.TempDir()})
	defer d.Close()
	model := bytes.Clone(img)
	var wg sync.WaitGroup
	// Eight writers each own every eighth 1000-byte stripe, so they share
	// blocks but never bytes.
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for s := w; s*1000 < 64*bs; s += 8 {
				n := min(1000, 64*bs-s*1000)
				p := pattern(n, uint64(s))
				if err := d.WriteAt(ctx, p, uint64(s*1000), false); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for s := 0; s*1000 < 64*bs; s++ {
		n := min(1000, 64*bs-s*1000)
		copy(model[s*1000:], pattern(n, uint64(s)))
	}
	wg.Wait()
	if sum(devtest.ReadAll(t, d, 0, 64*bs)) != sum(model) {
		t.Fatal("concurrent partial writes lost data in copy-up")
	}
}

func TestBadOptionsNamed(t *testing.T) {
	for _, c := range []struct{ spec, key string }{
		{"cow=maybe;memory:", "cow"},
		{"cow=true,cow-block=5000;memory:", "cow-block"},
		{"cow=true,cow-block=1Ki;memory:", "cow-block"},
		{"cow=true,cow-block=64Mi;memory:", "cow-block"},
		{"cow=true,cow-block=x;memory:", "cow-block"},
		{"cow=true,cow-persist=sometimes;memory:", "cow-persist"},
		{"cow=true,cow-dir=rel;memory:", "cow-dir"},
		{"cow-persist=true;memory:", "cow-persist"},
		{"cow-block=4Ki;memory:", "cow-block"},
		{"cow=true,cow-dir=/proc/nope;memory:", "cow-dir"},
	} {
		s, err := backends.Parse(c.spec)
		if err == nil {
			if err = Validate(s); err == nil {
				var dev backends.Device
				if dev, err = backends.Open(ctx, s, backends.Env{StateDir: t.TempDir()}); err == nil {
					dev.Close()
				}
			}
		}
		if err == nil {
			t.Errorf("%q accepted", c.spec)
		} else if !strings.Contains(err.Error(), `"`+c.key+`"`) {
			t.Errorf("%q: error %q does not name %q", c.spec, err, c.key)
		}
	}
	for _, spec := range []string{"cow=true;memory:", "cow=true,cow-persist=true,cow-block=1Mi;data:,hi"} {
		dev, err := devtest.TryOpen(spec, backends.Env{StateDir: t.TempDir()})
		if err != nil {
			t.Fatalf("%q: %v", spec, err)
		}
		if _, ok := dev.(*Device); !ok {
			t.Fatalf("%q: %T", spec, dev)
		}
		dev.Close()
	}
}

func FuzzParseBitmap(f *testing.F) {
	for _, m := range []savedMap{
		{block: 4096, size: 10000, present: bitset{5}, zero: bitset{4}},
		{block: 65536, size: 1 << 30, present: make(bitset, 256), zero: make(bitset, 256)},
	} {
		f.Add(marshalBitmap(m))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseBitmap(b)
		if err != nil {
			return
		}
		if !bytes.Equal(marshalBitmap(m), b) {
			t.Fatal("parse and marshal disagree")
		}
	})
}

// growable is a read-only []byte origin that can grow.
type growable struct {
	mu sync.Mutex
	b  []byte
}

func (g *growable) Size() uint64 { g.mu.Lock(); defer g.mu.Unlock(); return uint64(len(g.b)) }
func (g *growable) Caps() backends.Caps {
	return backends.Caps{ReadOnly: true}
}
func (g *growable) ReadAt(_ context.Context, p []byte, off uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	copy(p, g.b[off:])
	return nil
}
func (g *growable) WriteAt(context.Context, []byte, uint64, bool) error { return backends.ErrReadOnly }
func (g *growable) Flush(context.Context) error                         { return nil }
func (g *growable) Trim(context.Context, uint64, uint64, bool) error    { return backends.ErrReadOnly }
func (g *growable) Zero(context.Context, uint64, uint64, backends.ZeroFlags) error {
	return backends.ErrReadOnly
}
func (g *growable) Extents(_ context.Context, off, n uint64, add func(backends.Extent)) error {
	add(backends.Extent{Length: n})
	return nil
}
func (g *growable) Cache(context.Context, uint64, uint64) error { return nil }
func (g *growable) Close() error                                { return nil }
func (g *growable) Resize(_ context.Context, size uint64) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.b = append(g.b, make([]byte, size-uint64(len(g.b)))...)
	return nil
}

func TestResizeGrowsOverlay(t *testing.T) {
	const size = 10000
	g := &growable{b: pattern(size, 1)}
	d := mustOpen(t, g, Config{Block: 4096, Dir: t.TempDir()})
	defer d.Close()
	d.WriteAt(ctx, []byte("end"), size-3, false) // the short last block, copied up
	if err := backends.Resize(ctx, d, 5*size); err != nil {
		t.Fatal(err)
	}
	want := append(pattern(size, 1), make([]byte, 4*size)...)
	copy(want[size-3:], "end")
	copy(want[3*size:], "grown")
	if err := d.WriteAt(ctx, []byte("grown"), 3*size, false); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(devtest.ReadAll(t, d, 0, 5*size), want) {
		t.Fatal("grown overlay reads wrong")
	}
	if err := backends.Resize(ctx, d, size); !errors.Is(err, backends.ErrInvalid) {
		t.Fatalf("shrink: %v", err)
	}
}

// Forget (the node plugin's clean detach) removes a volatile overlay's
// directory and keeps a persistent one, which holds the volume's writes.
func TestForget(t *testing.T) {
	for _, persist := range []bool{false, true} {
		state := t.TempDir()
		env := backends.Env{StateDir: state}
		spec := "cow=true,size=1Mi;data:,hello"
		if persist {
			spec = "cow=true,cow-persist=true,size=1Mi;data:,hello"
		}
		s, err := backends.Parse(spec)
		if err != nil {
			t.Fatal(err)
		}
		dev, err := backends.Open(ctx, s, env)
		if err != nil {
			t.Fatal(err)
		}
		if err := dev.WriteAt(ctx, pattern(4096, 9), 0, false); err != nil {
			t.Fatal(err)
		}
		if err := dev.Close(); err != nil {
			t.Fatal(err)
		}
		if err := backends.Forget(env, s); err != nil {
			t.Fatal(err)
		}
		left, _ := filepath.Glob(filepath.Join(state, "cow", "*"))
		if persist && len(left) != 1 {
			t.Errorf("persistent overlay: %v left, want its directory kept", left)
		}
		if !persist && len(left) != 0 {
			t.Errorf("volatile overlay: %v left after Forget", left)
		}
	}
}
