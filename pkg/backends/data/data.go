// Package data is the data: backend: a small read-only volume whose
// contents are the spec itself, an RFC 2397 data URI such as
// "data:,hello" or "data:;base64,aGVsbG8=". Option size pads the data with
// zeros (e.g. a boot sector in a larger disk). Handy for tests and tiny
// fixed images; nbdkit's data plugin plays the same role.
package data

import (
	"context"
	"fmt"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func init() {
	backends.Register(backends.Backend{
		Scheme: "data",
		Doc:    "Read-only volume holding the bytes of an RFC 2397 data URI (data:[<mediatype>][;base64],<data>).",
		Options: []backends.Option{{
			Key: "size", Kind: backends.OptSize,
			Doc: "Pad the data with zeros to this size (default: the data's length).",
		}},
		Validate: func(s backends.Spec) error {
			_, err := load(s)
			return err
		},
		Open: func(_ context.Context, s backends.Spec, _ backends.Env) (backends.Device, error) {
			return load(s)
		},
	})
}

// load decodes s's URI and applies the size option.
func load(s backends.Spec) (*Device, error) {
	b, err := Decode(s.URL)
	if err != nil {
		return nil, err
	}
	size := uint64(len(b))
	if n, ok := s.Size("size"); ok {
		if n < size {
			return nil, fmt.Errorf("data: option %q is %s, smaller than the %d bytes of data",
				"size", backends.FormatSize(n), size)
		}
		size = n
	}
	return New(b, size), nil
}

// Device serves b followed by zeros up to size. It never changes, so it
// needs no locking.
type Device struct {
	b    []byte
	size uint64
}

// New returns a read-only device holding b padded with zeros to size
// (which must be at least len(b); it is raised to that otherwise). b must
// not be modified afterwards.
func New(b []byte, size uint64) *Device {
	return &Device{b: b, size: max(size, uint64(len(b)))}
}

var _ backends.Device = (*Device)(nil)

func (d *Device) Size() uint64 { return d.size }

func (d *Device) Caps() backends.Caps {
	return backends.Caps{ReadOnly: true, Extents: true, MultiConn: true, Fast: true}
}

func (d *Device) check(off, n uint64) error {
	if off > d.size || n > d.size-off {
		return fmt.Errorf("data: range %d+%d beyond size %d: %w", off, n, d.size, backends.ErrInvalid)
	}
	return nil
}

func (d *Device) ReadAt(_ context.Context, p []byte, off uint64) error {
	if err := d.check(off, uint64(len(p))); err != nil {
		return err
	}
	n := 0
	if off < uint64(len(d.b)) {
		n = copy(p, d.b[off:])
	}
	clear(p[n:])
	return nil
}

func (d *Device) WriteAt(context.Context, []byte, uint64, bool) error {
	return backends.ErrReadOnly
}

func (d *Device) Flush(context.Context) error { return nil }

func (d *Device) Trim(context.Context, uint64, uint64, bool) error {
	return backends.ErrReadOnly
}

func (d *Device) Zero(context.Context, uint64, uint64, backends.ZeroFlags) error {
	return backends.ErrReadOnly
}

// Extents reports the data as data and the padding as a hole of zeros.
func (d *Device) Extents(_ context.Context, off, length uint64, add func(backends.Extent)) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	end, dataEnd := off+length, uint64(len(d.b))
	if off < dataEnd {
		add(backends.Extent{Length: min(end, dataEnd) - off})
		off = min(end, dataEnd)
	}
	if off < end {
		add(backends.Extent{Length: end - off, Flags: backends.ExtentHole | backends.ExtentZero})
	}
	return nil
}

func (d *Device) Cache(context.Context, uint64, uint64) error { return nil }

func (d *Device) Close() error { return nil }
