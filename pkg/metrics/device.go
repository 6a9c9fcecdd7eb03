package metrics

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/rate"
)

// opMetrics are one operation's series of one volume, looked up once at
// Wrap so a request costs a few atomic adds.
type opMetrics struct {
	bytes, ops, errors prometheus.Counter
	latency            prometheus.Observer
}

// device measures the requests to the device it wraps.
type device struct {
	inner    backends.Device
	m        *Metrics
	labels   VolumeLabels
	inFlight prometheus.Gauge
	op       [numOps]opMetrics

	// For Stalled: requests in flight, and when a request last finished
	// (or the first one started after an idle spell), in Unix nanoseconds.
	pending  atomic.Int64
	progress atomic.Int64

	closeOnce sync.Once
}

var (
	_ backends.Device  = (*device)(nil)
	_ backends.Resizer = (*device)(nil)
)

// Wrap measures dev's requests under the volume's labels, in m. If dev's
// stack has the rate filter, its limits at open and its throttled time are
// exported too (later limit changes go through SetLimits). Closing the
// returned device closes dev and, when no other wrapper of the volume is
// open, drops all of the volume's series.
func (m *Metrics) Wrap(dev backends.Device, labels VolumeLabels) backends.Device {
	d := &device{inner: dev, m: m, labels: labels,
		inFlight: m.inFlight.WithLabelValues(labels.values()...)}
	for i, name := range allOps {
		lv := labels.values(name)
		d.op[i] = opMetrics{
			bytes: m.bytes.WithLabelValues(lv...), ops: m.ops.WithLabelValues(lv...),
			errors: m.errors.WithLabelValues(lv...), latency: m.latency.WithLabelValues(lv...),
		}
	}
	d.progress.Store(time.Now().UnixNano())
	// A stack with the rate filter reports its limits and throttled time
	// by itself.
	if r, ok := rate.Find(dev); ok {
		m.SetLimits(labels, r.Limits())
		m.SetThrottleStats(labels, rateThrottle{r})
	}
	if c, ok := findCache(dev); ok {
		m.cache.set(labels, c)
	}
	m.mu.Lock()
	m.refs[labels.Volume]++
	m.devices[d] = struct{}{}
	m.mu.Unlock()
	return d
}

// rateThrottle reads a rate filter's throttled time.
type rateThrottle struct{ r *rate.Device }

func (t rateThrottle) Throttled() (read, write time.Duration) {
	s := t.r.Stats()
	return s.ReadThrottled, s.WriteThrottled
}

// Wrap measures dev's requests in Default.
func Wrap(dev backends.Device, labels VolumeLabels) backends.Device { return Default.Wrap(dev, labels) }

// Unwrap returns the wrapped device (rate.Find and the like look through).
func (d *device) Unwrap() backends.Device { return d.inner }

func (d *device) Size() uint64        { return d.inner.Size() }
func (d *device) Caps() backends.Caps { return d.inner.Caps() }

// begin starts measuring one request; done ends it with its outcome and
// the bytes it moved or affected.
func (d *device) begin() time.Time {
	now := time.Now()
	if d.pending.Add(1) == 1 {
		// After idle, the clock for "no progress" starts now.
		d.progress.Store(now.UnixNano())
	}
	d.inFlight.Inc()
	return now
}

func (d *device) done(op op, start time.Time, n uint64, err error) {
	now := time.Now()
	d.progress.Store(now.UnixNano())
	d.pending.Add(-1)
	d.inFlight.Dec()
	o := &d.op[op]
	o.latency.Observe(now.Sub(start).Seconds())
	if err != nil {
		o.errors.Inc()
		return
	}
	o.ops.Inc()
	if n > 0 {
		o.bytes.Add(float64(n))
	}
}

func (d *device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	t := d.begin()
	err := d.inner.ReadAt(ctx, p, off)
	d.done(opRead, t, uint64(len(p)), err)
	return err
}

func (d *device) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	t := d.begin()
	err := d.inner.WriteAt(ctx, p, off, fua)
	d.done(opWrite, t, uint64(len(p)), err)
	return err
}

func (d *device) Flush(ctx context.Context) error {
	t := d.begin()
	err := d.inner.Flush(ctx)
	d.done(opFlush, t, 0, err)
	return err
}

func (d *device) Trim(ctx context.Context, off, length uint64, fua bool) error {
	t := d.begin()
	err := d.inner.Trim(ctx, off, length, fua)
	d.done(opTrim, t, length, err)
	return err
}

func (d *device) Zero(ctx context.Context, off, length uint64, flags backends.ZeroFlags) error {
	t := d.begin()
	err := d.inner.Zero(ctx, off, length, flags)
	d.done(opZero, t, length, err)
	return err
}

func (d *device) Extents(ctx context.Context, off, length uint64, add func(backends.Extent)) error {
	t := d.begin()
	err := d.inner.Extents(ctx, off, length, add)
	d.done(opExtents, t, 0, err)
	return err
}

func (d *device) Cache(ctx context.Context, off, length uint64) error {
	t := d.begin()
	err := d.inner.Cache(ctx, off, length)
	d.done(opCache, t, 0, err)
	return err
}

// Resize forwards to the wrapped device.
func (d *device) Resize(ctx context.Context, size uint64) error {
	return backends.Resize(ctx, d.inner, size)
}

// Close closes the wrapped device and, with the volume's last wrapper,
// drops the volume's series.
func (d *device) Close() error {
	err := d.inner.Close()
	d.closeOnce.Do(func() {
		m := d.m
		m.mu.Lock()
		delete(m.devices, d)
		m.refs[d.labels.Volume]--
		last := m.refs[d.labels.Volume] <= 0
		if last {
			// Under m.mu: a new wrapper of the volume must not lose
			// its fresh series to this cleanup.
			delete(m.refs, d.labels.Volume)
			delete(m.states, d.labels.Volume)
			m.forget(d.labels.Volume)
		}
		m.mu.Unlock()
	})
	return err
}
