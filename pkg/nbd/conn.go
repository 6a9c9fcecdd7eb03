package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// serverConn is one client connection: the handshake, then a reader
// goroutine that parses requests and hands them to a pool of workers that
// call the device and queue replies.
type serverConn struct {
	srv    *Server
	remote string
	br     *bufio.Reader
	src    io.Reader   // what br reads: large payloads bypass br's copy
	spin   *spinReader // under br until STARTTLS

	mu       sync.Mutex // guards conn (replaced by STARTTLS) against stop
	conn     net.Conn
	raw      net.Conn // the accepted transport, never replaced
	stopping atomic.Bool

	structured bool // structured replies (also true with extended)
	extended   bool // extended headers: 32-byte requests and replies
	metaAlloc  bool

	// Transmission state, fixed once the export is chosen.
	ctx        context.Context
	dev        backends.Device
	caps       backends.Caps
	size       uint64
	readOnly   bool
	minBlock   uint32
	maxPayload uint32

	inline   bool            // requests run on the reader (Caps.Fast devices)
	lender   backends.Lender // reads are written from the device's memory
	wlender  writeLender     // writes are read into the device's memory
	reqs     chan *request
	workers  int
	idle     atomic.Int32
	inflight sync.WaitGroup
	mem      *semaphore.Weighted
	out      replyWriter
}

// request is one parsed NBD request; pooled.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint64  // effect length, or payload length (WRITE, or extended with CmdFlagPayloadLen)
	buf    *[]byte // WRITE payload
	weight int64   // bytes held against the connection's budget
	inline bool    // handled on the reader: its reply may wait for a batch
}

var requestPool = sync.Pool{New: func() any { return new(request) }}

func newServerConn(s *Server, conn net.Conn) *serverConn {
	c := &serverConn{
		srv:    s,
		conn:   conn,
		raw:    conn,
		remote: remoteName(conn),
	}
	if uc, ok := conn.(*net.UnixConn); ok {
		setSendBuffer(uc, unixSendBuffer)
	}
	c.spin = newSpinReader(conn)
	c.src = c.spin
	c.br = bufio.NewReaderSize(c.spin, 128<<10)
	return c
}

// unixSendBuffer is the send buffer of a unix socket connection. With
// the usual 208 KiB, a 256 KiB reply does not fit: the reader waits for
// the client to drain each one, and the client for the rest of it. With
// 1 MiB, nbdcopy's sequential reads went from 2.8-3.6 to 3.9-4.2 GB/s
// (1 and 4 connections); TCP tunes its own buffers.
const unixSendBuffer = 1 << 20

// setSendBuffer sets a connection's send buffer to n bytes, over
// net.core.wmem_max where the process may (CAP_NET_ADMIN, as the node
// plugin has), up to it otherwise.
func setSendBuffer(uc *net.UnixConn, n int) {
	rc, err := uc.SyscallConn()
	if err != nil {
		return
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, n)
	}); err != nil || serr != nil {
		_ = uc.SetWriteBuffer(n)
	}
}

func remoteName(conn net.Conn) string {
	if a := conn.RemoteAddr(); a != nil && a.String() != "" {
		return a.Network() + ":" + a.String()
	}
	if a := conn.LocalAddr(); a != nil {
		return a.Network() + ":" + a.String()
	}
	return "unknown"
}

// stop asks the connection to finish what it has in flight and close.
func (c *serverConn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping.Store(true)
	_ = c.conn.SetReadDeadline(time.Now())
}

// closeNow closes the connection at once, failing whatever it is blocked
// on. It closes the transport under any TLS layer: c.conn may be being
// replaced by STARTTLS concurrently, and a tls.Conn's Close may block for
// seconds sending close_notify to a peer that does not read.
func (c *serverConn) closeNow() {
	_ = c.raw.Close()
}

// setDeadline sets the connection deadline unless stop already expired it.
func (c *serverConn) setDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping.Load() {
		t = time.Now()
	}
	_ = c.conn.SetDeadline(t)
}

