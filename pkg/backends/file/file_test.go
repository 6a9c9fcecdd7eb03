package file

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

var ctx = context.Background()

// open opens spec (parsed, so options go through validation) and closes
// the device when the test ends.
func open(t *testing.T, spec string) *Device {
	t.Helper()
	return devtest.Open(t, spec, backends.Env{}).(*Device)
}

func blocks(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

func TestParsePath(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{"file:///var/lib/disk.img", "/var/lib/disk.img", ""},
		{"file://localhost/a/b", "/a/b", ""},
		{"FILE:///a/../b", "/b", ""},
		{"file:///with%20space", "/with space", ""},
		{"file:disk.img", "", "relative path"},
		{"file://server/x", "", `host "server"`},
		{"file:///x?size=1", "", "query string"},
		{"file:///x#frag", "", "fragment"},
		{"file://", "", "no absolute path"},
		{"file:///", "", "root directory"},
		{"file:///a%00b", "", "NUL"},
		{"file://u@localhost/x", "", "user info"},
		{"file:///%zz", "", "bad URL"},
	} {
		got, err := ParsePath(tc.in)
		if tc.err == "" {
			if err != nil || got != tc.want {
				t.Errorf("ParsePath(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
			}
		} else if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("ParsePath(%q) = %q, %v; want error containing %q", tc.in, got, err, tc.err)
		}
	}
}

func FuzzParsePath(f *testing.F) {
	for _, s := range []string{"file:///a/b", "file://localhost/x", "file:x", "file:///%41?q#f", "file://h/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParsePath(s)
		if err != nil {
			return
		}
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" || strings.IndexByte(p, 0) >= 0 {
			t.Fatalf("ParsePath(%q) = %q: not a clean absolute path", s, p)
		}
	})
}

func TestBadSpecs(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct{ spec, want string }{
		{"file:rel", "relative path"},
		{"direct=true,size=1000;file://" + dir + "/x", `"size"`},
		{"file://" + dir + "/missing", `set option "size" to create it`},
		{"file://" + dir, "is a directory"},
		{"file:///dev/null", "neither a regular file nor a block device"},
		{"readonly=true,size=1Mi;file://" + dir + "/missing", "no such file"},
		{"size=1Mi;file://" + dir + "/nodir/x", "no such file"},
	} {
		err := devtest.OpenErr(t, tc.spec, backends.Env{})
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v; want it to mention %s", tc.spec, err, tc.want)
		}
	}
	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	if err := devtest.OpenErr(t, "file://"+empty, backends.Env{}); !strings.Contains(err.Error(), "empty") {
		t.Errorf("empty file: %v", err)
	}
	odd := filepath.Join(dir, "odd")
	os.WriteFile(odd, make([]byte, 1000), 0o600)
	if err := devtest.OpenErr(t, "direct=true;file://"+odd, backends.Env{}); !strings.Contains(err.Error(), "multiple of 4096") {
		t.Errorf("direct on an odd size: %v", err)
	}
}

// TestSizeCreatesGrowsNeverShrinks pins the size option's contract.
func TestSizeCreatesGrowsNeverShrinks(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	d := open(t, "size=1Mi;file://"+p)
	if d.Size() != 1<<20 {
		t.Fatalf("size %d", d.Size())
	}
	if st, err := os.Stat(p); err != nil || st.Size() != 1<<20 || st.Mode().Perm() != 0o600 {
		t.Fatalf("created file: %v %v", st, err)
	}
	if blocks(t, p) != 0 {
		t.Fatalf("new file is not sparse: %d blocks", blocks(t, p))
	}
	d.WriteAt(ctx, []byte("keep"), 0, false)
	d.Close()
	if d := open(t, "size=2Mi;file://"+p); d.Size() != 2<<20 {
		t.Fatalf("grown size %d", d.Size())
	}
	d = open(t, "size=1Mi;file://"+p)
	if d.Size() != 2<<20 {
		t.Fatalf("size after reopening with a smaller size option: %d (must not shrink)", d.Size())
	}
	buf := make([]byte, 4)
	if d.ReadAt(ctx, buf, 0); string(buf) != "keep" {
		t.Fatalf("data lost: %q", buf)
	}
	if d := open(t, "file://"+p); d.Size() != 2<<20 {
		t.Fatalf("size without the option: %d", d.Size())
	}
}

