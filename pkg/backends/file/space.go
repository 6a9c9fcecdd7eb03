package file

import (
	"context"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// zeros is an aligned buffer of zeros, never written, for writing zeros
// where the filesystem or device offers nothing better.
var zeros = alignedBuf(bounceSize)

// maxExtents bounds the extents one Extents call reports (a fragmented
// file could otherwise produce millions for one request).
const maxExtents = 1024

const (
	punchHole = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	zeroRange = unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE
)

// Trim punches a hole (regular files) or discards (block devices); it is a
// hint, so a filesystem or device that cannot do it makes it a no-op.
func (d *Device) Trim(_ context.Context, off, length uint64, fua bool) error {
	if err := d.writable(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	var err error
	switch {
	case d.blk:
		err = d.blkRange(unix.BLKDISCARD, off, length)
	case d.caps.Trim:
		err = fallocate(d.fd, punchHole, off, length)
	}
	if err != nil && err != unix.EOPNOTSUPP {
		return fmt.Errorf("file: trim %s %d+%d: %w", d.path, off, length, err)
	}
	return d.sync(fua)
}

// Zero makes the range read as zeros: a punched hole, or with ZeroNoHole
// unwritten but allocated extents (FALLOC_FL_ZERO_RANGE, or a hole
// allocated again); written zeros where neither works, unless ZeroFast.
func (d *Device) Zero(ctx context.Context, off, length uint64, flags backends.ZeroFlags) error {
	if err := d.writable(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	done, err := d.fastZero(off, length, flags&backends.ZeroNoHole != 0)
	if err != nil {
		return fmt.Errorf("file: zero %s %d+%d: %w", d.path, off, length, err)
	}
	if !done {
		if flags&backends.ZeroFast != 0 {
			return fmt.Errorf("file: zero %s: no fast way to zero: %w", d.path, backends.ErrNotSupported)
		}
		if err := d.writeZeros(ctx, off, length); err != nil {
			return err
		}
	}
	return d.sync(flags&backends.ZeroFUA != 0)
}

// fastZero zeroes the range without writing data if it can; done is false
// when it cannot (the caller writes zeros).
func (d *Device) fastZero(off, length uint64, noHole bool) (done bool, err error) {
	if d.blk {
		return false, nil // BLKZEROOUT goes in writeZeros: it may be slow
	}
	try := func(mode uint32) bool {
		if err != nil {
			return false
		}
		e := fallocate(d.fd, mode, off, length)
		if e == nil {
			return true
		}
		if e != unix.EOPNOTSUPP {
			err = e
		}
		return false
	}
	if !noHole && d.caps.Trim && try(punchHole) {
		return true, nil
	}
	if !d.noZeroRange.Load() {
		if try(zeroRange) {
			return true, nil
		}
		if err == nil {
			d.noZeroRange.Store(true)
		}
	}
	if noHole && d.caps.Trim && try(punchHole) {
		// A hole allocated again reads as zeros and keeps the space.
		return try(unix.FALLOC_FL_KEEP_SIZE), err
	}
	return false, err
}

// writeZeros zeroes the range the slow way: BLKZEROOUT for the aligned
// middle of a block device, written zeros for everything else.
func (d *Device) writeZeros(ctx context.Context, off, length uint64) error {
	if d.blk {
		lbs := d.logicalBlock()
		a, e := (off+lbs-1)/lbs*lbs, (off+length)/lbs*lbs
		if a < e {
			if err := d.blkRange(unix.BLKZEROOUT, a, e-a); err == nil {
				if err := d.writeZerosSlow(ctx, e, off+length-e); err != nil {
					return err
				}
				return d.writeZerosSlow(ctx, off, a-off)
			} else if err != unix.EOPNOTSUPP && err != unix.EINVAL {
				return fmt.Errorf("file: zero %s %d+%d: %w", d.path, a, e-a, err)
			}
		}
	}
	return d.writeZerosSlow(ctx, off, length)
}

func (d *Device) writeZerosSlow(ctx context.Context, off, length uint64) error {
	for length > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(length, uint64(len(zeros)))
		if err := d.WriteAt(ctx, zeros[:n], off, false); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

func (d *Device) sync(fua bool) error {
	if !fua {
		return nil
	}
	return d.Flush(context.Background())
}

// Extents reports holes (reading as zeros) and data, from SEEK_DATA and
// SEEK_HOLE. Block devices report everything as data.
func (d *Device) Extents(_ context.Context, off, length uint64, add func(backends.Extent)) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	end := off + length
	if d.blk {
		add(backends.Extent{Length: length})
		return nil
	}
	const hole = backends.ExtentHole | backends.ExtentZero
	for pos, n := off, 0; pos < end && n < maxExtents; n++ {
		data, err := seek(d.fd, pos, unix.SEEK_DATA)
		switch {
		case err == unix.ENXIO: // no data from pos to EOF
			data = end
		case err != nil: // no sparse support here: all data
			add(backends.Extent{Length: end - pos})
			return nil
		}
		if data > pos {
			next := min(data, end)
			add(backends.Extent{Length: next - pos, Flags: hole})
			pos = next
			continue
		}
		h, err := seek(d.fd, pos, unix.SEEK_HOLE)
		if err != nil || h <= pos {
			h = end // raced with a truncate or a write: call the rest data
		}
		next := min(h, end)
		add(backends.Extent{Length: next - pos})
		pos = next
	}
	return nil
}

func seek(fd int, off uint64, whence int) (uint64, error) {
	for {
		n, err := unix.Seek(fd, int64(off), whence)
		if err == unix.EINTR {
			continue
		}
		return uint64(n), err
	}
}

func fallocate(fd int, mode uint32, off, length uint64) error {
	for {
		err := unix.Fallocate(fd, mode, int64(off), int64(length))
		if err != unix.EINTR {
			return err
		}
	}
}

// blkSize is a block device's size (BLKGETSIZE64).
func blkSize(fd int) (uint64, error) {
	var n uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n))); e != 0 {
		return 0, e
	}
	return n, nil
}

// logicalBlock is the block device's logical block size (the unit of
// BLKDISCARD and BLKZEROOUT), 512 if the ioctl fails.
func (d *Device) logicalBlock() uint64 {
	n, err := unix.IoctlGetInt(d.fd, unix.BLKSSZGET)
	if err != nil || n <= 0 {
		return 512
	}
	return uint64(n)
}

// blkRange runs BLKDISCARD or BLKZEROOUT over the whole logical blocks
// inside [off, off+length).
func (d *Device) blkRange(req uint, off, length uint64) error {
	lbs := d.logicalBlock()
	a, e := (off+lbs-1)/lbs*lbs, (off+length)/lbs*lbs
	if a >= e {
		return nil
	}
	r := [2]uint64{a, e - a}
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(d.fd), uintptr(req), uintptr(unsafe.Pointer(&r)))
		switch e {
		case 0:
			return nil
		case unix.EINTR:
			continue
		}
		return e
	}
}
