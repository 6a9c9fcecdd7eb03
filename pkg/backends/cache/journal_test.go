package cache

import (
	"bytes"
	"testing"
)

// FuzzMap feeds arbitrary bytes to the map file parser: it must never
// panic, and whatever it accepts must read back the same after a
// compaction-style rewrite.
func FuzzMap(f *testing.F) {
	h := mapHeader{block: 65536, size: 1 << 30, boot: [16]byte{1, 2, 3}, flags: flagClean}
	b := h.marshal()
	b = appendRecord(b, record{7, stateDirty})
	b = appendRecord(b, record{9, stateClean})
	b = appendRecord(b, record{7, stateAbsent})
	f.Add(b)
	f.Add(append(bytes.Clone(b), 1, 2, 3)) // a torn tail
	f.Add(mapHeader{block: 4096, size: 12345}.marshal())
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b)
		if err != nil {
			return
		}
		m := map[uint64]uint8{}
		n := parseRecords(b[headerSize:], m)
		if n%recordSize != 0 || n > len(b)-headerSize {
			t.Fatalf("parsed %d bytes of records", n)
		}
		out := h.marshal()
		for blk, st := range m {
			if st != stateClean && st != stateDirty {
				t.Fatalf("block %d in state %d", blk, st)
			}
			out = appendRecord(out, record{blk, st})
		}
		h2, err := parseHeader(out)
		if err != nil || h2 != h {
			t.Fatalf("header does not round-trip: %v %+v %+v", err, h, h2)
		}
		m2 := map[uint64]uint8{}
		parseRecords(out[headerSize:], m2)
		if len(m2) != len(m) {
			t.Fatalf("records do not round-trip")
		}
		for k, v := range m {
			if m2[k] != v {
				t.Fatalf("block %d: %d, want %d", k, m2[k], v)
			}
		}
	})
}
