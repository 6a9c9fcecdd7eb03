package nbd

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// Large reads over a unix socket without a copy.
//
// A read of a lent page is written with writev(2): one copy, from the
// volume's pages into pages the socket allocates for each send. Over a
// unix socket that copy is the server's whole cost for large reads
// (nbdcopy's sequential reads: the reader at 100% of a CPU, 80% of it in
// the copy), and it varies with the pages the kernel hands out: in a VM
// that reports its free pages to the host, a page that has sat free for
// a few seconds costs a fault in the host when next touched (here: fresh
// memory written at 0.84-0.9 GB/s after 4 s free, 2.0-2.4 GB/s when just
// freed), and the same reads ran at 0.7-3.8 GB/s from one copy to the
// next. A device that can give its pages to the kernel by reference
// (backends.PageGivingDevice: the memory backend) is read with
// vmsplice(2) into a pipe and splice(2) from it into the socket instead:
// the socket then holds references to the volume's pages, and the
// client copies straight out of them. The device keeps those pages from
// changing until the client has read them, which each connection tells
// it (consumed). Alternating runs, nbdcopy's sequential reads at one
// connection: 0.9-1.8 GB/s copied, 1.9-2.7 GB/s given (nbdkit 1.1-1.8).
//
// Not over TCP: there the socket reuses one page per connection, still
// in cache when the client copies from it, and giving made loopback
// reads slower (1.60-2.02x nbdkit's rate down to 1.31-1.64x). Small reads
// keep writev: two system calls a reply would cost more than the copy.

const (
	// giveMin is the smallest read given by reference.
	giveMin = 128 << 10
	// givePiece is how much is given at a time: one 64 KiB-aligned
	// stretch of the volume spans at most 16 of its 4 KiB pages, which
	// an empty pipe of the default size always takes whole.
	givePiece = 64 << 10
)

// errPipeFull ends a give whose piece did not fit the pipe: what went in
// is sent, and the rest given again.
var errPipeFull = errors.New("pipe full")

// giveState is the replyWriter's pipe and the progress of one give.
type giveState struct {
	giver backends.PageGiver
	pipe  [2]int // -1: none yet
	// inPipe counts the bytes vmspliced and not yet spliced out; the
	// device's settling reads it from other goroutines (consumed).
	inPipe atomic.Int64
	// probe is a duplicate of the socket's descriptor, for consumed:
	// it stays valid, and keeps the socket, until close, even after
	// the connection is closed.
	probe  int
	warmed byte // what warm read: kept, so the loads are too
	err    error
	giveFn func([]byte, bool) error
	outFn  func(fd uintptr) bool
}

// useGive makes rw write large reads of dev by reference, when the
// socket rc allows; rw must write raw.
func (rw *replyWriter) useGive(dev backends.PageGivingDevice, rc syscall.RawConn) {
	probe := -1
	var derr error
	if err := rc.Control(func(fd uintptr) { probe, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) }); err != nil || derr != nil {
		return // copies, as over any other socket
	}
	g := &giveState{pipe: [2]int{-1, -1}, probe: probe}
	g.giver = dev.NewGiver(g.consumed)
	g.giveFn = g.vmsplice
	g.outFn = rw.spliceOut
	rw.give = g
}

// consumed reports whether the client has read all we sent: nothing in
// the pipe, nothing in the socket's send queue (SIOCOUTQ of a unix
// socket counts what the peer has not read yet). Then the kernel holds
// no page we gave.
func (g *giveState) consumed() bool {
	if g.inPipe.Load() != 0 {
		return false
	}
	q, err := unix.IoctlGetInt(g.probe, unix.SIOCOUTQ)
	return err == nil && q == 0
}

// close releases the pipe, and with it any page references left in it,
// then ends the giving. Nothing writes any more.
func (g *giveState) close() {
	if g == nil {
		return
	}
	if g.pipe[0] >= 0 {
		unix.Close(g.pipe[0])
		unix.Close(g.pipe[1])
		g.pipe = [2]int{-1, -1}
		g.inPipe.Store(0)
	}
	g.giver.Close()
	unix.Close(g.probe)
}

// vmsplice puts b into the pipe, by reference if byRef, else by copy.
// It is called under the device's lock of the page, so it never waits:
// a full pipe ends it.
func (g *giveState) vmsplice(b []byte, byRef bool) error {
	if byRef {
		g.warmed |= warm(b)
	}
	for len(b) > 0 {
		var n int
		var err error
		if byRef {
			iov := []unix.Iovec{{Base: &b[0]}}
			iov[0].SetLen(len(b))
			n, err = unix.Vmsplice(g.pipe[1], iov, unix.SPLICE_F_NONBLOCK)
		} else {
			n, err = unix.Write(g.pipe[1], b)
		}
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return errPipeFull
		case err != nil:
			return os.NewSyscallError("vmsplice", err) // or write
		}
		g.inPipe.Add(int64(n))
		b = b[n:]
	}
	return nil
}

// writeGiven sends the payload [off, off+length) of a read reply whose
// header is already written.
func (rw *replyWriter) writeGiven(off, length uint64) error {
	g := rw.give
	if g.pipe[0] < 0 {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			return os.NewSyscallError("pipe2", err)
		}
		g.pipe = p
	}
	for length > 0 {
		// The pipe is empty here: each piece is sent before the next.
		n := min(length, givePiece-off%givePiece)
		err := g.giver.GiveRead(off, n, g.giveFn)
		got := uint64(g.inPipe.Load())
		if err != nil && (!errors.Is(err, errPipeFull) || got == 0) {
			return fmt.Errorf("giving %d bytes at %d to the kernel: %w", n, off, err)
		}
		if err := rw.drainPipe(); err != nil {
			return err
		}
		off, length = off+got, length-got
	}
	return nil
}

// drainPipe splices all the pipe holds into the socket, waiting in the
// netpoller while the socket is full.
func (rw *replyWriter) drainPipe() error {
	g := rw.give
	if g.inPipe.Load() == 0 {
		return nil
	}
	g.err = nil
	if err := rw.raw.Write(g.outFn); err != nil {
		return err
	}
	return g.err
}

func (rw *replyWriter) spliceOut(fd uintptr) bool {
	g := rw.give
	for g.inPipe.Load() > 0 {
		n, err := unix.Splice(g.pipe[0], nil, int(fd), nil, int(g.inPipe.Load()), unix.SPLICE_F_NONBLOCK|unix.SPLICE_F_MOVE)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return false // wait until writable
		case err != nil:
			g.err = os.NewSyscallError("splice", err)
			return true
		case n == 0:
			g.err = os.NewSyscallError("splice", syscall.EPIPE)
			return true
		}
		g.inPipe.Add(-n)
	}
	return true
}

// warm reads a byte of each cache line of b before it is given. The
// client's copy out of a given page is then served from the cache, not
// from memory: nbdcopy at one connection spent 72% of its time in that
// copy, and its reads went from 1.5-1.9 to 2.2-2.9 GB/s (alternating
// runs), for some 0.1 s of our CPU per GiB.
func warm(b []byte) byte {
	var s byte
	for i := 0; i < len(b); i += 64 {
		s |= b[i]
	}
	return s
}
