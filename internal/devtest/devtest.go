// Package devtest holds the small helpers that tests of backends and
// filters share: opening a spec, reading a device back, test data.
//
// It imports pkg/backends, so pkg/backends' own (internal) tests cannot use
// it; every backend and filter package's tests can.
package devtest

import (
	"context"
	"errors"
	"math/rand/v2"
	"syscall"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// TryOpen parses spec and opens it with env through the registry (so the
// filters the spec enables are stacked as in production). Tests of option
// validation look at its error.
func TryOpen(spec string, env backends.Env) (backends.Device, error) {
	s, err := backends.Parse(spec)
	if err != nil {
		return nil, err
	}
	return backends.Open(context.Background(), s, env)
}

// Open is TryOpen failing the test on error; the device is closed when the
// test ends. Cleanups run last-in first-out, so a server started after
// Open on this device stops before the device is closed.
func Open(t testing.TB, spec string, env backends.Env) backends.Device {
	t.Helper()
	dev, err := TryOpen(spec, env)
	if err != nil {
		t.Fatalf("open %q: %v", spec, err)
	}
	t.Cleanup(func() { dev.Close() })
	return dev
}

// OpenErr opens spec expecting it to fail and returns the error; a device
// that opens is closed and fails the test.
func OpenErr(t testing.TB, spec string, env backends.Env) error {
	t.Helper()
	dev, err := TryOpen(spec, env)
	if err == nil {
		dev.Close()
		t.Fatalf("open %q succeeded", spec)
	}
	return err
}

// RandBytes returns n random bytes, none of them zero, so that a hole or a
// zeroed range can never pass for written data.
func RandBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.Uint32() | 1)
	}
	return b
}

// ReadAll reads n bytes at off from d, failing the test on error.
func ReadAll(t testing.TB, d backends.Device, off, n uint64) []byte {
	t.Helper()
	b := make([]byte, n)
	if err := d.ReadAt(context.Background(), b, off); err != nil {
		t.Fatalf("read %d+%d: %v", off, n, err)
	}
	return b
}

// CheckReadOnly checks that d says it is read-only and refuses every kind
// of write (WriteAt, Trim, Zero) with EPERM, the errno an NBD client sees
// for a read-only export; it reports each one that does not.
func CheckReadOnly(t testing.TB, d backends.Device) {
	t.Helper()
	if !d.Caps().ReadOnly {
		t.Errorf("caps %+v: not read-only", d.Caps())
	}
	ctx := context.Background()
	for _, op := range []struct {
		name string
		err  error
	}{
		{"write", d.WriteAt(ctx, []byte{1}, 0, false)},
		{"write fua", d.WriteAt(ctx, []byte{1}, 0, true)},
		{"trim", d.Trim(ctx, 0, 512, false)},
		{"zero", d.Zero(ctx, 0, 512, 0)},
	} {
		if !errors.Is(op.err, syscall.EPERM) {
			t.Errorf("%s on a read-only device: %v, want EPERM", op.name, op.err)
		}
	}
}

// CheckRead reads len(want) bytes at off from d and fails the test, naming
// what and the first differing offset, unless they are want.
func CheckRead(t testing.TB, what string, d backends.Device, off uint64, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if err := d.ReadAt(context.Background(), got, off); err != nil {
		t.Fatalf("%s: read %d+%d: %v", what, off, len(want), err)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: first difference at offset %d: %#x, want %#x", what, off+uint64(i), got[i], want[i])
		}
	}
}
