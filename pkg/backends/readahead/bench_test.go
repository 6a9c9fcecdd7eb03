package readahead

import (
	"context"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// BenchmarkSequentialSlowOrigin reads 64 KiB at a time, one after the
// other (a dd-like reader), from an origin that takes 1 ms per request,
// directly and through readahead. hack/bench-filters-rate-readahead.sh
// runs it when no slow origin can be served over NBD.
func BenchmarkSequentialSlowOrigin(b *testing.B) {
	const size, bs = 256 << 20, 64 << 10
	for _, c := range []struct {
		name string
		wrap func(backends.Device) backends.Device
	}{
		{"direct", func(d backends.Device) backends.Device { return d }},
		{"readahead", func(d backends.Device) backends.Device { return New(d, DefaultMax) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			inner := newCounting(size, false)
			inner.delay = time.Millisecond
			d := c.wrap(inner)
			defer d.Close()
			buf := make([]byte, bs)
			b.SetBytes(bs)
			off := uint64(0)
			for b.Loop() {
				if err := d.ReadAt(context.Background(), buf, off); err != nil {
					b.Fatal(err)
				}
				off = (off + bs) % size
			}
		})
	}
}
