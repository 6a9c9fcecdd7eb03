package nbd

import (
	"bytes"
	"context"
	"sync"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// testDevice is a plain in-memory device with 4 KiB allocation tracking,
// enough to exercise every server path without depending on a backend.
type testDevice struct {
	mu    sync.RWMutex
	data  []byte
	alloc []bool // per 4 KiB block
	caps  backends.Caps
	// fail, when set, is returned by every I/O call.
	fail error
	// flushes counts Flush calls.
	flushes int
}

const testBlock = 4096

func newTestDevice(size int) *testDevice {
	return &testDevice{
		data:  make([]byte, size),
		alloc: make([]bool, (size+testBlock-1)/testBlock),
		caps: backends.Caps{Flush: true, FUA: false, Trim: true, Zero: true, FastZero: true,
			Extents: true, MultiConn: true},
	}
}

func (d *testDevice) Size() uint64        { return uint64(len(d.data)) }
func (d *testDevice) Caps() backends.Caps { return d.caps }

func (d *testDevice) ReadAt(_ context.Context, p []byte, off uint64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.fail != nil {
		return d.fail
	}
	copy(p, d.data[off:])
	return nil
}

func (d *testDevice) WriteAt(_ context.Context, p []byte, off uint64, _ bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fail != nil {
		return d.fail
	}
	if d.caps.ReadOnly {
		return backends.ErrReadOnly
	}
	copy(d.data[off:], p)
	for b := off / testBlock; b*testBlock < off+uint64(len(p)); b++ {
		d.alloc[b] = true
	}
	return nil
}

func (d *testDevice) Flush(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.flushes++
	return d.fail
}

func (d *testDevice) Trim(ctx context.Context, off, length uint64, _ bool) error {
	return d.Zero(ctx, off, length, 0)
}

func (d *testDevice) Zero(_ context.Context, off, length uint64, flags backends.ZeroFlags) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fail != nil {
		return d.fail
	}
	copy(d.data[off:off+length], make([]byte, length))
	if flags&backends.ZeroNoHole != 0 {
		return nil
	}
	// Whole blocks become holes again.
	for b := (off + testBlock - 1) / testBlock; (b+1)*testBlock <= off+length; b++ {
		d.alloc[b] = false
	}
	return nil
}

func (d *testDevice) Extents(_ context.Context, off, length uint64, add func(backends.Extent)) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.fail != nil {
		return d.fail
	}
	for pos := off; pos < off+length; {
		b := pos / testBlock
		end := min((b+1)*testBlock, uint64(len(d.data)))
		var f backends.ExtentFlags
		if !d.alloc[b] {
			f = backends.ExtentHole | backends.ExtentZero
		} else if bytes.Count(d.data[b*testBlock:end], []byte{0}) == int(end-b*testBlock) {
			f = backends.ExtentZero
		}
		add(backends.Extent{Length: end - pos, Flags: f})
		pos = end
	}
	return nil
}

func (d *testDevice) Cache(context.Context, uint64, uint64) error { return nil }
func (d *testDevice) Close() error                               { return nil }

// staticExports serves fixed devices by name.
type staticExports map[string]*Export

func (s staticExports) Open(_ context.Context, name string) (*Export, func(), error) {
	e, ok := s[name]
	if !ok {
		return nil, nil, ErrUnknownExport
	}
	return e, func() {}, nil
}

func (s staticExports) List(context.Context) []ExportInfo {
	var out []ExportInfo
	for n, e := range s {
		out = append(out, ExportInfo{Name: n, Description: e.Description})
	}
	return out
}
