package nbd

import (
	"bytes"
	"context"
	"os"
	"slices"
	"strings"
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
	// failOff and failLen, when failLen is nonzero, narrow fail to the
	// calls whose range overlaps [failOff, failOff+failLen) (Flush then
	// never fails), so a test can provoke an error and then check that
	// the connection still serves other requests.
	failOff, failLen uint64
	// flushes counts Flush calls, caches Cache calls, fastZeroes Zero
	// calls with ZeroFast and noHoleZeroes those with ZeroNoHole.
	flushes, caches, fastZeroes, noHoleZeroes int
}

// failing returns the error injected for an I/O call on [off, off+length).
// The caller holds d.mu.
func (d *testDevice) failing(off, length uint64) error {
	if d.fail == nil || d.failLen == 0 {
		return d.fail
	}
	if off < d.failOff+d.failLen && d.failOff < off+length {
		return d.fail
	}
	return nil
}

// counters returns a snapshot of the call counters.
func (d *testDevice) counters() (flushes, caches, fastZeroes, noHoleZeroes int) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.flushes, d.caches, d.fastZeroes, d.noHoleZeroes
}

// snapshot returns copies of the contents and the allocation map.
func (d *testDevice) snapshot() ([]byte, []bool) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return bytes.Clone(d.data), append([]bool(nil), d.alloc...)
}

const testBlock = 4096

func newTestDevice(size int) *testDevice {
	return &testDevice{
		data:  make([]byte, size),
		alloc: make([]bool, (size+testBlock-1)/testBlock),
		caps: backends.Caps{Flush: true, FUA: false, Trim: true, Zero: true, FastZero: true,
			Extents: true, MultiConn: true, Fast: testInline},
	}
}

// testInline runs the suite's devices as Caps.Fast, so requests take the
// server's inline path instead of its workers. hack/test.sh runs the tests
// that never block a device both ways.
var testInline = os.Getenv("NBD_TEST_INLINE") != ""

func (d *testDevice) Size() uint64        { return uint64(len(d.data)) }
func (d *testDevice) Caps() backends.Caps { return d.caps }

func (d *testDevice) ReadAt(_ context.Context, p []byte, off uint64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.failing(off, uint64(len(p))); err != nil {
		return err
	}
	copy(p, d.data[off:])
	return nil
}

// Lend lends the device's own bytes; the server uses it on the inline
// path. Unallocated blocks are known zeros.
func (d *testDevice) Lend(off, length uint64, dst [][]byte) ([][]byte, bool, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if err := d.failing(off, length); err != nil {
		return dst, false, err
	}
	zero := true
	for b := off / testBlock; b*testBlock < off+length; b++ {
		zero = zero && !d.alloc[b]
	}
	return append(dst, d.data[off:off+length]), zero, nil
}

// lendViaReadAt lends a copy made by r's ReadAt, for test devices that
// wrap testDevice to change what reads return.
func lendViaReadAt(r interface {
	ReadAt(context.Context, []byte, uint64) error
}, off, length uint64, dst [][]byte) ([][]byte, bool, error) {
	b := make([]byte, length)
	if err := r.ReadAt(context.Background(), b, off); err != nil {
		return dst, false, err
	}
	return append(dst, b), false, nil
}

func (d *testDevice) WriteAt(_ context.Context, p []byte, off uint64, _ bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.failing(off, uint64(len(p))); err != nil {
		return err
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
	if d.failLen != 0 {
		return nil
	}
	return d.fail
}

func (d *testDevice) Trim(ctx context.Context, off, length uint64, _ bool) error {
	return d.Zero(ctx, off, length, 0)
}

func (d *testDevice) Zero(_ context.Context, off, length uint64, flags backends.ZeroFlags) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.failing(off, length); err != nil {
		return err
	}
	if flags&backends.ZeroFast != 0 {
		d.fastZeroes++
	}
	if flags&backends.ZeroNoHole != 0 {
		d.noHoleZeroes++
	}
	copy(d.data[off:off+length], make([]byte, length))
	if flags&backends.ZeroNoHole != 0 {
		// NO_HOLE: the range must end up fully provisioned.
		for b := off / testBlock; b*testBlock < off+length; b++ {
			d.alloc[b] = true
		}
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
	if err := d.failing(off, length); err != nil {
		return err
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

func (d *testDevice) Cache(_ context.Context, off, length uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.caches++
	return d.failing(off, length)
}

func (d *testDevice) Close() error { return nil }

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
	// Map order is random; a listing in name order keeps tests repeatable.
	slices.SortFunc(out, func(a, b ExportInfo) int { return strings.Compare(a.Name, b.Name) })
	return out
}
