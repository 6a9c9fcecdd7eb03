package cache

// The block map on disk.
//
// File "map" is a 64-byte header followed by 16-byte records, each one
// block's new state. The in-memory map changes only together with an
// append (under Device.mu), so the file always describes the memory.
// Records are appended with one write(2) each batch and without fsync:
// after kill -9 the kernel still has every completed write(2) and pwrite(2)
// in its page cache, so the map and the data file survive a crash of the
// process exactly as they were when the last call returned. That is all a
// write acknowledged by the writeback cache is promised (like a disk's
// volatile write cache): a power loss may lose it, but not a flushed one,
// because FLUSH writes dirty blocks back to the backend and flushes it.
//
// Power loss is recognised by the kernel boot ID in the header: a map
// written in another boot and not closed cleanly (data fsynced, header
// flag set) cannot be trusted block by block, so the whole cache is
// dropped; everything FLUSHed is in the backend by then.
//
// The ordering that makes the map never claim stale data:
//   - a block becomes clean (fill) or dirty from absent only after its
//     data is in the data file;
//   - a clean block becomes dirty before its data changes (until then the
//     data file holds the backend's bytes, which writing back is harmless);
//   - a block becomes absent (eviction, invalidation) before its data is
//     punched out or the backend is changed under it.
// Compaction writes the current map to a new file, fsyncs it and renames
// it over the old one, so a crash leaves either file intact.

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
)

const (
	stateAbsent uint8 = 0
	stateClean  uint8 = 1
	stateDirty  uint8 = 2
)

const (
	headerSize = 64
	recordSize = 16
	mapMagic   = "csinbdc1"
	flagClean  = 1 // closed cleanly: data file fsynced, map complete
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

type mapHeader struct {
	block, size uint64
	boot        [16]byte
	flags       uint32
}

func (h mapHeader) marshal() []byte {
	b := make([]byte, headerSize)
	copy(b, mapMagic)
	binary.LittleEndian.PutUint64(b[8:], h.block)
	binary.LittleEndian.PutUint64(b[16:], h.size)
	copy(b[24:40], h.boot[:])
	binary.LittleEndian.PutUint32(b[40:], h.flags)
	binary.LittleEndian.PutUint32(b[60:], crc32.Checksum(b[:60], crcTable))
	return b
}

func parseHeader(b []byte) (mapHeader, error) {
	var h mapHeader
	if len(b) < headerSize || string(b[:8]) != mapMagic {
		return h, errors.New("not a cache map (bad magic)")
	}
	if crc32.Checksum(b[:60], crcTable) != binary.LittleEndian.Uint32(b[60:]) {
		return h, errors.New("cache map header checksum mismatch")
	}
	h.block = binary.LittleEndian.Uint64(b[8:])
	h.size = binary.LittleEndian.Uint64(b[16:])
	copy(h.boot[:], b[24:40])
	h.flags = binary.LittleEndian.Uint32(b[40:])
	if h.block == 0 || h.block&(h.block-1) != 0 {
		return h, fmt.Errorf("cache map header: bad block size %d", h.block)
	}
	return h, nil
}

type record struct {
	block uint64
	state uint8
}

func appendRecord(b []byte, r record) []byte {
	var x [recordSize]byte
	binary.LittleEndian.PutUint64(x[0:], r.block)
	x[8] = r.state
	binary.LittleEndian.PutUint32(x[12:], crc32.Checksum(x[:12], crcTable))
	return append(b, x[:]...)
}

// parseRecords applies b's records to m, stopping at the first torn or
// corrupt one (only the tail can be torn: records are only appended). It
// returns how many bytes were valid.
func parseRecords(b []byte, m map[uint64]uint8) int {
	n := 0
	for len(b) >= recordSize {
		if crc32.Checksum(b[:12], crcTable) != binary.LittleEndian.Uint32(b[12:16]) || b[8] > stateDirty {
			break
		}
		blk := binary.LittleEndian.Uint64(b)
		if b[8] == stateAbsent {
			delete(m, blk)
		} else {
			m[blk] = b[8]
		}
		b, n = b[recordSize:], n+recordSize
	}
	return n
}

// journal is the open map file.
type journal struct {
	path    string
	f       *os.File
	records int // appended since the last compaction
	buf     []byte
}

// loadMap reads path; a missing file is an empty map (ok false).
func loadMap(path string) (h mapHeader, m map[uint64]uint8, ok bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return h, map[uint64]uint8{}, false, nil
	}
	if err != nil {
		return h, nil, false, err
	}
	if h, err = parseHeader(b); err != nil {
		return h, nil, false, fmt.Errorf("%s: %w", path, err)
	}
	m = map[uint64]uint8{}
	parseRecords(b[headerSize:], m)
	return h, m, true, nil
}

// writeMap writes a compacted map to path atomically and returns it open
// for appending.
func writeMap(path string, h mapHeader, each func(func(record))) (*journal, error) {
	tmp := path + ".tmp"
	buf := h.marshal()
	each(func(r record) { buf = appendRecord(buf, r) })
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err = f.Write(buf); err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("writing cache map: %w", err)
	}
	// The descriptor of tmp is the renamed file; writes go to its end.
	if _, err := f.Seek(0, 2); err != nil {
		f.Close()
		return nil, err
	}
	return &journal{path: path, f: f}, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// append writes recs in one write(2).
func (j *journal) append(recs []record) error {
	if len(recs) == 0 {
		return nil
	}
	j.buf = j.buf[:0]
	for _, r := range recs {
		j.buf = appendRecord(j.buf, r)
	}
	if _, err := j.f.Write(j.buf); err != nil {
		return fmt.Errorf("cache map %s: %w", j.path, err)
	}
	j.records += len(recs)
	return nil
}

func (j *journal) close() error { return j.f.Close() }

// bootID is the kernel's boot ID, which tells a crash of the process (same
// boot, page cache intact) from a power loss or reboot.
func bootID() [16]byte {
	var id [16]byte
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return id
	}
	h, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(string(b)), "-", ""))
	if err == nil {
		copy(id[:], h)
	}
	return id
}