func (c *serverConn) serve(ctx context.Context) {
	log := logConn(c)
	defer func() {
		if r := recover(); r != nil {
			log.Error(fmt.Errorf("panic: %v", r), "NBD connection failed", "stack", string(debug.Stack()))
		}
		c.conn.Close()
	}()
	exp, release, err := c.negotiate(ctx)
	if err != nil {
		if !errors.Is(err, errHardDisconnect) && !errors.Is(err, io.EOF) && !c.stopping.Load() {
			log.V(1).Info("NBD negotiation ended", "err", err)
		}
		return
	}
	defer release()
	c.transmit(ctx, exp)
}

// ServeTransmission serves conn with no handshake: the peer (the kernel's
// nbd driver) already knows the export. It returns when the peer
// disconnects or the server shuts down.
func (s *Server) ServeTransmission(ctx context.Context, conn net.Conn, exp *Export) {
	c := newServerConn(s, conn)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		conn.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.wg.Done()
		conn.Close()
	}()
	c.transmit(ctx, exp)
}

// exportFlags returns the size and transmission flags advertised for exp.
func exportFlags(exp *Export, structured bool) (uint64, uint16) {
	caps := exp.Device.Caps()
	f := uint16(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendCache)
	if exp.ReadOnly || caps.ReadOnly {
		// Nothing can change, so every connection sees the same data.
		f |= FlagReadOnly | FlagCanMultiConn
	} else {
		f |= FlagSendWriteZeroes
		if caps.Trim {
			f |= FlagSendTrim
		}
		if caps.FastZero {
			f |= FlagSendFastZero
		}
		if caps.MultiConn {
			f |= FlagCanMultiConn
		}
	}
	if structured {
		f |= FlagSendDF
	}
	if caps.Rotational {
		f |= FlagRotational
	}
	return exp.Device.Size(), f
}

// blockSizes returns the advertised minimum, preferred and maximum sizes.
func blockSizes(caps backends.Caps) (minB, prefB, maxB uint32) {
	minB, prefB, maxB = caps.MinBlock, caps.PrefBlock, caps.MaxBlock
	if minB == 0 {
		minB = 1
	}
	if prefB == 0 {
		prefB = 4096
	}
	prefB = max(prefB, minB)
	if maxB == 0 || maxB > DefaultMaxPayload {
		maxB = DefaultMaxPayload
	}
	maxB = max(maxB, prefB)
	return minB, prefB, maxB
}

func (c *serverConn) transmit(ctx context.Context, exp *Export) {
	log := logConn(c)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.ctx = ctx
	c.dev = exp.Device
	c.caps = exp.Device.Caps()
	c.size = exp.Device.Size()
	c.readOnly = exp.ReadOnly || c.caps.ReadOnly
	c.minBlock, _, c.maxPayload = blockSizes(c.caps)
	// A device that never blocks is served on the reader goroutine: no
	// hand-off between threads, and replies batched per read of the
	// socket. That is what makes queue depth 1 as fast as it can be.
	c.inline = c.caps.Fast
	if c.inline {
		// Lending is a copy saved; it is only safe to write lent
		// memory from the reader if that never blocks, and memory
		// devices are Fast by nature anyway.
		c.lender, _ = exp.Device.(backends.Lender)
		c.wlender, _ = exp.Device.(writeLender)
	}
	// After STARTTLS the reader reads the TLS layer, not spin.
	c.spin.enabled = c.inline && c.src == c.spin && c.spin.rc != nil
	c.reqs = make(chan *request, c.srv.cfg.MaxInFlight)
	c.mem = semaphore.NewWeighted(c.srv.cfg.MaxBufferedBytes)
	c.out.w = c.conn
	// Replies of the inline path are written with writev(2) straight,
	// for the reason rawRead reads so: over TCP +11-19% IOPS at depth
	// 32, over a unix socket nbdcopy's sequential reads 2.7-3.3 ->
	// 3.6-3.9 GB/s. (Not after STARTTLS: the TLS layer writes.)
	if c.spin.enabled {
		c.out.useRaw(c.spin.rc)
		if gd, ok := exp.Device.(backends.PageGivingDevice); ok && c.lender != nil && c.spin.unix {
			c.out.useGive(gd, c.spin.rc) // see give.go
		}
	}
	c.out.release = c.mem.Release
	log.V(2).Info("NBD transmission started", "size", c.size, "structured", c.structured, "extended", c.extended)

	defer c.spin.release() // also when a panic unwinds
	err := c.readLoop(ctx)
	c.spin.release()
	c.out.flush()
	graceful := err == nil || (c.stopping.Load() && isTimeout(err))
	if !graceful {
		// Nobody will read the replies still in flight: fail their
		// writes at once rather than wait on a dead peer.
		c.conn.Close()
	}
	c.inflight.Wait()
	c.out.give.close() // nothing writes any more
	close(c.reqs)
	switch {
	case graceful:
		log.V(2).Info("NBD connection closed")
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, syscall.ECONNRESET):
		log.V(2).Info("NBD client went away", "err", err)
	default:
		log.Info("NBD connection dropped", "err", err)
	}
}

