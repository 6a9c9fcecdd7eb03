package cow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
)

// bitset is a plain bit per block.
type bitset []uint64

func newBitset(n uint64) bitset    { return make(bitset, (n+63)/64) }
func (b bitset) get(i uint64) bool { return b[i/64]&(1<<(i%64)) != 0 }
func (b bitset) set(i uint64, v bool) {
	if v {
		b[i/64] |= 1 << (i % 64)
	} else {
		b[i/64] &^= 1 << (i % 64)
	}
}

// grow returns b extended to n bits (new bits clear).
func (b bitset) grow(n uint64) bitset {
	if w := (n + 63) / 64; w > uint64(len(b)) {
		b = append(b, make(bitset, w-uint64(len(b)))...)
	}
	return b
}

// The saved bitmaps: a 40-byte header (magic, block size, volume size,
// bit count, CRC-32C of the rest of the header and of the bits, four zero
// bytes) then the present and zero bitsets as little-endian words. Written to a temporary file,
// fsynced and renamed, so a crash leaves the old or the new one.
const (
	bitmapMagic  = "csinbdw1"
	bitmapHeader = 40
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

type savedMap struct {
	block, size   uint64
	present, zero bitset
}

func marshalBitmap(m savedMap) []byte {
	nbits := (m.size + m.block - 1) / m.block
	words := (nbits + 63) / 64
	b := make([]byte, bitmapHeader+16*words)
	copy(b, bitmapMagic)
	binary.LittleEndian.PutUint64(b[8:], m.block)
	binary.LittleEndian.PutUint64(b[16:], m.size)
	binary.LittleEndian.PutUint64(b[24:], nbits)
	p := b[bitmapHeader:]
	for i := uint64(0); i < words; i++ {
		binary.LittleEndian.PutUint64(p[8*i:], m.present[i])
		binary.LittleEndian.PutUint64(p[8*(words+i):], m.zero[i])
	}
	binary.LittleEndian.PutUint32(b[32:], bitmapCRC(b))
	return b
}

// bitmapCRC covers the header's fields and the bits.
func bitmapCRC(b []byte) uint32 {
	c := crc32.Update(0, crcTable, b[:32])
	return crc32.Update(c, crcTable, b[bitmapHeader:])
}

func parseBitmap(b []byte) (savedMap, error) {
	var m savedMap
	if len(b) < bitmapHeader || string(b[:8]) != bitmapMagic {
		return m, errors.New("not a cow bitmap (bad magic)")
	}
	m.block = binary.LittleEndian.Uint64(b[8:])
	m.size = binary.LittleEndian.Uint64(b[16:])
	nbits := binary.LittleEndian.Uint64(b[24:])
	if m.block == 0 || m.block&(m.block-1) != 0 {
		return m, fmt.Errorf("cow bitmap: bad block size %d", m.block)
	}
	if nbits != m.size/m.block+min(1, m.size%m.block) {
		return m, fmt.Errorf("cow bitmap: %d bits for %d bytes of %d-byte blocks", nbits, m.size, m.block)
	}
	words := (nbits + 63) / 64
	if uint64(len(b)-bitmapHeader) != 16*words {
		return m, fmt.Errorf("cow bitmap: %d bytes of bits, want %d", len(b)-bitmapHeader, 16*words)
	}
	if binary.LittleEndian.Uint32(b[36:]) != 0 || bitmapCRC(b) != binary.LittleEndian.Uint32(b[32:]) {
		return m, errors.New("cow bitmap: checksum mismatch")
	}
	m.present, m.zero = make(bitset, words), make(bitset, words)
	p := b[bitmapHeader:]
	for i := uint64(0); i < words; i++ {
		m.present[i] = binary.LittleEndian.Uint64(p[8*i:])
		m.zero[i] = binary.LittleEndian.Uint64(p[8*(words+i):])
	}
	return m, nil
}

func saveBitmap(path string, m savedMap) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(marshalBitmap(m))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		var d *os.File
		if d, err = os.Open(filepath.Dir(path)); err == nil {
			err = d.Sync()
			d.Close()
		}
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("saving cow bitmap: %w", err)
	}
	return nil
}
