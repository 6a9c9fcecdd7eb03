package backends

import "context"

// ExtentMerger joins adjacent extents with equal flags before handing them
// to Add, for filters that build one Extents reply out of several sources
// (the cache's blocks and its backend, the overlay and its origin), so
// clients see one run where the sources' boundaries do not matter.
type ExtentMerger struct {
	Add func(Extent) // receives each merged extent, in order

	cur   Extent
	valid bool
}

// Emit adds the next n bytes with flags f; nothing is passed on until the
// flags change or Flush.
func (m *ExtentMerger) Emit(n uint64, f ExtentFlags) {
	if n == 0 {
		return
	}
	if m.valid && m.cur.Flags == f {
		m.cur.Length += n
		return
	}
	m.Flush()
	m.cur, m.valid = Extent{Length: n, Flags: f}, true
}

// Flush passes on the extent being built, if any.
func (m *ExtentMerger) Flush() {
	if m.valid {
		m.Add(m.cur)
		m.valid = false
	}
}

// ClipExtents asks dev for the extents of [off, off+length) and passes fn
// each one clipped to that range, skipping empty ones and any past its
// end. It returns how many bytes the reply covered: less than length when
// dev stopped early, as a device may.
func ClipExtents(ctx context.Context, dev Device, off, length uint64, fn func(n uint64, f ExtentFlags)) (uint64, error) {
	var done uint64
	err := dev.Extents(ctx, off, length, func(e Extent) {
		if done < length && e.Length > 0 {
			n := min(e.Length, length-done)
			fn(n, e.Flags)
			done += n
		}
	})
	return done, err
}