func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// readLoop parses requests until NBD_CMD_DISC (nil), a broken stream or
// shutdown.
func (c *serverConn) readLoop(ctx context.Context) error {
	var hdrBuf [extendedHeaderSize]byte
	hdr := hdrBuf[:requestHeaderSize]
	if c.extended {
		hdr = hdrBuf[:extendedHeaderSize]
	}
	batch := 0 // requests run inline since the last wait for the client
	for {
		if c.stopping.Load() {
			return nil
		}
		if err := c.out.failed(); err != nil {
			return fmt.Errorf("writing replies: %w", err)
		}
		// Out of requests: answer them, unless the client is likely to
		// send more in a moment (hold).
		if c.inline && c.br.Buffered() < len(hdr) {
			if queued := c.out.queuedBytes(); !c.spin.hold(batch, queued) {
				c.spin.setBatch(batch)
				if c.spin.waitsEachAnswer() && queued <= idleMaxFlush {
					c.spin.prepare()
				}
				c.out.flush() // about to wait for the client: answer first
				batch = 0
			}
		}
		if _, err := io.ReadFull(c.br, hdr); err != nil {
			if c.stopping.Load() && isTimeout(err) {
				return nil
			}
			return err
		}
		r := requestPool.Get().(*request)
		if err := c.parseRequest(r, hdr); err != nil {
			requestPool.Put(r)
			return err
		}
		if r.typ == CmdDisc {
			requestPool.Put(r)
			return nil
		}
		errno, msg := c.validate(r)
		if c.hasPayload(r) {
			if errno != 0 { // (always so for a payload on anything but WRITE)
				// Skip the payload to keep the stream in step; one too
				// large to be honest ends the connection instead (with
				// extended headers, proto.md asks for that beyond the
				// advertised maximum).
				if r.length > 2*DefaultMaxPayload || (c.extended && r.length > uint64(c.maxPayload)) {
					requestPool.Put(r)
					return fmt.Errorf("payload of %d bytes is over the limit: closing the connection", r.length)
				}
				if err := c.skipPayload(r.length); err != nil {
					requestPool.Put(r)
					return err
				}
			} else if c.wlender != nil {
				if err := c.writeInPlace(r); err != nil {
					requestPool.Put(r)
					return err
				}
				requestPool.Put(r)
				batch++
				continue
			} else {
				r.weight = int64(r.length)
				if err := c.acquire(ctx, r.weight); err != nil {
					requestPool.Put(r)
					return err
				}
				r.buf = getBuf(int(r.length))
				c.flushBeforeWait(r.length)
				if err := c.readPayload(*r.buf, r.length); err != nil {
					c.mem.Release(r.weight)
					putBuf(r.buf)
					requestPool.Put(r)
					return err
				}
			}
		}
		if errno != 0 {
			r.inline = c.inline // the reader flushes before it blocks
			c.replyError(r, errno, msg)
			requestPool.Put(r)
			continue
		}
		if r.typ == CmdRead {
			r.weight = int64(r.length)
			if err := c.acquire(ctx, r.weight); err != nil {
				requestPool.Put(r)
				return err
			}
		}
		if !c.inline || (r.length > inlineMaxPayload && (r.typ == CmdWrite || (r.typ == CmdRead && c.lender == nil))) {
			c.dispatch(r)
			continue
		}
		r.inline = true
		c.handle(r)
		requestPool.Put(r)
		batch++
	}
}

