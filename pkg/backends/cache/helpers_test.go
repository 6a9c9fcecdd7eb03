package cache

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

var ctx = context.Background()

// countDev wraps a device, counting requests and optionally delaying each
// (a deliberately slow origin) or holding reads at a gate.
type countDev struct {
	backends.Device
	delay                  time.Duration
	reads, writes, flushes atomic.Int64
	readBytes              atomic.Int64
	gate                   chan struct{} // if set, reads wait for it to close
	closed                 atomic.Bool
}

func (c *countDev) wait() {
	if c.delay > 0 {
		time.Sleep(c.delay)
	}
}

func (c *countDev) ReadAt(ctx context.Context, p []byte, off uint64) error {
	c.reads.Add(1)
	c.readBytes.Add(int64(len(p)))
	if c.gate != nil {
		<-c.gate
	}
	c.wait()
	return c.Device.ReadAt(ctx, p, off)
}

func (c *countDev) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	c.writes.Add(1)
	c.wait()
	return c.Device.WriteAt(ctx, p, off, fua)
}

func (c *countDev) Flush(ctx context.Context) error {
	c.flushes.Add(1)
	return c.Device.Flush(ctx)
}

func (c *countDev) Caps() backends.Caps {
	caps := c.Device.Caps()
	caps.Fast = false
	return caps
}

func (c *countDev) Close() error {
	c.closed.Store(true)
	return c.Device.Close()
}

// fileDev is a test-only persistent device: a plain file, so what it
// acknowledged survives the test process being killed.
type fileDev struct {
	f    *os.File
	size uint64
}

func openFileDev(t testing.TB, path string, size uint64) *fileDev {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	return &fileDev{f: f, size: size}
}

func (d *fileDev) Size() uint64 { return d.size }
func (d *fileDev) Caps() backends.Caps {
	return backends.Caps{Flush: true, Trim: true, Zero: true, MultiConn: true}
}
func (d *fileDev) ReadAt(_ context.Context, p []byte, off uint64) error {
	_, err := d.f.ReadAt(p, int64(off))
	return err
}
func (d *fileDev) WriteAt(_ context.Context, p []byte, off uint64, fua bool) error {
	if _, err := d.f.WriteAt(p, int64(off)); err != nil {
		return err
	}
	if fua {
		return d.f.Sync()
	}
	return nil
}
func (d *fileDev) Flush(context.Context) error { return d.f.Sync() }
func (d *fileDev) Trim(ctx context.Context, off, n uint64, _ bool) error {
	return d.Zero(ctx, off, n, 0)
}
func (d *fileDev) Zero(_ context.Context, off, n uint64, _ backends.ZeroFlags) error {
	_, err := d.f.WriteAt(make([]byte, n), int64(off))
	return err
}
func (d *fileDev) Extents(_ context.Context, off, n uint64, add func(backends.Extent)) error {
	add(backends.Extent{Length: n})
	return nil
}
func (d *fileDev) Cache(context.Context, uint64, uint64) error { return nil }
func (d *fileDev) Close() error                                { return d.f.Close() }

// gateWrites blocks backend writes until released (to hold dirty blocks
// dirty).
type gateWrites struct {
	backends.Device
	mu   sync.Mutex
	gate chan struct{}
}

func (g *gateWrites) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	g.mu.Lock()
	ch := g.gate
	g.mu.Unlock()
	if ch != nil {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g.Device.WriteAt(ctx, p, off, fua)
}

func newMem(size uint64) *countDev { return &countDev{Device: memory.New(size)} }

func cfg(t testing.TB, m mode, capacity, block uint64) Config {
	return Config{Mode: m.String(), Size: capacity, Block: block, OnRead: true, Dir: t.TempDir()}
}

func mustOpen(t testing.TB, inner backends.Device, c Config) *Device {
	t.Helper()
	d, err := Open(ctx, inner, c)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/251)
	}
	return b
}

func (d *Device) stats() (used, dirty int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.used, d.dirty
}

func (d *Device) stateOf(b uint64) uint8 {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e := d.entries[b]; e != nil {
		return e.state
	}
	return stateAbsent
}

func fmtState(s uint8) string { return fmt.Sprint([]string{"absent", "clean", "dirty"}[s]) }

// Resize makes fileDev a backends.Resizer (growing only).
func (d *fileDev) Resize(_ context.Context, size uint64) error {
	if size < d.size {
		return backends.ErrInvalid
	}
	if err := d.f.Truncate(int64(size)); err != nil {
		return err
	}
	d.size = size
	return nil
}