// TestRoundTrip writes random ranges (aligned and not) in buffered and
// direct mode and checks every read against a model.
func TestRoundTrip(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "buffered", true: "direct"}[direct], func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "disk.img")
			const size = 8 << 20
			d := open(t, "size=8Mi,direct="+map[bool]string{false: "false", true: "true"}[direct]+";file://"+p)
			model := make([]byte, size)
			r := rand.New(rand.NewPCG(1, 2))
			for i := range 150 {
				n := r.IntN(1<<20) + 1
				off := r.IntN(size - n)
				if i%3 == 0 {
					n = (n + 4095) &^ 4095
					off = min(off&^4095, size-n)
				}
				switch r.IntN(4) {
				case 0, 1:
					b := devtest.RandBytes(n)
					if err := d.WriteAt(ctx, b, uint64(off), i%5 == 0); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], b)
				case 2:
					if err := d.Zero(ctx, uint64(off), uint64(n), backends.ZeroFlags(r.IntN(4))); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case 3:
					if err := d.Trim(ctx, uint64(off), uint64(n), false); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				}
				got := make([]byte, n)
				roff := r.IntN(size - n)
				if err := d.ReadAt(ctx, got, uint64(roff)); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, model[roff:roff+n]) {
					t.Fatalf("step %d: read %d+%d differs from the model", i, roff, n)
				}
			}
			if err := d.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			onDisk, err := os.ReadFile(p)
			if err != nil || !bytes.Equal(onDisk, model) {
				t.Fatalf("file contents differ from the model (%v)", err)
			}
		})
	}
}

// TestDirectEdgeWritesDoNotClobber: with O_DIRECT, writes to different
// bytes of the same 4 KiB block are read-modify-writes of the whole
// block; without the edge locks some of them would be lost.
func TestDirectEdgeWritesDoNotClobber(t *testing.T) {
	d := open(t, "direct=true,size=64Ki;file://"+filepath.Join(t.TempDir(), "disk.img"))
	var wg sync.WaitGroup
	for i := range 256 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Bytes 100..355 of block 0 and 4000..4255 straddling blocks 0 and 1.
			d.WriteAt(ctx, []byte{byte(i) | 1}, uint64(100+i), false)
			d.WriteAt(ctx, []byte{byte(i) | 1, 0xee}, uint64(4000+2*i), false)
		}()
	}
	wg.Wait()
	got := make([]byte, 8192)
	d.ReadAt(ctx, got, 0)
	for i := range 256 {
		if got[100+i] != byte(i)|1 || got[4000+2*i] != byte(i)|1 || got[4001+2*i] != 0xee {
			t.Fatalf("write %d lost", i)
		}
	}
}