// parseRequest decodes a request header: compact (28 bytes) or, once
// negotiated, extended (32 bytes, 64-bit length). Either kind where the
// other was agreed is broken framing.
func (c *serverConn) parseRequest(r *request, hdr []byte) error {
	magic := uint32(requestMagic)
	if c.extended {
		magic = extendedRequestMagic
	}
	if m := binary.BigEndian.Uint32(hdr[0:]); m != magic {
		return fmt.Errorf("bad request magic %#x: closing the connection", m)
	}
	*r = request{
		flags:  binary.BigEndian.Uint16(hdr[4:]),
		typ:    binary.BigEndian.Uint16(hdr[6:]),
		cookie: binary.BigEndian.Uint64(hdr[8:]),
		off:    binary.BigEndian.Uint64(hdr[16:]),
	}
	if c.extended {
		r.length = binary.BigEndian.Uint64(hdr[24:])
	} else {
		r.length = uint64(binary.BigEndian.Uint32(hdr[24:]))
	}
	return nil
}

// hasPayload reports whether r's length bytes of payload follow it: a
// WRITE's, or an extended request's that says so. An extended WRITE
// "MUST" say so (proto.md), but qemu 10's client does not, and a WRITE
// without its data is no WRITE: the flag is not required.
func (c *serverConn) hasPayload(r *request) bool {
	return r.typ == CmdWrite || (c.extended && r.flags&CmdFlagPayloadLen != 0)
}

// writeLender is implemented by devices whose data sits in memory the
// server may fill itself (the memory backend): a WRITE's payload is read
// from the socket straight into the device, saving the copy out of a
// buffer. Like backends.Lender, filters do not forward it.
type writeLender interface {
	// BorrowWrite appends to dst the device's memory for [off,
	// off+length), to be filled by the caller without further locking.
	BorrowWrite(off, length uint64, dst [][]byte) ([][]byte, error)
	// CommitWrite ends a borrow of the same range, filled or not.
	CommitWrite(off, length uint64)
}

// writeInPlace serves a validated WRITE on the reader by reading its
// payload into the device's own memory. Only a broken stream is returned;
// the device's refusal is replied.
func (c *serverConn) writeInPlace(r *request) (rerr error) {
	r.inline = true
	vec := getVec()
	defer putVec(vec)
	payloadRead := false
	defer func() {
		// A panicking device becomes an EIO reply here too, as in
		// handle; the payload is skipped if it was not read yet.
		if p := recover(); p != nil {
			c.logPanic(r, p)
			if !payloadRead {
				if rerr = c.skipPayload(r.length); rerr != nil {
					return
				}
			}
			c.replyError(r, EIO, "internal server error")
		}
	}()
	var err error
	if *vec, err = c.wlender.BorrowWrite(r.off, r.length, (*vec)[:0]); err != nil {
		if err := c.skipPayload(r.length); err != nil {
			return err
		}
		c.replyDeviceError(r, err)
		return nil
	}
	c.flushBeforeWait(r.length)
	rest := r.length
	for _, b := range *vec {
		if err = c.readPayload(b, rest); err != nil {
			break
		}
		rest -= uint64(len(b))
	}
	payloadRead = true
	c.wlender.CommitWrite(r.off, r.length)
	if err != nil {
		return err
	}
	c.finish(r, r.flags&CmdFlagFUA != 0, nil)
	return nil
}

// flushBeforeWait sends the replies the inline path holds back if reading
// n more bytes may wait for the client: answer first.
func (c *serverConn) flushBeforeWait(n uint64) {
	if c.inline && uint64(c.br.Buffered()) < n {
		c.out.flush()
	}
}

// skipPayload discards a WRITE payload that will not be written, keeping
// the stream in step.
func (c *serverConn) skipPayload(n uint64) error {
	c.flushBeforeWait(n)
	_, err := io.CopyN(io.Discard, c.br, int64(n))
	return err
}

// directReadMin is the least payload still to come that is read past the
// buffered reader once it is drained: a bulk payload lands where it
// belongs with no copy through br, while small ones still come with the
// requests behind them.
const directReadMin = 16 << 10

