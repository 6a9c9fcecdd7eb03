// Package rate is the rate filter: per-volume QoS with token buckets for
// read and write bandwidth and read and write operations per second. It is
// the outermost filter (Order 40), so it meters what the client asks for,
// before any cache or copy-on-write layer.
//
// Keys (any of them turns the filter on):
//
//	rate-read=SIZE    read bytes per second (e.g. 50Mi); 0 = unlimited
//	rate-write=SIZE   write bytes per second
//	iops-read=N       read operations per second
//	iops-write=N      write operations per second
//	rate-burst=DUR    bucket size as a duration of traffic at the limit
//	                  (default 100ms): after idle, at most this much
//	                  traffic passes at once
//	rate=true         keep the filter with no limits, so limits can be set
//	                  later through Device.SetLimits
//
// Accounting: a read counts one read operation and its length in read
// bytes; a write one write operation and its length in write bytes. Trim
// and zero count one write operation and no bytes (they move no data over
// the wire); cache (prefetch hints) counts one read operation and no
// bytes. Flush and block status are not metered.
//
// Fairness: requests are admitted in arrival order. One larger than half
// the byte bucket is admitted in chunks of that size, going back to the
// end of the queue between chunks, so small requests are not held up
// behind a large one for longer than a chunk takes.
//
// Limits change live (Device.SetLimits, found in an opened stack with
// Find): the request waiting for tokens re-evaluates at once under the new
// limits, and the queue keeps its order.
package rate

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// Option keys.
const (
	KeyEnable    = "rate"
	KeyReadRate  = "rate-read"
	KeyWriteRate = "rate-write"
	KeyReadIOPS  = "iops-read"
	KeyWriteIOPS = "iops-write"
	KeyBurst     = "rate-burst"
)

// DefaultBurst is the bucket size, as a duration of traffic at the limit,
// when none is given.
const DefaultBurst = 100 * time.Millisecond

// Bounds on limits: beyond them a value is surely a typo (and the bucket
// arithmetic would lose precision).
const (
	MaxBytesPerSec = 1 << 40 // 1 TiB/s
	MaxIOPS        = 1 << 30
	MaxBurst       = time.Minute
)

var limitKeys = []string{KeyReadRate, KeyWriteRate, KeyReadIOPS, KeyWriteIOPS, KeyBurst}

func init() {
	backends.RegisterFilter(backends.Filter{
		Name:  "rate",
		Order: 40,
		Options: []backends.Option{
			{Key: KeyEnable, Kind: backends.OptBool,
				Doc: "true keeps the rate filter with no limits, so limits can be set live later."},
			{Key: KeyReadRate, Kind: backends.OptSize,
				Doc: "Read bandwidth limit in bytes per second (e.g. 50Mi); 0 means unlimited."},
			{Key: KeyWriteRate, Kind: backends.OptSize,
				Doc: "Write bandwidth limit in bytes per second; 0 means unlimited."},
			{Key: KeyReadIOPS, Kind: backends.OptInt,
				Doc: "Read operations per second (cache hints count as reads); 0 means unlimited."},
			{Key: KeyWriteIOPS, Kind: backends.OptInt,
				Doc: "Write operations per second (trim and zero count as writes); 0 means unlimited."},
			{Key: KeyBurst, Kind: backends.OptDuration, Default: DefaultBurst.String(),
				Doc: "Bucket size as a duration of traffic at the limit (at most this much passes at once after idle)."},
		},
		Enabled: enabled,
		Validate: func(s backends.Spec) error {
			_, err := ParseLimits(s)
			return err
		},
		Wrap: func(_ context.Context, s backends.Spec, _ backends.Env, inner backends.Device) (backends.Device, error) {
			l, err := ParseLimits(s)
			if err != nil {
				return nil, err
			}
			return New(inner, l)
		},
	})
}

// enabled: any rate key turns the filter on, except rate=false alone.
// rate=false with limits is refused by Wrap rather than silently ignored.
func enabled(s backends.Spec) bool {
	if v, ok := s.Options[KeyEnable]; ok && v == "true" {
		return true
	}
	for _, k := range limitKeys {
		if _, ok := s.Options[k]; ok {
			return true
		}
	}
	return false
}

// Limits are a volume's rate limits. Zero means unlimited.
type Limits struct {
	ReadBytesPerSec  int64
	WriteBytesPerSec int64
	ReadIOPS         int64
	WriteIOPS        int64
	// Burst is the bucket size as a duration of traffic at the limit;
	// 0 means DefaultBurst.
	Burst time.Duration
}

// Check reports the first invalid field, by name.
func (l Limits) Check() error {
	for _, f := range []struct {
		name string
		v    int64
		max  int64
	}{
		{"ReadBytesPerSec", l.ReadBytesPerSec, MaxBytesPerSec},
		{"WriteBytesPerSec", l.WriteBytesPerSec, MaxBytesPerSec},
		{"ReadIOPS", l.ReadIOPS, MaxIOPS},
		{"WriteIOPS", l.WriteIOPS, MaxIOPS},
	} {
		if f.v < 0 {
			return fmt.Errorf("rate: %s %d is negative: %w", f.name, f.v, backends.ErrInvalid)
		}
		if f.v > f.max {
			return fmt.Errorf("rate: %s %d is above the maximum %d: %w", f.name, f.v, f.max, backends.ErrInvalid)
		}
	}
	if l.Burst < 0 || l.Burst > MaxBurst {
		return fmt.Errorf("rate: Burst %v is not between 0 and %v: %w", l.Burst, MaxBurst, backends.ErrInvalid)
	}
	return nil
}