func TestExtentsAndHoles(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	d := open(t, "size=4Mi;file://"+p)
	if !d.Caps().Extents || !d.Caps().Trim || !d.Caps().FastZero {
		t.Skipf("filesystem without hole punching: %+v", d.Caps())
	}
	d.WriteAt(ctx, devtest.RandBytes(64<<10), 1<<20, false)
	d.WriteAt(ctx, devtest.RandBytes(4096), 3<<20, false)
	type ext struct {
		off, n uint64
		hole   bool
	}
	var got []ext
	pos := uint64(0)
	for pos < d.Size() {
		if err := d.Extents(ctx, pos, d.Size()-pos, func(e backends.Extent) {
			hole := e.Flags == backends.ExtentHole|backends.ExtentZero
			if !hole && e.Flags != 0 {
				t.Fatalf("flags %v", e.Flags)
			}
			got = append(got, ext{pos, e.Length, hole})
			pos += e.Length
		}); err != nil {
			t.Fatal(err)
		}
	}
	want := []ext{{0, 1 << 20, true}, {1 << 20, 64 << 10, false}, {1<<20 + 64<<10, 2<<20 - 64<<10, true},
		{3 << 20, 4096, false}, {3<<20 + 4096, 1<<20 - 4096, true}}
	if !slices.Equal(got, want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
}

func TestTrimAndZeroSpace(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	d := open(t, "size=4Mi;file://"+p)
	if !d.Caps().Trim {
		t.Skip("filesystem cannot punch holes")
	}
	d.WriteAt(ctx, devtest.RandBytes(4<<20), 0, false)
	d.Flush(ctx)
	full := blocks(t, p)
	if full < 4<<20/512 {
		t.Fatalf("written file has %d blocks", full)
	}
	// Trim punches a hole: 1 MiB fewer blocks, and it reads as zeros.
	if err := d.Trim(ctx, 1<<20, 1<<20, true); err != nil {
		t.Fatal(err)
	}
	if b := blocks(t, p); b != full-(1<<20)/512 {
		t.Fatalf("after trim: %d blocks, want %d", b, full-(1<<20)/512)
	}
	// Zero with NoHole keeps the space; without it, frees it.
	if err := d.Zero(ctx, 2<<20, 1<<20, backends.ZeroNoHole|backends.ZeroFast); err != nil {
		t.Fatal(err)
	}
	if b := blocks(t, p); b != full-(1<<20)/512 {
		t.Fatalf("after zero (no hole): %d blocks, want %d", b, full-(1<<20)/512)
	}
	if err := d.Zero(ctx, 3<<20, 1<<20, backends.ZeroFast|backends.ZeroFUA); err != nil {
		t.Fatal(err)
	}
	if b := blocks(t, p); b != full-(2<<20)/512 {
		t.Fatalf("after zero: %d blocks, want %d", b, full-(2<<20)/512)
	}
	got := make([]byte, 3<<20)
	d.ReadAt(ctx, got, 1<<20)
	if len(bytes.Trim(got, "\x00")) != 0 {
		t.Fatal("trimmed/zeroed range does not read as zeros")
	}
	// Unaligned zero: the partial blocks are zeroed, the neighbours kept.
	d.WriteAt(ctx, bytes.Repeat([]byte{7}, 3), 100, false)
	d.Zero(ctx, 101, 1, 0)
	b3 := make([]byte, 3)
	d.ReadAt(ctx, b3, 100)
	if !bytes.Equal(b3, []byte{7, 0, 7}) {
		t.Fatalf("unaligned zero: %v", b3)
	}
}

func TestReadOnly(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	os.WriteFile(p, bytes.Repeat([]byte{1}, 8192), 0o400)
	d := open(t, "readonly=true;file://"+p)
	devtest.CheckReadOnly(t, d)
	if err := d.Flush(ctx); err != nil {
		t.Errorf("flush: %v", err)
	}
	devtest.CheckRead(t, "read", d, 0, bytes.Repeat([]byte{1}, 8192))
	if err := devtest.OpenErr(t, "readonly=true,size=1Mi;file://"+p, backends.Env{}); !strings.Contains(err.Error(), "forbids growing") {
		t.Fatalf("growing a read-only file: %v", err)
	}
}

func TestFlushAndFUA(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	d := open(t, "size=1Mi;file://"+p)
	if !d.Caps().Flush || !d.Caps().FUA || d.Caps().Fast {
		t.Fatalf("caps %+v", d.Caps())
	}
	if err := d.WriteAt(ctx, []byte("fua"), 10, true); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(ctx, []byte("plain"), 20, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	if string(b[10:13]) != "fua" || string(b[20:25]) != "plain" {
		t.Fatalf("file has %q %q", b[10:13], b[20:25])
	}
	// Flush reports the failure of the descriptor it syncs.
	d.f.Close()
	if err := d.Flush(ctx); !errors.Is(err, syscall.EBADF) {
		t.Fatalf("flush on a closed descriptor: %v", err)
	}
}

func TestResize(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	d := open(t, "size=1Mi;file://"+p)
	d.WriteAt(ctx, []byte("x"), 1<<20-1, false)
	if err := backends.Resize(ctx, d, 3<<20); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); d.Size() != 3<<20 || st.Size() != 3<<20 {
		t.Fatalf("size %d, file %d", d.Size(), st.Size())
	}
	if err := d.WriteAt(ctx, []byte("y"), 3<<20-1, false); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if d.ReadAt(ctx, b, 1<<20-1); b[0] != 'x' {
		t.Fatal("data lost by resize")
	}
	if err := backends.Resize(ctx, d, 2<<20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("shrink: %v", err)
	}
	dd := open(t, "direct=true,size=64Ki;file://"+filepath.Join(t.TempDir(), "d"))
	if err := backends.Resize(ctx, dd, 64<<10+1); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("unaligned direct resize: %v", err)
	}
}

// TestBlockDevice runs the block device paths on a loop device over a
// temp file (root only).
func TestBlockDevice(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	img := filepath.Join(t.TempDir(), "backing")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(img, 8<<20)
	loop := losetup(t, img)
	for _, direct := range []string{"false", "true"} {
		d := open(t, "direct="+direct+";file://"+loop)
		if d.Size() != 8<<20 || !d.blk || d.Caps().Extents || d.Caps().FastZero {
			t.Fatalf("size %d blk %v caps %+v", d.Size(), d.blk, d.Caps())
		}
		data := devtest.RandBytes(3 << 20)
		if err := d.WriteAt(ctx, data, 1000, true); err != nil {
			t.Fatal(err)
		}
		if err := d.Zero(ctx, 5000, 1<<20+77, 0); err != nil {
			t.Fatal(err)
		}
		clear(data[4000 : 4000+1<<20+77])
		if err := d.Trim(ctx, 2<<20, 1<<20, false); err != nil {
			t.Fatal(err)
		}
		clear(data[2<<20-1000 : 3<<20-1000]) // loop devices discard by punching the backing file
		if err := d.Zero(ctx, 0, 4096, backends.ZeroFast); !errors.Is(err, syscall.ENOTSUP) {
			t.Fatalf("fast zero on a block device: %v", err)
		}
		devtest.CheckRead(t, "direct="+direct+": block device data", d, 1000, data)
		if err := d.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		if err := backends.Resize(ctx, d, 16<<20); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("growing past the device: %v", err)
		}
		d.Close()
	}
}