// readPayload fills p, the next part of a payload of which rest bytes
// (p's included) are still to come.
func (c *serverConn) readPayload(p []byte, rest uint64) error {
	for len(p) > 0 {
		n := c.br.Buffered()
		if n == 0 && rest >= directReadMin {
			_, err := io.ReadFull(c.src, p)
			return err
		}
		// Take only what br holds: asking it for more makes it refill,
		// reading ahead into the payload, and from then on every part
		// of the payload would pass through br's buffer.
		if n == 0 {
			n = len(p) // a small payload's end: br reads the requests behind it too
		}
		n, err := io.ReadFull(c.br, p[:min(n, len(p))])
		if err != nil {
			return err
		}
		p, rest = p[n:], rest-uint64(n)
	}
	return nil
}

// inlineMaxPayload is the largest READ or WRITE the inline path runs
// itself. Bigger ones go to workers, so that the copies of several large
// requests run on all CPUs while the reader takes in the next payload;
// reads from a Lender copy nothing and always run inline.
const inlineMaxPayload = 64 << 10

// inlineFlushBytes bounds the replies the inline path holds back while
// more requests are already buffered.
const inlineFlushBytes = 1 << 20

// reply queues a reply. Workers write at once; the inline path holds
// replies until it has no buffered request left (one writev answers a
// whole batch) or has held back enough to be worth sending.
func (c *serverConn) reply(r *request, m *outMsg) {
	if !r.inline {
		c.out.send(m)
		return
	}
	if c.out.queue(m) >= inlineFlushBytes {
		c.out.flush()
	}
}

// acquire takes n bytes of the connection's payload budget. The inline
// path first sends what it holds back, which is what returns budget.
func (c *serverConn) acquire(ctx context.Context, n int64) error {
	if c.mem.TryAcquire(n) {
		return nil
	}
	c.out.flush()
	return c.mem.Acquire(ctx, n)
}

// validate checks a request against the protocol and the export. A nonzero
// errno is replied without touching the device.
func (c *serverConn) validate(r *request) (uint32, string) {
	var allowed uint16 = CmdFlagFUA
	if c.extended {
		// Only WRITE carries a payload here: on any other command the
		// flag "will trigger an NBD_EINVAL" (proto.md), once the
		// payload is skipped.
		if r.typ != CmdWrite && r.flags&CmdFlagPayloadLen != 0 {
			return EINVAL, fmt.Sprintf("%s takes no payload", clientCmdName(uint32(r.typ)))
		}
		allowed |= CmdFlagPayloadLen
	}
	switch r.typ {
	case CmdRead:
		if c.structured {
			allowed |= CmdFlagDF
		}
	case CmdWrite, CmdTrim, CmdFlush, CmdCache:
	case CmdWriteZeroes:
		allowed |= CmdFlagNoHole
		if c.caps.FastZero {
			allowed |= CmdFlagFastZero
		}
	case CmdBlockStatus:
		allowed |= CmdFlagReqOne
	default:
		return EINVAL, fmt.Sprintf("unknown command %d", r.typ)
	}
	if r.flags&^allowed != 0 {
		return EINVAL, fmt.Sprintf("invalid flags %#x for %s", r.flags, clientCmdName(uint32(r.typ)))
	}
	if r.typ == CmdFlush {
		if r.off != 0 || r.length != 0 {
			return EINVAL, "flush with nonzero offset or length"
		}
		return 0, ""
	}
	if r.length == 0 {
		return EINVAL, "zero-length request"
	}
	if !c.inExport(r.off, r.length) {
		if r.typ == CmdWrite || r.typ == CmdWriteZeroes {
			return ENOSPC, "request beyond the end of the export"
		}
		return EINVAL, "request beyond the end of the export"
	}
	if c.minBlock > 1 && (r.off%uint64(c.minBlock) != 0 || r.length%uint64(c.minBlock) != 0) {
		return EINVAL, fmt.Sprintf("request not aligned to the minimum block size %d", c.minBlock)
	}
	switch r.typ {
	case CmdRead, CmdWrite:
		if r.length > uint64(c.maxPayload) {
			return EINVAL, fmt.Sprintf("request of %d bytes exceeds the maximum payload %d", r.length, c.maxPayload)
		}
	}
	switch r.typ {
	case CmdWrite, CmdTrim, CmdWriteZeroes:
		if c.readOnly {
			return EPERM, "export is read-only"
		}
	}
	if r.typ == CmdTrim && !c.caps.Trim {
		return EINVAL, "trim is not supported by this export"
	}
	if r.typ == CmdBlockStatus && !c.metaAlloc {
		return EINVAL, "block status without a negotiated meta context"
	}
	return 0, ""
}