// String is for events and logs: "read 10Mi/s, write unlimited, …".
func (l Limits) String() string {
	perSec := func(n int64, unit string) string {
		if n == 0 {
			return "unlimited"
		}
		if unit == "B" {
			return backends.FormatSize(uint64(n)) + "/s"
		}
		return strconv.FormatInt(n, 10) + "/s"
	}
	burst := "default"
	if l.Burst != 0 {
		burst = l.Burst.String()
	}
	return fmt.Sprintf("read %s, write %s, read IOPS %s, write IOPS %s, burst %s",
		perSec(l.ReadBytesPerSec, "B"), perSec(l.WriteBytesPerSec, "B"),
		perSec(l.ReadIOPS, ""), perSec(l.WriteIOPS, ""), burst)
}

// Unlimited reports whether no limit is set.
func (l Limits) Unlimited() bool {
	return l.ReadBytesPerSec == 0 && l.WriteBytesPerSec == 0 && l.ReadIOPS == 0 && l.WriteIOPS == 0
}

// ParseLimits reads the limits from a spec's options; errors name the
// offending key.
func ParseLimits(s backends.Spec) (Limits, error) {
	var l Limits
	if v, ok := s.Options[KeyEnable]; ok && v == "false" {
		for _, k := range limitKeys {
			if _, ok := s.Options[k]; ok {
				return Limits{}, fmt.Errorf("option %q: rate=false contradicts option %q", KeyEnable, k)
			}
		}
	}
	for _, r := range []struct {
		key string
		dst *int64
	}{{KeyReadRate, &l.ReadBytesPerSec}, {KeyWriteRate, &l.WriteBytesPerSec}} {
		if _, set := s.Options[r.key]; !set {
			continue
		}
		n, ok := s.Size(r.key)
		if !ok {
			return Limits{}, fmt.Errorf("option %q: invalid size %q", r.key, s.Options[r.key])
		}
		if n > MaxBytesPerSec {
			return Limits{}, fmt.Errorf("option %q: %s per second is above the maximum %s",
				r.key, backends.FormatSize(n), backends.FormatSize(MaxBytesPerSec))
		}
		*r.dst = int64(n)
	}
	for _, r := range []struct {
		key string
		dst *int64
	}{{KeyReadIOPS, &l.ReadIOPS}, {KeyWriteIOPS, &l.WriteIOPS}} {
		if _, set := s.Options[r.key]; !set {
			continue
		}
		n, ok := s.Int(r.key)
		if !ok {
			return Limits{}, fmt.Errorf("option %q: invalid integer %q", r.key, s.Options[r.key])
		}
		if n < 0 || n > MaxIOPS {
			return Limits{}, fmt.Errorf("option %q: %d is not between 0 (unlimited) and %d", r.key, n, MaxIOPS)
		}
		*r.dst = n
	}
	b, ok := s.Duration(KeyBurst)
	if !ok {
		return Limits{}, fmt.Errorf("option %q: invalid duration %q", KeyBurst, s.Options[KeyBurst])
	}
	if b <= 0 || b > MaxBurst {
		return Limits{}, fmt.Errorf("option %q: %v is not above 0 and at most %v", KeyBurst, b, MaxBurst)
	}
	l.Burst = b
	return l, nil
}

// Unwrapper is implemented by filters, returning the device they wrap, so
// that Find can look through a stack.
type Unwrapper = backends.Unwrapper

// Find returns the rate filter in an opened stack: dev itself or the first
// one found by unwrapping filters that implement Unwrapper.
func Find(dev backends.Device) (*Device, bool) { return backends.Find[*Device](dev) }

// Stats are the filter's running totals since open. Bytes and operations
// count requests that completed successfully; throttled times add up how
// long requests waited for tokens (requests waiting together each count).
type Stats struct {
	ReadBytes, WriteBytes uint64
	ReadOps, WriteOps     uint64 // ReadAt and WriteAt calls
	TrimOps, ZeroOps      uint64 // metered as write operations
	CacheOps              uint64 // metered as read operations
	ReadThrottled         time.Duration
	WriteThrottled        time.Duration
}

// Device is the rate filter over an inner device.
type Device struct {
	inner       backends.Device
	read, write *lane

	mu     sync.Mutex // serializes SetLimits
	limits atomic.Pointer[Limits]

	readBytes, writeBytes atomic.Uint64
	readOps, writeOps     atomic.Uint64
	trimOps, zeroOps      atomic.Uint64
	cacheOps              atomic.Uint64
	readWait, writeWait   atomic.Int64 // nanoseconds
}

