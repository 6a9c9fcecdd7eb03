package readahead_test

import (
	"bytes"
	"context"
	"math/rand"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/cache"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/readahead"
)

// slowDev is an origin that takes 1 ms per read, like a remote one.
type slowDev struct{ *memory.Device }

func (d slowDev) Caps() backends.Caps { c := d.Device.Caps(); c.Fast = false; return c }

func (d slowDev) ReadAt(ctx context.Context, p []byte, off uint64) error {
	time.Sleep(time.Millisecond)
	return d.Device.ReadAt(ctx, p, off)
}

var origin *memory.Device

func init() {
	backends.Register(backends.Backend{
		Scheme: "slowstack",
		Open: func(context.Context, backends.Spec, backends.Env) (backends.Device, error) {
			return slowDev{origin}, nil
		},
	})
}

// Through the registry, readahead sits over the real cache filter and
// prefetches into it: a sequential reader then finds most of its reads
// already in the cache, and every byte is right.
func TestReadaheadOverTheCacheFilter(t *testing.T) {
	ctx := context.Background()
	const size = 16 << 20
	origin = memory.New(size)
	want := make([]byte, size)
	rand.New(rand.NewSource(1)).Read(want)
	if err := origin.WriteAt(ctx, want, 0, false); err != nil {
		t.Fatal(err)
	}
	spec, err := backends.Parse("cache=writethrough,cache-size=64Mi,readahead=true;slowstack:x")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := backends.Open(ctx, spec, backends.Env{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	var c *cache.Device
	for d := dev; d != nil; {
		if cd, ok := d.(*cache.Device); ok {
			c = cd
			break
		}
		u, ok := d.(interface{ Unwrap() backends.Device })
		if !ok {
			break
		}
		d = u.Unwrap()
	}
	if c == nil {
		t.Fatalf("no cache filter in the stack %T", dev)
	}
	buf := make([]byte, 64<<10)
	for off := 0; off < size; off += len(buf) {
		if err := dev.ReadAt(ctx, buf, uint64(off)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(buf, want[off:off+len(buf)]) {
			t.Fatalf("data differs at %d", off)
		}
	}
	st := c.Stats()
	t.Logf("cache after a sequential read of %d MiB: %+v", size>>20, st)
	// Without readahead every read would be a miss; prefetching into the
	// cache turns most of them into hits.
	if st.HitBytes < size/4 {
		t.Errorf("only %d of %d bytes were cache hits: readahead did not fill the cache", st.HitBytes, size)
	}
}