// inExport reports whether [off, off+length) lies within the export. Only
// a request past the size last seen asks the device again: it may have
// grown since (volume expansion under a kernel attach, which has no
// handshake to redo).
func (c *serverConn) inExport(off, length uint64) bool {
	if off <= c.size && length <= c.size-off {
		return true
	}
	c.size = c.dev.Size()
	return off <= c.size && length <= c.size-off
}

func (c *serverConn) dispatch(r *request) {
	c.inflight.Add(1)
	// Each request claims an idle worker, or starts one if none is left;
	// workers live as long as the connection, so a steady queue depth
	// costs no goroutine creation. The claim is made here, not by the
	// worker when it wakes: a worker parked on the channel that has been
	// handed a request but not yet scheduled must not count as idle, or
	// a second request queues behind the first and waits for it to
	// finish (with a device that blocks, forever).
	claimed := false
	for n := c.idle.Load(); n > 0; n = c.idle.Load() {
		if c.idle.CompareAndSwap(n, n-1) {
			claimed = true
			break
		}
	}
	if !claimed && c.workers < c.srv.cfg.MaxInFlight {
		c.workers++
		go c.worker()
	}
	c.reqs <- r
}

// worker serves requests until c.reqs is closed. It counts itself idle
// only between requests; dispatch takes it off the count.
func (c *serverConn) worker() {
	for {
		r, ok := <-c.reqs
		if !ok {
			return
		}
		c.handle(r)
		requestPool.Put(r)
		c.inflight.Done()
		c.idle.Add(1)
	}
}

// handle runs one validated request against the device and queues its
// reply. A panicking device becomes an EIO reply, never a dead process.
func (c *serverConn) handle(r *request) {
	defer func() {
		if p := recover(); p != nil {
			c.logPanic(r, p)
			if r.buf != nil {
				putBuf(r.buf)
				r.buf = nil
			}
			if r.weight > 0 {
				c.mem.Release(r.weight)
				r.weight = 0
			}
			c.replyError(r, EIO, "internal server error")
		}
	}()
	ctx := c.ctx
	fua := r.flags&CmdFlagFUA != 0
	var err error
	switch r.typ {
	case CmdRead:
		c.read(r)
		return
	case CmdWrite:
		err = c.dev.WriteAt(ctx, *r.buf, r.off, fua && c.caps.FUA)
		putBuf(r.buf)
		r.buf = nil
		c.mem.Release(r.weight)
		r.weight = 0
	case CmdFlush:
		err = c.dev.Flush(ctx)
		fua = false
	case CmdTrim:
		err = c.dev.Trim(ctx, r.off, r.length, fua && c.caps.FUA)
	case CmdWriteZeroes:
		var zf backends.ZeroFlags
		if fua && c.caps.FUA {
			zf |= backends.ZeroFUA
		}
		if r.flags&CmdFlagNoHole != 0 {
			zf |= backends.ZeroNoHole
		}
		if r.flags&CmdFlagFastZero != 0 {
			zf |= backends.ZeroFast
		}
		err = c.dev.Zero(ctx, r.off, r.length, zf)
	case CmdCache:
		err = c.dev.Cache(ctx, r.off, r.length)
		fua = false
	case CmdBlockStatus:
		c.blockStatus(r)
		return
	}
	c.finish(r, fua, err)
}

