// Package backends defines the block device interface every backend and
// filter implements, and the volume spec ("export name") that names a
// whole stack of them.
package backends

import (
	"context"
	"fmt"
	"syscall"
)

// Device is one layer of a volume: a backend (the data source) or a filter
// wrapping another Device. Offsets and lengths are in bytes; callers (the NBD
// server) have already checked that every range lies inside [0, Size()), so
// implementations need not re-check, but must stay safe if they are wrong.
//
// Every method may be called concurrently from many goroutines. Errors should
// wrap a syscall.Errno where one fits (EPERM, ENOSPC, EINVAL, ENOTSUP, EIO…):
// the server maps them onto the protocol's error codes, anything else is EIO.
type Device interface {
	// Size is the device size in bytes; it changes only through Resizer.
	Size() uint64
	// Caps says what the device can do. It is constant while open.
	Caps() Caps

	// ReadAt fills p from offset off.
	ReadAt(ctx context.Context, p []byte, off uint64) error
	// WriteAt writes p at off. With fua set it returns only once the data
	// is durable (as if followed by Flush).
	WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error
	// Flush makes every completed write durable.
	Flush(ctx context.Context) error
	// Trim hints that the range is no longer needed; reads of it may then
	// return anything (they return zeros for every backend we ship).
	Trim(ctx context.Context, off, length uint64, fua bool) error
	// Zero makes the range read as zeros. ZeroNoHole asks that space stay
	// allocated; ZeroFast asks to fail with ENOTSUP at once rather than be
	// slower than writing zeros.
	Zero(ctx context.Context, off, length uint64, flags ZeroFlags) error
	// Extents reports allocation status for [off, off+length): it calls
	// add with consecutive extents starting at off, and may stop early
	// (after at least one extent) or report past the end of the range.
	Extents(ctx context.Context, off, length uint64, add func(Extent)) error
	// Cache hints that the range will be read soon (prefetch); devices
	// without a cache may treat it as a no-op.
	Cache(ctx context.Context, off, length uint64) error
	// Close releases the device. It flushes what a Flush would.
	Close() error
}

// Lender is implemented by devices whose data already sits in memory, so
// that a read can be answered straight from it instead of from a copy.
// Lend appends to dst slices that together hold [off, off+length) and
// reports whether all of it is known to be zeros. The slices must stay
// valid and must not be written through; a write that overlaps the read
// while it is in flight may show through, which the NBD protocol leaves
// unspecified for overlapping requests anyway. Filters do not forward it:
// a device that wraps another lends only what it owns.
type Lender interface {
	Lend(off, length uint64, dst [][]byte) (vec [][]byte, zero bool, err error)
}

// PageGivingDevice is implemented by devices whose pages can be handed to
// the kernel by reference (vmsplice(2)), for a client to copy straight
// from them. Each client (connection) gets its own PageGiver. consumed
// reports whether that client has read everything given so far; it must
// not block, and may be called from any goroutine until the giver's
// Close. Filters do not forward it, as they do not forward Lend.
type PageGivingDevice interface {
	NewGiver(consumed func() bool) PageGiver
}

// PageGiver gives one client a device's pages.
type PageGiver interface {
	// GiveRead calls give with the pieces of [off, off+length) in
	// order; give must not block. Pieces with byRef may be passed to
	// the kernel by reference: the device keeps them as they are until
	// the client has read them. Others must be copied.
	GiveRead(off, length uint64, give func(b []byte, byRef bool) error) error
	// Close ends the giving, asking consumed one last time.
	Close()
}

