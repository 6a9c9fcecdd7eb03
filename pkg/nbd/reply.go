package nbd

import (
	"encoding/binary"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// outMsg is one reply (or structured chunk) waiting to be written. It owns
// its payload buffer until written, then returns it to the pool and gives
// its bytes back to the connection's memory budget.
type outMsg struct {
	hdr  [48]byte // the longest: an extended header and a hole chunk's 12 bytes
	hn   uint8
	data []byte
	vec  *[][]byte // payload lent by the device, after data
	// given: the payload is [goff, goff+glen) of the device, written by
	// reference (see give.go) after the header.
	given      bool
	goff, glen uint64
	pooled     *[]byte
	weight     int64
}

// replyWriter serialises replies from many workers onto one connection.
// The first worker to find it idle becomes the flusher and writes whatever
// has queued meanwhile in one writev, so a deep queue costs few syscalls
// while a lone request at queue depth 1 is written at once, on its own
// goroutine, with no hand-off.
type replyWriter struct {
	w       io.Writer
	release func(weight int64)
	// raw, if set, is w's socket, written with writev(2) straight (set
	// by the reader, for devices served inline).
	raw    syscall.RawConn
	rawFn  func(fd uintptr) bool
	rawBuf [][]byte // what rawFn has left to write
	rawIov []syscall.Iovec
	rawErr error
	give   *giveState // set for devices whose reads go by reference

	mu       sync.Mutex
	pending  []outMsg // waiting to be written
	queued   int      // bytes in pending
	spare    []outMsg
	flushing bool
	err      error
	broken   atomic.Bool // err != nil
	iov      net.Buffers
	iovBack  net.Buffers
}

// send queues m and writes it now, unless another goroutine is writing,
// in which case that one writes it too.
func (rw *replyWriter) send(m *outMsg) {
	rw.mu.Lock()
	if !rw.add(m) {
		rw.mu.Unlock()
		return
	}
	rw.writeLocked()
}

// queue adds m without writing it (the inline path batches replies until
// it would block) and returns the bytes now waiting.
func (rw *replyWriter) queue(m *outMsg) int {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	rw.add(m)
	return rw.queued
}

// queuedBytes returns the bytes queued and not yet being written.
func (rw *replyWriter) queuedBytes() int {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return rw.queued
}

// flush writes whatever is queued.
func (rw *replyWriter) flush() {
	rw.mu.Lock()
	rw.writeLocked()
}

func (rw *replyWriter) add(m *outMsg) bool {
	if rw.err != nil {
		rw.free(m)
		return false
	}
	rw.pending = append(rw.pending, *m)
	rw.queued += int(m.hn) + len(m.data) + int(m.glen)
	if m.vec != nil {
		for _, b := range *m.vec {
			rw.queued += len(b)
		}
	}
	return true
}

// writeLocked is entered with rw.mu held and returns with it released.
func (rw *replyWriter) writeLocked() {
	if rw.flushing {
		rw.mu.Unlock()
		return
	}
	rw.flushing = true
	for len(rw.pending) > 0 && rw.err == nil {
		q := rw.pending
		rw.pending = rw.spare[:0]
		rw.queued = 0
		rw.mu.Unlock()

		iov := rw.iovBack[:0]
		var err error
		for i := range q {
			iov = append(iov, q[i].hdr[:q[i].hn])
			if len(q[i].data) > 0 {
				iov = append(iov, q[i].data)
			}
			if q[i].vec != nil {
				iov = append(iov, *q[i].vec...)
			}
			if q[i].given && err == nil {
				// What precedes the payload first, then the payload.
				if err = rw.writeRaw(iov); err == nil {
					err = rw.writeGiven(q[i].goff, q[i].glen)
				}
				clear(iov)
				iov = iov[:0]
			}
		}
		rw.iovBack = iov
		rw.iov = iov
		if err == nil && rw.raw != nil {
			err = rw.writeRaw(iov)
		} else if err == nil {
			_, err = rw.iov.WriteTo(rw.w)
		}
		for i := range rw.iovBack {
			rw.iovBack[i] = nil
		}
		for i := range q {
			rw.free(&q[i])
			q[i] = outMsg{}
		}

		rw.mu.Lock()
		rw.spare = q[:0]
		if err != nil {
			rw.err = err
			rw.broken.Store(true)
		}
	}
	if rw.err != nil {
		for i := range rw.pending {
			rw.free(&rw.pending[i])
		}
		rw.pending = rw.pending[:0]
		rw.queued = 0
	}
	rw.flushing = false
	rw.mu.Unlock()
}

// useRaw makes the writer write rc, w's socket, with writev(2) itself.
func (rw *replyWriter) useRaw(rc syscall.RawConn) {
	rw.raw = rc
	rw.rawFn = rw.writevRaw
}

// writeRaw writes bufs whole, waiting in the netpoller while the socket
// is full (and failing at its write deadline, as net.Conn would).
func (rw *replyWriter) writeRaw(bufs [][]byte) error {
	rw.rawBuf, rw.rawErr = bufs, nil
	err := rw.raw.Write(rw.rawFn)
	rw.rawBuf = nil
	if err != nil {
		return err
	}
	return rw.rawErr
}

// rawMaxIov bounds the vectors of one writev (IOV_MAX is 1024), and
// rawMaxWrite its bytes: the runtime cannot preempt a thread in a system
// call it was not told about, so none may copy for long.
const (
	rawMaxIov   = 1024
	rawMaxWrite = 1 << 20
)

func (rw *replyWriter) writevRaw(fd uintptr) bool {
	for len(rw.rawBuf) > 0 {
		iov, total := rw.rawIov[:0], 0
		for _, b := range rw.rawBuf {
			if len(iov) == rawMaxIov || total >= rawMaxWrite {
				break
			}
			if len(b) > 0 {
				iov = append(iov, syscall.Iovec{Base: &b[0]})
				iov[len(iov)-1].SetLen(len(b))
				total += len(b)
			}
		}
		rw.rawIov = iov
		if len(iov) == 0 {
			break // empty buffers only
		}
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
		clear(iov) // no pointers into freed replies kept
		switch e {
		case 0:
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // wait until writable
		default:
			rw.rawErr = os.NewSyscallError("writev", e)
			return true
		}
		// Drop what was written.
		for m := int(n); m > 0; {
			if b := rw.rawBuf[0]; len(b) <= m {
				m -= len(b)
				rw.rawBuf = rw.rawBuf[1:]
			} else {
				rw.rawBuf[0] = b[m:]
				m = 0
			}
		}
	}
	return true
}

func (rw *replyWriter) free(m *outMsg) {
	putBuf(m.pooled)
	putVec(m.vec)
	if m.weight > 0 {
		rw.release(m.weight)
	}
}

// failed returns the write error that broke the connection, if any. The
// reader asks before every request, so the common answer costs no lock.
func (rw *replyWriter) failed() error {
	if !rw.broken.Load() {
		return nil
	}
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return rw.err
}

// Reply builders. They fill m's header; payloads are set by the caller.

func (m *outMsg) simple(cookie uint64, errno uint32) {
	binary.BigEndian.PutUint32(m.hdr[0:], simpleMagic)
	binary.BigEndian.PutUint32(m.hdr[4:], errno)
	binary.BigEndian.PutUint64(m.hdr[8:], cookie)
	m.hn = simpleReplySize
}

// extended writes an extended reply header (NBD_OPT_EXTENDED_HEADERS):
// off is the request's offset, echoed as proto.md requires.
func (m *outMsg) extended(cookie, off uint64, flags, typ uint16, length uint64) {
	m.chunkHead(extendedReplyMagic, flags, typ, cookie)
	binary.BigEndian.PutUint64(m.hdr[16:], off)
	binary.BigEndian.PutUint64(m.hdr[24:], length)
	m.hn = extendedHeaderSize
}

// chunk writes a structured chunk header for a payload of length bytes;
// extra header bytes (an offset, an error code) follow in hdr.
func (m *outMsg) chunk(cookie uint64, flags, typ uint16, length uint32) {
	m.chunkHead(structuredMagic, flags, typ, cookie)
	binary.BigEndian.PutUint32(m.hdr[16:], length)
	m.hn = structuredHeaderSize
}

// chunkHead writes the 16 bytes structured and extended chunk headers
// begin alike with.
func (m *outMsg) chunkHead(magic uint32, flags, typ uint16, cookie uint64) {
	binary.BigEndian.PutUint32(m.hdr[0:], magic)
	binary.BigEndian.PutUint16(m.hdr[4:], flags)
	binary.BigEndian.PutUint16(m.hdr[6:], typ)
	binary.BigEndian.PutUint64(m.hdr[8:], cookie)
}