// finish replies to a request the device has run with err, first making
// it durable with a flush if the client asked for FUA and the device
// cannot do it itself.
// logPanic records a device panic while handling r.
func (c *serverConn) logPanic(r *request, p any) {
	logConn(c).Error(fmt.Errorf("panic: %v", p), "Device panicked", "command", clientCmdName(uint32(r.typ)), "stack", string(debug.Stack()))
}

func (c *serverConn) finish(r *request, fua bool, err error) {
	if err == nil && fua && !c.caps.FUA {
		// Emulated FUA: the device has no cheaper way to make one
		// write durable.
		err = c.dev.Flush(c.ctx)
	}
	if err != nil {
		c.replyDeviceError(r, err)
		return
	}
	var m outMsg
	c.done(&m, r)
	c.reply(r, &m)
}

func (c *serverConn) read(r *request) {
	var m outMsg
	var zero bool
	if c.lender != nil {
		// Straight from the device's memory: no copy at all.
		vec := getVec()
		var err error
		if *vec, zero, err = c.lender.Lend(r.off, r.length, (*vec)[:0]); err != nil {
			putVec(vec)
			c.mem.Release(r.weight)
			r.weight = 0
			c.replyDeviceError(r, err)
			return
		}
		m.vec = vec
		if c.out.give != nil && !zero && r.length >= giveMin {
			// By reference, when the writer gets to it (give.go).
			putVec(vec)
			m.vec = nil
			m.given, m.goff, m.glen = true, r.off, r.length
		}
	} else {
		buf := getBuf(int(r.length))
		if err := c.dev.ReadAt(c.ctx, *buf, r.off); err != nil {
			putBuf(buf)
			c.mem.Release(r.weight)
			r.weight = 0
			c.replyDeviceError(r, err)
			return
		}
		// The scan stops at the first nonzero byte, so data costs next
		// to nothing.
		zero = isZero(*buf)
		m.data, m.pooled = *buf, buf
	}
	if c.structured && zero {
		// All zeros: a 12-byte OFFSET_HOLE chunk instead of the data,
		// sparing the wire and the client a sparse read's zeros.
		c.out.free(&m)
		m = outMsg{}
		c.mem.Release(r.weight)
		r.weight = 0
		c.chunk(&m, r, replyFlagDone, replyTypeOffsetHole, 12)
		binary.BigEndian.PutUint64(m.hdr[m.hn:], r.off)
		binary.BigEndian.PutUint32(m.hdr[m.hn+8:], uint32(r.length))
		m.hn += 12
		c.reply(r, &m)
		return
	}
	if c.structured {
		c.chunk(&m, r, replyFlagDone, replyTypeOffsetData, 8+uint32(r.length))
		binary.BigEndian.PutUint64(m.hdr[m.hn:], r.off)
		m.hn += 8
	} else {
		m.simple(r.cookie, 0)
	}
	m.weight = r.weight
	r.weight = 0
	c.reply(r, &m)
}

var zeroBlock [64 << 10]byte