var (
	_ backends.Device  = (*Device)(nil)
	_ backends.Resizer = (*Device)(nil)
	_ Unwrapper        = (*Device)(nil)
)

// New wraps inner with limits l.
func New(inner backends.Device, l Limits) (*Device, error) {
	return newWithClock(inner, l, realClock{})
}

func newWithClock(inner backends.Device, l Limits, clk clock) (*Device, error) {
	d := &Device{inner: inner, read: newLane(clk), write: newLane(clk)}
	if err := d.SetLimits(l); err != nil {
		return nil, err
	}
	return d, nil
}

// SetLimits changes the limits at once: the request waiting for tokens in
// each direction re-evaluates under the new limits (within microseconds,
// not at its old deadline), queued requests keep their order, and nothing
// in flight fails. Invalid limits are refused (naming the field) and the
// old ones kept.
func (d *Device) SetLimits(l Limits) error {
	if err := l.Check(); err != nil {
		return err
	}
	if l.Burst == 0 {
		l.Burst = DefaultBurst
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.read.set(l.ReadBytesPerSec, l.ReadIOPS, l.Burst)
	d.write.set(l.WriteBytesPerSec, l.WriteIOPS, l.Burst)
	if old := d.limits.Swap(&l); old != nil && *old != l {
		klog.V(2).InfoS("Rate limits changed", "readBytesPerSec", l.ReadBytesPerSec,
			"writeBytesPerSec", l.WriteBytesPerSec, "readIOPS", l.ReadIOPS, "writeIOPS", l.WriteIOPS,
			"burst", l.Burst)
	}
	return nil
}

// Limits returns the limits in force, with Burst resolved.
func (d *Device) Limits() Limits { return *d.limits.Load() }

// Stats returns the running totals.
func (d *Device) Stats() Stats {
	return Stats{
		ReadBytes: d.readBytes.Load(), WriteBytes: d.writeBytes.Load(),
		ReadOps: d.readOps.Load(), WriteOps: d.writeOps.Load(),
		TrimOps: d.trimOps.Load(), ZeroOps: d.zeroOps.Load(), CacheOps: d.cacheOps.Load(),
		ReadThrottled:  time.Duration(d.readWait.Load()),
		WriteThrottled: time.Duration(d.writeWait.Load()),
	}
}

// Unwrap returns the wrapped device.
func (d *Device) Unwrap() backends.Device { return d.inner }

func (d *Device) Size() uint64 { return d.inner.Size() }

// Caps are the inner device's, except Fast: limits can be set at any time
// and then any request may wait.
func (d *Device) Caps() backends.Caps {
	c := d.inner.Caps()
	c.Fast = false
	return c
}

func (d *Device) admit(ctx context.Context, l *lane, wait *atomic.Int64, n int64) error {
	w, err := l.wait(ctx, true, n)
	if w > 0 {
		wait.Add(int64(w))
	}
	return err
}

func (d *Device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if err := d.admit(ctx, d.read, &d.readWait, int64(len(p))); err != nil {
		return err
	}
	if err := d.inner.ReadAt(ctx, p, off); err != nil {
		return err
	}
	d.readOps.Add(1)
	d.readBytes.Add(uint64(len(p)))
	return nil
}

func (d *Device) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if err := d.admit(ctx, d.write, &d.writeWait, int64(len(p))); err != nil {
		return err
	}
	if err := d.inner.WriteAt(ctx, p, off, fua); err != nil {
		return err
	}
	d.writeOps.Add(1)
	d.writeBytes.Add(uint64(len(p)))
	return nil
}

func (d *Device) Trim(ctx context.Context, off, length uint64, fua bool) error {
	if err := d.admit(ctx, d.write, &d.writeWait, 0); err != nil {
		return err
	}
	if err := d.inner.Trim(ctx, off, length, fua); err != nil {
		return err
	}
	d.trimOps.Add(1)
	return nil
}

func (d *Device) Zero(ctx context.Context, off, length uint64, flags backends.ZeroFlags) error {
	if err := d.admit(ctx, d.write, &d.writeWait, 0); err != nil {
		return err
	}
	if err := d.inner.Zero(ctx, off, length, flags); err != nil {
		return err
	}
	d.zeroOps.Add(1)
	return nil
}

func (d *Device) Cache(ctx context.Context, off, length uint64) error {
	if err := d.admit(ctx, d.read, &d.readWait, 0); err != nil {
		return err
	}
	if err := d.inner.Cache(ctx, off, length); err != nil {
		return err
	}
	d.cacheOps.Add(1)
	return nil
}

func (d *Device) Flush(ctx context.Context) error { return d.inner.Flush(ctx) }

func (d *Device) Extents(ctx context.Context, off, length uint64, add func(backends.Extent)) error {
	return d.inner.Extents(ctx, off, length, add)
}

// Resize forwards to the inner device; the filter keeps no size of its own.
func (d *Device) Resize(ctx context.Context, size uint64) error {
	return backends.Resize(ctx, d.inner, size)
}

// Close fails requests still waiting for tokens and closes the inner
// device.
func (d *Device) Close() error {
	d.read.close()
	d.write.close()
	return d.inner.Close()
}
