package rate

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/readahead"
)

func TestOptions(t *testing.T) {
	for _, c := range []struct {
		spec    string
		on      bool
		want    Limits
		wantErr string // a quoted key the error must name
	}{
		{spec: "memory:"},
		{spec: "rate=false;memory:"},
		{spec: "rate=true;memory:", on: true, want: Limits{Burst: DefaultBurst}},
		{spec: "rate-read=10Mi;memory:", on: true, want: Limits{ReadBytesPerSec: 10 << 20, Burst: DefaultBurst}},
		{spec: "rate-read=0;memory:", on: true, want: Limits{Burst: DefaultBurst}},
		{spec: "rate-write=1G,iops-read=500,iops-write=50,rate-burst=1s;memory:", on: true,
			want: Limits{WriteBytesPerSec: 1e9, ReadIOPS: 500, WriteIOPS: 50, Burst: time.Second}},
		{spec: "rate-burst=250ms;memory:", on: true, want: Limits{Burst: 250 * time.Millisecond}},
		{spec: "rate=false,rate-read=1Mi;memory:", wantErr: `"rate"`},
		{spec: "rate=perhaps;memory:", wantErr: `"rate"`},
		{spec: "rate-read=fast;memory:", wantErr: `"rate-read"`},
		{spec: "rate-read=-1Mi;memory:", wantErr: `"rate-read"`},
		{spec: "rate-write=2Ti;memory:", wantErr: `"rate-write"`},
		{spec: "iops-read=-5;memory:", wantErr: `"iops-read"`},
		{spec: "iops-write=1.5;memory:", wantErr: `"iops-write"`},
		{spec: "iops-write=2000000000;memory:", wantErr: `"iops-write"`},
		{spec: "rate-burst=0s;memory:", wantErr: `"rate-burst"`},
		{spec: "rate-burst=1h;memory:", wantErr: `"rate-burst"`},
		{spec: "rate-burst=100;memory:", wantErr: `"rate-burst"`},
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
			d, on := dev.(*Device)
			if on != c.on {
				t.Fatalf("filter on: %v, want %v", on, c.on)
			}
			if on && d.Limits() != c.want {
				t.Errorf("limits %+v, want %+v", d.Limits(), c.want)
			}
		})
	}
}

func TestAccountingAndCaps(t *testing.T) {
	d, err := New(memory.New(1<<20), Limits{ReadIOPS: 1e6, WriteBytesPerSec: 1 << 30})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx := context.Background()
	if d.Caps().Fast {
		t.Error("Caps.Fast set: limits may make any request wait")
	}
	if !d.Caps().Trim || !d.Caps().Extents {
		t.Errorf("inner caps lost: %+v", d.Caps())
	}
	buf := make([]byte, 4096)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(d.WriteAt(ctx, make([]byte, 8192), 0, true))
	must(d.ReadAt(ctx, buf, 0))
	must(d.ReadAt(ctx, buf, 4096))
	must(d.Trim(ctx, 0, 4096, false))
	must(d.Zero(ctx, 4096, 65536, 0))
	must(d.Cache(ctx, 0, 1<<20))
	must(d.Flush(ctx))
	must(d.Extents(ctx, 0, 1<<20, func(backends.Extent) {}))
	// A failed request is not counted.
	if err := d.ReadAt(ctx, buf, 1<<20); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("read past the end: %v", err)
	}
	got := d.Stats()
	got.ReadThrottled, got.WriteThrottled = 0, 0
	want := Stats{ReadBytes: 8192, WriteBytes: 8192, ReadOps: 2, WriteOps: 1, TrimOps: 1, ZeroOps: 1, CacheOps: 1}
	if got != want {
		t.Errorf("stats %+v, want %+v", got, want)
	}
}

// unwrapping is a filter that only passes through, to test Find.
type unwrapping struct{ backends.Device }

func (u unwrapping) Unwrap() backends.Device { return u.Device }

