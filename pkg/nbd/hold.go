package nbd

import (
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Holding back the replies of a deep queue.
//
// A client with many requests in flight over TCP sends them in bursts,
// one send(2) each, a few microseconds apart: fio at depth 32 takes the
// replies it finds, then sends as many new requests. Answering each
// piece of a burst as it comes costs that client dearly, and at depth 32
// the client's one thread is what bounds the IOPS: every reply packet is
// taken apart on its CPU, and every request that finds the reader parked
// pays for waking it (an interprocessor interrupt to a halted vCPU, some
// 3 us, 8% of fio's CPU). So when the reader has answered a few requests
// of a burst and the socket is empty, it waits a moment for the next
// request (polling the socket, not parked) before it sends what it
// holds: at most holdMax replies, holdMaxBytes of them, for holdFor.
// fio 4k random reads at depth 32 over TCP: 166k -> 179k IOPS, 2.2 -> 6
// replies per writev, parks 25k -> 1k a second.
//
// Neither may the client run dry while the reader holds its replies: so
// the reader holds fewer than half of what the client has lately had in
// flight together (the largest batch it answered in the last depthWindow
// to 2*depthWindow flushes), and the client has as many to work on while
// the reader gathers. Holding up to all of them made fio at depth 8 and
// the reader take turns to sleep: 82k IOPS against 158k. A client at
// depth 1 or 2 is never held back, and one whose depth falls is held
// back in vain for no more than two windows. The wait takes the
// process's one spin slot, so all of them together never cost more than
// one CPU, and there is none while another connection spins.
const (
	holdMax      = 8
	holdMaxBytes = 64 << 10
	holdFor      = 4 * time.Microsecond
	depthWindow  = 64
)

// holdStats counts the waits, and those a request ended, for tests.
var holdStats struct{ waits, filled atomic.Int64 }

// noteBatch feeds the depth estimate with a batch of n > 0 requests
// answered in one flush.
func (r *spinReader) noteBatch(n int) {
	r.depthCur = max(r.depthCur, n)
	if r.flushes++; r.flushes == depthWindow {
		r.depthPrev, r.depthCur, r.flushes = r.depthCur, 0, 0
	}
}

// depth is how many requests the client has lately had in flight at
// once, as far as the batches show.
func (r *spinReader) depth() int { return max(r.depthCur, r.depthPrev) }

// hold is called by the reader when it holds the replies to n requests
// (queued bytes of them) and has no further request buffered. If the
// client is likely to send another soon, it waits up to holdFor for
// one without parking, and tells whether one came (or the socket has an
// error or EOF for the reader to find): the caller then reads on and
// sends the replies together later. False: send them now.
func (r *spinReader) hold(n, queued int) bool {
	if !r.enabled || n == 0 || n >= holdMax || 2*n >= r.depth() || queued > holdMaxBytes ||
		r.held || !spinning.CompareAndSwap(false, true) {
		return false
	}
	r.held = true
	r.more = false
	_ = r.rc.Control(r.peekFn)
	r.release()
	holdStats.waits.Add(1)
	if r.more {
		holdStats.filled.Add(1)
	}
	return r.more
}

// peek polls the socket for up to holdFor and sets more if it is
// readable (bound once as peekFn: asking allocates nothing). It peeks
// with recv(2) rather than polling, as a request that arrives while the
// socket is locked by the peek is then taken in by this thread, not by
// the client's send.
func (r *spinReader) peek(fd uintptr) {
	start := time.Now()
	for {
		_, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&r.one[0])), 1,
			syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
		switch e {
		case syscall.EAGAIN, syscall.EINTR:
			if time.Since(start) < holdFor {
				continue
			}
			return
		default: // data, EOF or an error: the reader will see which
			r.more = true
			return
		}
	}
}
