package cache

import (
	"bytes"
	"crypto/sha256"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/cow"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/http"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/readahead"
)

// slowOrigin is an HTTP server on 127.0.0.1 holding img, answering ranges
// after `delay` per request (the deliberately slow origin). It
// counts the requests.
func slowOrigin(t *testing.T, img []byte, delay time.Duration) (url string, requests *atomic.Int64) {
	t.Helper()
	var n atomic.Int64
	mtime := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n.Add(1)
		time.Sleep(delay)
		w.Header().Set("ETag", `"v1"`)
		http.ServeContent(w, r, "", mtime, bytes.NewReader(img))
	}))
	t.Cleanup(s.Close)
	return s.URL + "/disk.img", &n
}

// Through the http backend: the second pass over the volume makes no
// request to the 5 ms origin, and the stack stays read-only.
func TestSlowHTTPOriginCacheHits(t *testing.T) {
	img := pattern(4<<20, 5)
	url, requests := slowOrigin(t, img, 5*time.Millisecond)
	dev := devtest.Open(t, "cache=writeback;"+url, backends.Env{StateDir: t.TempDir()})
	if !dev.Caps().ReadOnly {
		t.Fatal("cache over a read-only http origin is writable")
	}
	opened := requests.Load()
	for off := uint64(0); off < 4<<20; off += 16 << 10 {
		devtest.CheckRead(t, "first pass", dev, off, img[off:off+16<<10])
	}
	misses := requests.Load() - opened
	if misses != (4<<20)/(64<<10) {
		t.Fatalf("first pass: %d origin requests, want one per 64 KiB block (%d)", misses, (4<<20)/(64<<10))
	}
	for off := uint64(0); off < 4<<20; off += 16 << 10 {
		devtest.CheckRead(t, "second pass", dev, off, img[off:off+16<<10])
	}
	if n := requests.Load() - opened - misses; n != 0 {
		t.Fatalf("second pass: %d origin requests, want 0", n)
	}
}

// The live-ISO stack: a writable overlay over a cached http origin, with
// checksums; the origin sees only reads, each block fetched once.
func TestCowOverCachedHTTPOrigin(t *testing.T) {
	img := pattern(2<<20, 6)
	url, requests := slowOrigin(t, img, time.Millisecond)
	dev := devtest.Open(t, "cow=true,cow-block=4Ki,cache=writethrough;"+url, backends.Env{StateDir: t.TempDir()})
	if _, ok := dev.(*cow.Device); !ok || dev.Caps().ReadOnly {
		t.Fatalf("stack %T (read-only %v), want a writable *cow.Device", dev, dev.Caps().ReadOnly)
	}
	want := bytes.Clone(img)
	for i := uint64(0); i < 64; i++ {
		off := i * 30011 % (2<<20 - 5000)
		p := pattern(4000, byte(i))
		if err := dev.WriteAt(ctx, p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], p)
	}
	if err := dev.Zero(ctx, 1<<20, 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	clear(want[1<<20 : 1<<20+64<<10])
	got := devtest.ReadAll(t, dev, 0, 2<<20)
	if sha256.Sum256(got) != sha256.Sum256(want) {
		t.Fatal("checksum of the volume differs from the model")
	}
	before := requests.Load()
	devtest.ReadAll(t, dev, 0, 2<<20)
	if n := requests.Load() - before; n != 0 {
		t.Fatalf("re-reading made %d origin requests", n)
	}
}

// The stack readahead uses (it prefetches with Cache calls into the cache
// below): a sequential pass reads right while prefetches and foreground
// misses race for the same blocks, and a second pass needs no origin
// request.
func TestReadaheadOverCacheStack(t *testing.T) {
	img := pattern(8<<20, 7)
	url, requests := slowOrigin(t, img, time.Millisecond)
	dev := devtest.Open(t, "cache=writeback,readahead=true;"+url, backends.Env{StateDir: t.TempDir()})
	for off := uint64(0); off < 8<<20; off += 128 << 10 {
		devtest.CheckRead(t, "sequential", dev, off, img[off:off+128<<10])
	}
	before := requests.Load()
	devtest.CheckRead(t, "again", dev, 0, img)
	if n := requests.Load() - before; n != 0 {
		t.Fatalf("second pass made %d origin requests", n)
	}
}