// Caps are the capabilities a device answers for; a filter may turn one off
// for everything beneath it (nbdkit's can_* questions).
type Caps struct {
	ReadOnly  bool // writes, trims and zeroes fail with EPERM
	Flush     bool // Flush does something useful (else a no-op)
	FUA       bool // native FUA (else the server emulates it with Flush)
	Trim      bool
	Zero      bool // efficient Zero (else the server still offers it)
	FastZero  bool // Zero with ZeroFast can succeed
	Extents   bool // Extents reports real holes
	Cache     bool // Cache does real prefetching
	MultiConn bool // a Flush on one connection covers writes completed on all
	// Fast promises that no call blocks on anything slower than memory
	// (no network, no disk beyond the page cache), so the server may run
	// requests on the connection's reader instead of handing them to
	// worker goroutines. Filters that may wait (rate limits, remote
	// misses) must turn it off.
	Fast bool
	// Rotational hints that seeks are expensive.
	Rotational bool
	// Volatile says the contents live only in this process (a memory
	// volume, a discarded-at-close overlay): a process that opens the
	// volume again after this one died finds them gone, so a restarted
	// server must not re-serve it to a kernel that still holds the old
	// data's file system.
	Volatile bool
	// BufferedWrites says writes are acknowledged from this process's
	// memory before they are durable (a write-back buffer, emptied by
	// Flush): a process that dies with some unflushed loses them, and a
	// successor's Flush cannot know. Only a clean Close makes the volume
	// safe to serve again from another process.
	BufferedWrites bool
	// MinBlock, PrefBlock and MaxBlock are the block size constraints
	// (0 means the server default: 1, 4096, 32 MiB).
	MinBlock, PrefBlock, MaxBlock uint32
}

// ZeroFlags modify Zero.
type ZeroFlags uint8

const (
	ZeroFUA    ZeroFlags = 1 << iota // durable on return
	ZeroNoHole                       // keep the range allocated
	ZeroFast                         // fail fast with ENOTSUP if not cheap
)

// TrimAsZero serves Trim with Zero (holes allowed), for devices that have
// no older bytes to fall back to and so must read a trimmed range as
// zeros anyway.
func TrimAsZero(ctx context.Context, d Device, off, length uint64, fua bool) error {
	var f ZeroFlags
	if fua {
		f = ZeroFUA
	}
	return d.Zero(ctx, off, length, f)
}

// ExtentFlags describe an extent; the values match NBD's base:allocation.
type ExtentFlags uint32

const (
	ExtentHole ExtentFlags = 1 << 0 // not allocated
	ExtentZero ExtentFlags = 1 << 1 // reads as zeros
)

// Extent is a run of bytes sharing one status.
type Extent struct {
	Length uint64
	Flags  ExtentFlags
}

// Errors with a protocol meaning. They wrap syscall errnos so callers can
// test for either.
var (
	ErrReadOnly     = fmt.Errorf("device is read-only: %w", syscall.EPERM)
	ErrNotSupported = fmt.Errorf("operation not supported: %w", syscall.ENOTSUP)
	ErrNoSpace      = fmt.Errorf("no space left: %w", syscall.ENOSPC)
	ErrInvalid      = fmt.Errorf("invalid request: %w", syscall.EINVAL)
)

// Resizer is implemented by devices that can grow while open (volume
// expansion). After a successful Resize, Size reports the new size; a
// filter implements it only by forwarding to the device it wraps and
// adjusting its own state. Shrinking is refused with ErrInvalid.
type Resizer interface {
	Resize(ctx context.Context, size uint64) error
}

// Resize grows dev to size if it (and every filter in it) supports that.
func Resize(ctx context.Context, dev Device, size uint64) error {
	if size == dev.Size() {
		return nil
	}
	r, ok := dev.(Resizer)
	if !ok {
		return fmt.Errorf("resize: %w", ErrNotSupported)
	}
	return r.Resize(ctx, size)
}

// Unwrapper is implemented by filters, returning the device they wrap, so
// that Find can look through a stack. Every filter should implement it.
type Unwrapper interface {
	Unwrap() Device
}

// Find returns the first device of type T in an opened stack: dev itself
// or one found by unwrapping filters that implement Unwrapper.
func Find[T Device](dev Device) (T, bool) {
	for dev != nil {
		if d, ok := dev.(T); ok {
			return d, true
		}
		u, ok := dev.(Unwrapper)
		if !ok {
			break
		}
		dev = u.Unwrap()
	}
	var zero T
	return zero, false
}