func TestFind(t *testing.T) {
	mem := memory.New(1 << 20)
	d, err := New(mem, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := Find(d); !ok || got != d {
		t.Error("Find(d) did not return d")
	}
	if got, ok := Find(unwrapping{unwrapping{d}}); !ok || got != d {
		t.Error("Find did not look through Unwrap")
	}
	if _, ok := Find(mem); ok {
		t.Error("Find found a rate filter in a bare memory device")
	}
	if _, ok := Find(unwrapping{mem}); ok {
		t.Error("Find found a rate filter under a filter over memory")
	}
	if d.Unwrap() != backends.Device(mem) {
		t.Error("Unwrap does not return the inner device")
	}

	// In an opened stack with readahead below.
	dev, err := devtest.TryOpen("rate=true,readahead=true;memory:", backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	r, ok := Find(dev)
	if !ok {
		t.Fatal("no rate filter found in the opened stack")
	}
	if err := r.SetLimits(Limits{ReadIOPS: 10}); err != nil {
		t.Fatal(err)
	}
	if r.Limits().ReadIOPS != 10 {
		t.Errorf("limits %+v", r.Limits())
	}
}

func TestSetLimitsRefusesInvalidAndKeepsOld(t *testing.T) {
	d, err := New(memory.New(4096), Limits{ReadBytesPerSec: 1000})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, c := range []struct {
		l     Limits
		field string
	}{
		{Limits{ReadBytesPerSec: -1}, "ReadBytesPerSec"},
		{Limits{WriteBytesPerSec: MaxBytesPerSec + 1}, "WriteBytesPerSec"},
		{Limits{ReadIOPS: -3}, "ReadIOPS"},
		{Limits{WriteIOPS: MaxIOPS + 1}, "WriteIOPS"},
		{Limits{Burst: -time.Second}, "Burst"},
		{Limits{Burst: 2 * MaxBurst}, "Burst"},
	} {
		err := d.SetLimits(c.l)
		if err == nil || !strings.Contains(err.Error(), c.field) || !errors.Is(err, syscall.EINVAL) {
			t.Errorf("SetLimits(%+v): %v, want EINVAL naming %s", c.l, err, c.field)
		}
	}
	if got := d.Limits(); got != (Limits{ReadBytesPerSec: 1000, Burst: DefaultBurst}) {
		t.Errorf("limits changed to %+v", got)
	}
	if _, err := New(memory.New(4096), Limits{ReadIOPS: -1}); err == nil {
		t.Error("New accepted negative limits")
	}
}

// With the real clock: requests held by a very low limit all go through,
// in the order they queued, once the limit is lifted.
func TestLiveLiftReleasesQueuedRequestsInOrder(t *testing.T) {
	d, err := New(memory.New(1<<20), Limits{ReadBytesPerSec: 1024, Burst: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var mu sync.Mutex
	var admitted []uint64
	d.read.onAdmit = func(ctx context.Context) {
		mu.Lock()
		admitted = append(admitted, ctx.Value(offKey{}).(uint64))
		mu.Unlock()
	}
	ctx := context.Background()
	// The bucket starts full (1 KiB); 4 KiB reads then need 4 s each.
	var want []uint64
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := range 10 {
		off := uint64(i) * 4096
		want = append(want, off)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- d.ReadAt(context.WithValue(ctx, offKey{}, off), make([]byte, 4096), off)
		}()
		// Wait until it has queued, so the queue order is known.
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Microsecond) {
			d.read.mu.Lock()
			n := len(d.read.queue)
			d.read.mu.Unlock()
			if n == i+1 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("read %d never queued", i)
			}
		}
	}
	if err := d.SetLimits(Limits{}); err != nil {
		t.Fatal(err)
	}
	wg.Wait() // hangs (and the test times out) if the waiters were not released
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if !slices.Equal(admitted, want) {
		t.Errorf("admitted %v, want %v", admitted, want)
	}
	if st := d.Stats(); st.ReadOps != 10 || st.ReadThrottled == 0 {
		t.Errorf("stats %+v: want 10 reads, some throttled", st)
	}
}

type offKey struct{}

// resizable is a memory device that can grow.
type resizable struct {
	*memory.Device
	size uint64
}

func (r *resizable) Size() uint64 { return r.size }
func (r *resizable) Resize(_ context.Context, size uint64) error {
	r.size = size
	return nil
}

func TestResizeForwards(t *testing.T) {
	inner := &resizable{Device: memory.New(1 << 30), size: 1 << 20}
	d, err := New(inner, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if err := backends.Resize(context.Background(), d, 2<<20); err != nil {
		t.Fatal(err)
	}
	if d.Size() != 2<<20 || inner.size != 2<<20 {
		t.Errorf("size %d, inner %d after resize", d.Size(), inner.size)
	}
	// Through a whole opened stack: rate over readahead over memory.
	dev, err := devtest.TryOpen("rate=true,readahead=true,size=1Mi;memory:", backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if err := backends.Resize(context.Background(), dev, 3<<20); err != nil || dev.Size() != 3<<20 {
		t.Errorf("stack resize: %v, size %d", err, dev.Size())
	}
	plain, _ := New(unwrapping{memory.New(1 << 20)}, Limits{}) // hides memory's Resize
	if err := backends.Resize(context.Background(), plain, 2<<20); !errors.Is(err, syscall.ENOTSUP) {
		t.Errorf("resize of a device that cannot grow: %v", err)
	}
}

// A request under the limits with nobody queued is admitted without
// queueing: no allocation on the admission path.
func TestUnderLimitAdmitsWithoutAllocating(t *testing.T) {
	if testing.Short() {
		t.Skip("allocation counts")
	}
	d, err := New(memory.New(1<<20), Limits{ReadBytesPerSec: MaxBytesPerSec, ReadIOPS: MaxIOPS})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	ctx := context.Background()
	p := make([]byte, 4096)
	if n := testing.AllocsPerRun(100, func() {
		if err := d.ReadAt(ctx, p, 0); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("ReadAt under the limits: %v allocations, want 0", n)
	}
	if s := d.Stats(); s.ReadThrottled != 0 {
		t.Errorf("throttled %v under the limits", s.ReadThrottled)
	}
}