// isZero reports whether b is all zeros, 64 KiB at a time through the
// runtime's vectorised memequal.
func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if string(b[:n]) != string(zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// maxDescriptors bounds one block status reply (proto.md allows 2^20; a
// tenth of that keeps a reply under 1 MiB).
const maxDescriptors = 1 << 17

func (c *serverConn) blockStatus(r *request) {
	end := r.off + r.length
	pos := r.off
	// Compact: context id, then descriptors of (length, flags) in 32
	// bits each. Extended (NBD_REPLY_TYPE_BLOCK_STATUS_EXT): context id,
	// descriptor count, then (length, flags) in 64 bits each.
	head, w := 4, 4 // w: width of a descriptor field
	if c.extended {
		head, w = 8, 8
	}
	put := func(b []byte, v uint64) {
		if w == 8 {
			binary.BigEndian.PutUint64(b, v)
		} else {
			binary.BigEndian.PutUint32(b, uint32(v)) // < 2^32: so is a compact request
		}
	}
	buf := getBuf(head + 2*w*64)
	b := (*buf)[:head]
	binary.BigEndian.PutUint32(b, allocationContextID)
	n := 0
	limit := maxDescriptors
	if r.flags&CmdFlagReqOne != 0 {
		limit = 1
	}
	var lastFlags uint32
	var runLen uint64 // the last descriptor's length so far
	add := func(e backends.Extent) {
		if pos >= end || e.Length == 0 {
			return
		}
		l := min(e.Length, end-pos)
		f := uint32(e.Flags) & uint32(backends.ExtentHole|backends.ExtentZero)
		if n > 0 && f == lastFlags {
			runLen += l // merge runs with the same status
		} else {
			if n >= limit {
				pos = end
				return
			}
			b = append(b, make([]byte, 2*w)...)
			put(b[len(b)-w:], uint64(f))
			n++
			lastFlags, runLen = f, l
		}
		put(b[len(b)-2*w:], runLen)
		pos += l
	}
	var err error
	if c.caps.Extents {
		err = c.dev.Extents(c.ctx, r.off, r.length, add)
	} else {
		add(backends.Extent{Length: r.length})
	}
	if err == nil && n == 0 {
		err = fmt.Errorf("device reported no extents: %w", syscall.EIO)
	}
	if err != nil {
		if cap(b) <= cap(*buf) {
			putBuf(buf)
		}
		c.replyDeviceError(r, err)
		return
	}
	if cap(b) > cap(*buf) {
		// append outgrew the pooled buffer; the new one is garbage-collected.
		putBuf(buf)
		buf = nil
	}
	typ := uint16(replyTypeBlockStatus)
	if c.extended {
		binary.BigEndian.PutUint32(b[4:], uint32(n))
		typ = replyTypeBlockStatusExt
	}
	var m outMsg
	c.chunk(&m, r, replyFlagDone, typ, uint32(len(b)))
	m.data, m.pooled = b, buf
	c.reply(r, &m)
}

// replyDeviceError logs a device failure and replies with its errno.
func (c *serverConn) replyDeviceError(r *request, err error) {
	errno := errnoOf(err)
	if errno == EIO || klog.V(2).Enabled() {
		logConn(c).Info("Request failed", "command", clientCmdName(uint32(r.typ)), "offset", r.off, "length", r.length, "err", err)
	}
	c.replyError(r, errno, err.Error())
}

// chunk fills m's header for a chunk of r's reply with a payload of
// length bytes: structured, or extended once negotiated. Further header
// bytes (an offset, an error code) go at m.hdr[m.hn:].
func (c *serverConn) chunk(m *outMsg, r *request, flags, typ uint16, length uint32) {
	if c.extended {
		m.extended(r.cookie, r.off, flags, typ, uint64(length))
		return
	}
	m.chunk(r.cookie, flags, typ, length)
}

// done fills m's header for a success with no payload: a simple reply,
// which extended headers do not allow (an empty NBD_REPLY_TYPE_NONE
// chunk instead).
func (c *serverConn) done(m *outMsg, r *request) {
	if c.extended {
		m.extended(r.cookie, r.off, replyFlagDone, replyTypeNone, 0)
		return
	}
	m.simple(r.cookie, 0)
}

// replyError sends an error: a structured error chunk with a message when
// structured replies are on (required for READ), else a simple reply.
func (c *serverConn) replyError(r *request, errno uint32, msg string) {
	var m outMsg
	if !c.structured {
		m.simple(r.cookie, errno)
		c.reply(r, &m)
		return
	}
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	c.chunk(&m, r, replyFlagDone, replyTypeError, uint32(6+len(msg)))
	binary.BigEndian.PutUint32(m.hdr[m.hn:], errno)
	binary.BigEndian.PutUint16(m.hdr[m.hn+4:], uint16(len(msg)))
	m.hn += 6
	m.data = []byte(msg)
	c.reply(r, &m)
}

// errnoOf maps a device error onto the protocol's error numbers.
func errnoOf(err error) uint32 {
	var errno syscall.Errno
	switch {
	case errors.As(err, &errno):
		switch errno {
		case syscall.EPERM, syscall.EROFS, syscall.EACCES:
			return EPERM
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EOVERFLOW:
			return EOVERFLOW
		case syscall.ENOTSUP:
			return ENOTSUP
		case syscall.ESHUTDOWN:
			return ESHUTDOWN
		}
		return EIO
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return ESHUTDOWN
	}
	return EIO
}
