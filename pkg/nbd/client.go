package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

// ClientConfig selects what NewClient and Dial negotiate.
type ClientConfig struct {
	// ExportName is the export to attach to ("" is the default export).
	ExportName string
	// TLS, if non-nil, makes the client send NBD_OPT_STARTTLS before
	// anything else and fail if the server refuses.
	TLS *tls.Config
	// MetaContexts are requested with NBD_OPT_SET_META_CONTEXT when
	// structured replies are negotiated. nil means {"base:allocation"};
	// an empty non-nil slice requests none.
	MetaContexts []string
	// NoStructuredReplies skips NBD_OPT_STRUCTURED_REPLY, so the server
	// uses simple replies only (and BlockStatus is unavailable).
	NoStructuredReplies bool
}

const (
	// clientCloseWait bounds how long Close waits for in-flight requests.
	clientCloseWait = 5 * time.Second
	// clientDiscWait bounds the write of NBD_CMD_DISC.
	clientDiscWait = time.Second
	// clientReadBufSize is the reply reader's buffer.
	clientReadBufSize = 64 << 10
	// clientTLSCoalesce: over TLS, payloads up to this size are copied
	// behind the header so the request goes out as one record.
	clientTLSCoalesce = 64 << 10
)

// clientCancelGrace bounds how long a cancelled caller waits for the
// reader to finish copying a chunk into its buffer; after that the
// connection is considered stalled and is closed. (A variable for tests.)
var clientCancelGrace = 2 * time.Second

// Client is one NBD connection in the transmission phase. It is safe for
// concurrent use: any number of requests may be in flight at once; a
// dedicated goroutine receives replies and hands them to their callers.
type Client struct {
	raw  net.Conn // underlying connection (closed for a hard disconnect)
	conn net.Conn // raw, or the TLS connection on top of it
	br   *bufio.Reader
	tls  bool

	// Immutable after the handshake.
	size                 uint64
	flags                uint16
	minBS, prefBS, maxBS uint32
	maxReq               uint32 // READ/WRITE payload per request
	name, desc           string
	structured           bool
	metaNames            []string
	metaIDs              []uint32

	// Request writing: wsem is a one-slot semaphore (so waiting for it can
	// honour ctx); the fields below it belong to the holder.
	wsem   chan struct{}
	whdr   [requestHeaderSize]byte
	wvec   [2][]byte
	wbufs  net.Buffers
	wcoal  []byte
	wdlSet bool

	mu       sync.Mutex
	discSent bool // NBD_CMD_DISC sent (written holding both wsem and mu)
	slots    []clientSlot
	free     []uint32
	npending int
	err      error // sticky: the connection is unusable
	closing  bool  // Close was called
	shutdown bool  // the server replied ESHUTDOWN: no new requests
	idle     chan struct{}

	readerDone chan struct{}
	rbuf       [structuredHeaderSize]byte // reader goroutine only
}

type clientSlot struct {
	gen uint32
	r   *clientReq
}

// clientReq is the per-request state, pooled. Fields set before the
// request is registered are read-only until it completes; reader-owned
// fields are only touched by the reader goroutine until completion is
// signalled on done; abandoned/busy/busyWait are guarded by Client.mu.
type clientReq struct {
	done chan struct{} // capacity 1: exactly one completion signal

	cookie  uint64
	cmd     uint16
	flags   uint16
	off     uint64
	length  uint32
	buf     []byte // READ destination (len == length), or nil to discard
	payload []byte // WRITE payload

	// reader-owned
	err      error
	nchunks  int
	seen     uint64 // READ: bytes covered by data and hole chunks
	bs       []byte // BLOCK_STATUS: raw chunk payloads (context id + descriptors)
	bsCtxs   uint64 // bitmap of context indexes seen
	bsChunks int

	// guarded by Client.mu
	abandoned bool // the caller gave up; never signal, never touch buf
	busy      bool // the reader is copying into buf without the lock
	busyWait  bool // an abandoning caller waits for busy to clear
}

var clientReqPool = sync.Pool{New: func() any { return &clientReq{done: make(chan struct{}, 1)} }}

func clientGetReq() *clientReq { return clientReqPool.Get().(*clientReq) }

func clientPutReq(r *clientReq) {
	r.buf, r.payload, r.err = nil, nil, nil
	r.nchunks, r.seen, r.bsCtxs, r.bsChunks = 0, 0, 0, 0
	if cap(r.bs) > 64<<10 {
		r.bs = nil
	} else {
		r.bs = r.bs[:0]
	}
	clientReqPool.Put(r)
}

// NewClient performs the handshake over conn and returns a client in the
// transmission phase. It takes ownership of conn: Close closes it, and so
// does a failed handshake. ctx bounds the handshake only.
//
// Negotiation: fixed newstyle with NO_ZEROES, NBD_OPT_STARTTLS if cfg.TLS
// is set, NBD_OPT_STRUCTURED_REPLY (unless disabled),
// NBD_OPT_SET_META_CONTEXT, then NBD_OPT_GO asking for block sizes, the
// canonical name and the description; NBD_OPT_EXPORT_NAME is used if the
// server answers NBD_OPT_GO with NBD_REP_ERR_UNSUP.
func NewClient(ctx context.Context, conn net.Conn, cfg ClientConfig) (*Client, error) {
	n := &clientNeg{raw: conn, conn: conn}
	stop := clientWatchCtx(ctx, conn)
	res, err := n.handshake(ctx, cfg)
	stop()
	if err != nil {
		n.conn.Close()
		var oe *OptionError
		if cfg.TLS == nil && errors.As(err, &oe) && oe.Reply == repErrTLSReqd {
			err = fmt.Errorf("%w (the server requires TLS: set ClientConfig.TLS or use an nbds:// URI)", err)
		}
		return nil, clientCtxErr(ctx, err)
	}
	c := &Client{
		raw:        conn,
		conn:       n.conn,
		br:         bufio.NewReaderSize(n.conn, clientReadBufSize),
		tls:        n.tls,
		size:       res.size,
		flags:      res.flags,
		minBS:      res.minBS,
		prefBS:     res.prefBS,
		maxBS:      res.maxBS,
		name:       res.name,
		desc:       res.desc,
		structured: res.structured,
		metaNames:  res.metaNames,
		metaIDs:    res.metaIDs,
		wsem:       make(chan struct{}, 1),
		idle:       make(chan struct{}, 1),
		readerDone: make(chan struct{}),
	}
	c.maxReq = min(c.maxBS, DefaultMaxPayload)
	c.maxReq -= c.maxReq % c.minBS
	go c.readLoop()
	return c, nil
}

// Size is the export size in bytes.
func (c *Client) Size() uint64 { return c.size }

// Flags are the transmission flags (FlagReadOnly, FlagCanMultiConn, ...).
func (c *Client) Flags() uint16 { return c.flags }

// BlockSize returns the server's size constraints (defaults 1, 4096 and
// 32 MiB if it did not advertise any). Reads and writes are split into
// requests of at most min(max, 32 MiB) bytes.
func (c *Client) BlockSize() (min, preferred, max uint32) { return c.minBS, c.prefBS, c.maxBS }

// ExportName is the export's canonical name as reported by the server
// (NBD_INFO_NAME), or the requested name.
func (c *Client) ExportName() string { return c.name }

// Description is the export description (NBD_INFO_DESCRIPTION), if any.
func (c *Client) Description() string { return c.desc }

// StructuredReplies reports whether structured replies were negotiated.
func (c *Client) StructuredReplies() bool { return c.structured }

// MetaContext returns the id the server assigned to a negotiated meta
// context, as passed to BlockStatus callbacks.
func (c *Client) MetaContext(name string) (id uint32, ok bool) {
	for i, n := range c.metaNames {
		if n == name {
			return c.metaIDs[i], true
		}
	}
	return 0, false
}

func (c *Client) metaIndex(id uint32) int {
	for i, v := range c.metaIDs {
		if v == id {
			return i
		}
	}
	return -1
}

// ---- request lifecycle ----

// admitErr says why no new request may be sent. Caller holds c.mu.
func (c *Client) admitErr() error {
	switch {
	case c.err != nil:
		return c.err
	case c.closing:
		return ErrClientClosed
	case c.shutdown:
		return fmt.Errorf("nbd: server is shutting down: %w", syscall.ESHUTDOWN)
	}
	return nil
}

// register assigns r a cookie: slot index in the low half, the slot's
// generation in the high half. Caller holds c.mu.
func (c *Client) register(r *clientReq) {
	var idx uint32
	if n := len(c.free); n > 0 {
		idx = c.free[n-1]
		c.free = c.free[:n-1]
	} else {
		idx = uint32(len(c.slots))
		c.slots = append(c.slots, clientSlot{})
	}
	s := &c.slots[idx]
	s.gen++
	s.r = r
	r.cookie = uint64(s.gen)<<32 | uint64(idx)
	r.abandoned, r.busy, r.busyWait = false, false, false
	c.npending++
}

// lookup finds the pending request for cookie. Caller holds c.mu.
func (c *Client) lookup(cookie uint64) *clientReq {
	idx := uint32(cookie)
	if uint64(idx) >= uint64(len(c.slots)) {
		return nil
	}
	s := &c.slots[idx]
	if s.r == nil || uint64(s.gen) != cookie>>32 {
		return nil
	}
	return s.r
}

// unregister removes r from the table. Caller holds c.mu.
func (c *Client) unregister(r *clientReq) {
	idx := uint32(r.cookie)
	c.slots[idx].r = nil
	c.free = append(c.free, idx)
	c.npending--
	if c.npending == 0 {
		if c.closing {
			select {
			case c.idle <- struct{}{}:
			default:
			}
		} else if c.shutdown && !c.discSent && c.err == nil {
			go c.sendDisc()
		}
	}
}

// complete finishes r: removes it and wakes its caller (unless the caller
// abandoned it). Caller holds c.mu.
func (c *Client) complete(r *clientReq) {
	c.unregister(r)
	if !r.abandoned {
		r.done <- struct{}{}
	}
}

// fail marks the connection broken and closes it (a hard disconnect); the
// reader then fails every pending request with err.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.raw.Close()
}

// errClientNotSent: the request could not be written and nothing of it
// reached the wire, so the connection is still good.
var errClientNotSent = errors.New("nbd: request not sent")

// start registers r and sends it. If it returns nil, the caller must call
// wait (a failed send fails the connection, which completes r).
func (c *Client) start(ctx context.Context, r *clientReq) error {
	select {
	case c.wsem <- struct{}{}:
	default:
		select {
		case c.wsem <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := ctx.Err(); err != nil {
		<-c.wsem
		return err
	}
	c.mu.Lock()
	if err := c.admitErr(); err != nil {
		c.mu.Unlock()
		<-c.wsem
		return err
	}
	c.register(r)
	c.mu.Unlock()
	err := c.writeReq(ctx, r)
	<-c.wsem
	if err == errClientNotSent {
		c.mu.Lock()
		if c.lookup(r.cookie) == r {
			c.unregister(r)
			c.mu.Unlock()
			return context.DeadlineExceeded // ctx.Err() may lag the deadline
		}
		c.mu.Unlock()
		// Already swept by a connection failure: wait collects that.
		return nil
	}
	if err != nil {
		c.fail(err)
	}
	return nil
}

// writeReq writes r's header and payload. The caller holds wsem.
//
// A caller's deadline bounds a write stuck on a server that stopped
// reading: on a plain connection, if nothing was written by the deadline
// the request is simply not sent (errClientNotSent); if part of it was,
// the rest gets clientCancelGrace more before the connection is declared
// stalled. A timed-out write breaks a TLS connection for good, so there
// the deadline is extended by clientCancelGrace up front.
func (c *Client) writeReq(ctx context.Context, r *clientReq) error {
	h := c.whdr[:]
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[4:], r.flags)
	binary.BigEndian.PutUint16(h[6:], r.cmd)
	binary.BigEndian.PutUint64(h[8:], r.cookie)
	binary.BigEndian.PutUint64(h[16:], r.off)
	binary.BigEndian.PutUint32(h[24:], r.length)

	dl, hasDL := ctx.Deadline()
	if hasDL {
		if c.tls {
			c.conn.SetWriteDeadline(dl.Add(clientCancelGrace))
		} else {
			c.conn.SetWriteDeadline(dl)
		}
		c.wdlSet = true
	} else if c.wdlSet {
		c.conn.SetWriteDeadline(time.Time{})
		c.wdlSet = false
	}

	var n int64
	var err error
	var whole []byte // the request as one buffer, if it was sent as one
	switch {
	case len(r.payload) == 0:
		whole = h
	case c.tls && len(r.payload) <= clientTLSCoalesce:
		if c.wcoal == nil {
			c.wcoal = make([]byte, 0, requestHeaderSize+clientTLSCoalesce)
		}
		whole = append(append(c.wcoal[:0], h...), r.payload...)
	}
	if whole != nil {
		var m int
		m, err = c.conn.Write(whole)
		n = int64(m)
	} else {
		c.wvec[0], c.wvec[1] = h, r.payload
		c.wbufs = c.wvec[:]
		n, err = c.wbufs.WriteTo(c.conn)
		c.wvec[0], c.wvec[1] = nil, nil
		c.wbufs = nil
	}
	if err == nil {
		return nil
	}
	name := clientCmdName(uint32(r.cmd))
	var ne net.Error
	if c.tls || !hasDL || !errors.As(err, &ne) || !ne.Timeout() || time.Now().Before(dl) {
		return clientIOErr("sending "+name, err)
	}
	if n == 0 {
		return errClientNotSent
	}
	// Partly written: finish it, or the stream is out of sync.
	c.conn.SetWriteDeadline(time.Now().Add(clientCancelGrace))
	if whole != nil {
		_, err = c.conn.Write(whole[n:])
	} else if n < int64(len(h)) {
		c.wvec[0], c.wvec[1] = h[n:], r.payload
		c.wbufs = c.wvec[:]
		_, err = c.wbufs.WriteTo(c.conn)
		c.wvec[0], c.wvec[1] = nil, nil
		c.wbufs = nil
	} else {
		_, err = c.conn.Write(r.payload[n-int64(len(h)):])
	}
	if err != nil {
		return fmt.Errorf("nbd: sending %s: server stopped reading: %w", name, err)
	}
	return nil // sent late; wait will see ctx done and abandon it
}

// wait waits for r to complete or ctx to be done. If reuse is true the
// caller owns r again (and should return it to the pool after reading
// any results); otherwise r was abandoned to the reader.
func (c *Client) wait(ctx context.Context, r *clientReq) (err error, reuse bool) {
	select {
	case <-r.done:
		return r.err, true
	case <-ctx.Done():
	}
	c.mu.Lock()
	if c.lookup(r.cookie) != r {
		// Completed concurrently: the signal is (or will be) there.
		c.mu.Unlock()
		<-r.done
		return r.err, true
	}
	r.abandoned = true
	if !r.busy {
		c.mu.Unlock()
		return ctx.Err(), false
	}
	// The reader is copying into our buffer right now; it will not
	// touch it after this chunk, but we must not return before then.
	r.busyWait = true
	c.mu.Unlock()
	t := time.NewTimer(clientCancelGrace)
	select {
	case <-r.done:
	case <-t.C:
		c.fail(fmt.Errorf("nbd: connection stalled mid-reply (closed after a cancelled %s): %w",
			clientCmdName(uint32(r.cmd)), io.ErrUnexpectedEOF))
		<-r.done
	}
	t.Stop()
	return ctx.Err(), false
}

// do runs one request to completion.
func (c *Client) do(ctx context.Context, r *clientReq) error {
	if err := c.start(ctx, r); err != nil {
		clientPutReq(r)
		return err
	}
	err, reuse := c.wait(ctx, r)
	if reuse {
		clientPutReq(r)
	}
	return err
}

// ---- shutdown ----

// sendDisc sends NBD_CMD_DISC (once).
func (c *Client) sendDisc() {
	t := time.NewTimer(clientDiscWait)
	defer t.Stop()
	select {
	case c.wsem <- struct{}{}:
	case <-t.C:
		return
	}
	defer func() { <-c.wsem }()
	if c.discSent {
		return
	}
	c.mu.Lock()
	c.discSent = true
	dead := c.err != nil
	if !dead && c.shutdown && !c.closing {
		c.err = fmt.Errorf("nbd: server is shutting down (soft disconnect sent): %w", syscall.ESHUTDOWN)
	}
	c.mu.Unlock()
	if dead {
		return
	}
	h := c.whdr[:]
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[4:], 0)
	binary.BigEndian.PutUint16(h[6:], CmdDisc)
	binary.BigEndian.PutUint64(h[8:], 0)
	binary.BigEndian.PutUint64(h[16:], 0)
	binary.BigEndian.PutUint32(h[24:], 0)
	c.conn.SetWriteDeadline(time.Now().Add(clientDiscWait))
	c.wdlSet = true
	c.conn.Write(h)
}

// Close waits (up to a few seconds) for in-flight requests, sends
// NBD_CMD_DISC and closes the connection. Requests still pending after
// the wait, and all later ones, fail with ErrClientClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closing {
		c.mu.Unlock()
		<-c.readerDone
		return nil
	}
	c.closing = true
	pending := c.npending
	c.mu.Unlock()
	if pending > 0 {
		t := time.NewTimer(clientCloseWait)
		select {
		case <-c.idle:
		case <-c.readerDone:
		case <-t.C:
		}
		t.Stop()
	}
	c.sendDisc()
	c.mu.Lock()
	if c.err == nil {
		c.err = ErrClientClosed
	}
	c.mu.Unlock()
	c.conn.Close() // for TLS: close_notify, then the socket
	c.raw.Close()
	<-c.readerDone
	return nil
}

// ---- reply reader ----

func (c *Client) readLoop() {
	err := c.readReplies()
	c.fail(err)
	c.mu.Lock()
	for i := range c.slots {
		s := &c.slots[i]
		if r := s.r; r != nil {
			s.r = nil
			if !r.abandoned {
				r.err = c.err
				r.done <- struct{}{}
			}
		}
	}
	c.slots, c.free, c.npending = nil, nil, 0
	select {
	case c.idle <- struct{}{}:
	default:
	}
	c.mu.Unlock()
	close(c.readerDone)
}

func (c *Client) readErr(err error) error {
	if err == io.EOF {
		return fmt.Errorf("nbd: connection closed by server: %w", io.ErrUnexpectedEOF)
	}
	return clientIOErr("reading reply", err)
}

func (c *Client) readReplies() error {
	h := c.rbuf[:]
	for {
		if _, err := io.ReadFull(c.br, h[:4]); err != nil {
			return c.readErr(err)
		}
		var err error
		switch m := binary.BigEndian.Uint32(h[:4]); m {
		case simpleMagic:
			if _, err := io.ReadFull(c.br, h[4:simpleReplySize]); err != nil {
				return c.readErr(err)
			}
			err = c.handleSimple(binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:]))
		case structuredMagic:
			if _, err := io.ReadFull(c.br, h[4:structuredHeaderSize]); err != nil {
				return c.readErr(err)
			}
			if !c.structured {
				return clientProtoErr("structured reply chunk, but structured replies were not negotiated")
			}
			err = c.handleChunk(binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]),
				binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[16:]))
		default:
			return clientProtoErr("bad reply magic %#x", m)
		}
		if err != nil {
			return err
		}
	}
}

// pending looks up the request a reply is for.
func (c *Client) pending(cookie uint64) (*clientReq, error) {
	c.mu.Lock()
	r := c.lookup(cookie)
	c.mu.Unlock()
	if r == nil {
		return nil, clientProtoErr("reply for unknown cookie %#x", cookie)
	}
	return r, nil
}

// recv delivers n payload bytes for r at offset at of its buffer: read
// from the connection (data) or zero-filled (hole, zero==true). Data for
// an abandoned request, or one without a buffer, is discarded.
func (c *Client) recv(r *clientReq, at uint64, n uint32, zero bool) error {
	c.mu.Lock()
	var dst []byte
	if !r.abandoned && r.buf != nil {
		dst = r.buf[at : at+uint64(n)]
		r.busy = true
	}
	c.mu.Unlock()
	var err error
	if dst == nil {
		if !zero {
			_, err = c.br.Discard(int(n))
		}
	} else {
		if zero {
			clear(dst)
		} else {
			_, err = io.ReadFull(c.br, dst)
		}
		c.mu.Lock()
		r.busy = false
		if r.busyWait {
			r.busyWait = false
			r.done <- struct{}{}
		}
		c.mu.Unlock()
	}
	if err != nil {
		return c.readErr(err)
	}
	return nil
}

func (c *Client) setErr(r *clientReq, errno uint32, msg string) {
	if errno == ESHUTDOWN {
		c.mu.Lock()
		c.shutdown = true
		c.mu.Unlock()
	}
	if r.err == nil {
		r.err = &Error{Cmd: uint32(r.cmd), Errno: errno, Message: msg}
	}
}

func (c *Client) handleSimple(errno uint32, cookie uint64) error {
	r, err := c.pending(cookie)
	if err != nil {
		return err
	}
	if r.nchunks > 0 {
		return clientProtoErr("simple reply for cookie %#x after structured chunks", cookie)
	}
	if errno != 0 {
		c.setErr(r, errno, "")
	} else if r.cmd == CmdBlockStatus {
		return clientProtoErr("simple reply to NBD_CMD_BLOCK_STATUS without an error")
	} else if r.cmd == CmdRead {
		if c.structured {
			return clientProtoErr("simple reply with data to NBD_CMD_READ although structured replies were negotiated")
		}
		if err := c.recv(r, 0, r.length, false); err != nil {
			return err
		}
	}
	c.mu.Lock()
	c.complete(r)
	c.mu.Unlock()
	return nil
}

// inRange reports whether [off, off+n) lies within r's request.
func (r *clientReq) inRange(off, n uint64) bool {
	return off >= r.off && off-r.off <= uint64(r.length) && n <= uint64(r.length)-(off-r.off)
}

func (c *Client) handleChunk(flags, typ uint16, cookie uint64, length uint32) error {
	r, err := c.pending(cookie)
	if err != nil {
		return err
	}
	r.nchunks++
	name := clientCmdName(uint32(r.cmd))
	b := c.rbuf[:] // the header has been decoded already
	switch typ {
	case replyTypeNone:
		if length != 0 || flags&replyFlagDone == 0 {
			return clientProtoErr("NBD_REPLY_TYPE_NONE with length %d, flags %#x", length, flags)
		}
	case replyTypeOffsetData:
		if r.cmd != CmdRead {
			return clientProtoErr("NBD_REPLY_TYPE_OFFSET_DATA in reply to %s", name)
		}
		if length < 9 {
			return clientProtoErr("NBD_REPLY_TYPE_OFFSET_DATA with length %d", length)
		}
		if _, err := io.ReadFull(c.br, b[:8]); err != nil {
			return c.readErr(err)
		}
		off, n := binary.BigEndian.Uint64(b[:]), length-8
		if !r.inRange(off, uint64(n)) {
			return clientProtoErr("data chunk [%d,+%d) outside read request [%d,+%d)", off, n, r.off, r.length)
		}
		if r.seen += uint64(n); r.seen > uint64(r.length) {
			return clientProtoErr("overlapping data chunks in reply to NBD_CMD_READ")
		}
		if err := c.recv(r, off-r.off, n, false); err != nil {
			return err
		}
	case replyTypeOffsetHole:
		if r.cmd != CmdRead {
			return clientProtoErr("NBD_REPLY_TYPE_OFFSET_HOLE in reply to %s", name)
		}
		if length != 12 {
			return clientProtoErr("NBD_REPLY_TYPE_OFFSET_HOLE with length %d", length)
		}
		if _, err := io.ReadFull(c.br, b[:12]); err != nil {
			return c.readErr(err)
		}
		off, n := binary.BigEndian.Uint64(b[:]), binary.BigEndian.Uint32(b[8:])
		if n == 0 || !r.inRange(off, uint64(n)) {
			return clientProtoErr("hole chunk [%d,+%d) outside read request [%d,+%d)", off, n, r.off, r.length)
		}
		if r.seen += uint64(n); r.seen > uint64(r.length) {
			return clientProtoErr("overlapping data chunks in reply to NBD_CMD_READ")
		}
		if err := c.recv(r, off-r.off, n, true); err != nil {
			return err
		}
	case replyTypeBlockStatus:
		if err := c.blockStatusChunk(r, length); err != nil {
			return err
		}
	default:
		if typ&(1<<15) == 0 {
			return clientProtoErr("unknown structured reply type %d in reply to %s", typ, name)
		}
		if err := c.errorChunk(r, typ, length); err != nil {
			return err
		}
	}
	if flags&replyFlagDone == 0 {
		return nil
	}
	if r.err == nil {
		switch r.cmd {
		case CmdRead:
			if r.seen != uint64(r.length) {
				return clientProtoErr("reply to NBD_CMD_READ covered %d of %d bytes", r.seen, r.length)
			}
		case CmdBlockStatus:
			if r.bsChunks != len(c.metaIDs) {
				return clientProtoErr("reply to NBD_CMD_BLOCK_STATUS has %d status chunks for %d meta contexts", r.bsChunks, len(c.metaIDs))
			}
		}
	}
	c.mu.Lock()
	c.complete(r)
	c.mu.Unlock()
	return nil
}

func (c *Client) blockStatusChunk(r *clientReq, length uint32) error {
	if r.cmd != CmdBlockStatus {
		return clientProtoErr("NBD_REPLY_TYPE_BLOCK_STATUS in reply to %s", clientCmdName(uint32(r.cmd)))
	}
	if length < 12 || (length-4)%8 != 0 {
		return clientProtoErr("NBD_REPLY_TYPE_BLOCK_STATUS with length %d", length)
	}
	if len(r.bs)+int(length)+4 > clientMaxReplyAlloc {
		return clientProtoErr("block status reply larger than %d bytes", clientMaxReplyAlloc)
	}
	if r.flags&CmdFlagReqOne != 0 && length != 12 {
		return clientProtoErr("block status chunk with %d descriptors despite NBD_CMD_FLAG_REQ_ONE", (length-4)/8)
	}
	start := len(r.bs)
	r.bs = append(r.bs, make([]byte, 4+length)...)
	chunk := r.bs[start:]
	binary.BigEndian.PutUint32(chunk, length)
	if _, err := io.ReadFull(c.br, chunk[4:]); err != nil {
		return c.readErr(err)
	}
	id := binary.BigEndian.Uint32(chunk[4:])
	i := c.metaIndex(id)
	if i < 0 {
		return clientProtoErr("block status for unknown meta context id %d", id)
	}
	if i < 64 {
		if r.bsCtxs&(1<<i) != 0 {
			return clientProtoErr("two block status chunks for meta context id %d", id)
		}
		r.bsCtxs |= 1 << i
	}
	r.bsChunks++
	var sum uint64
	for d := chunk[8:]; len(d) > 0; d = d[8:] {
		n := binary.BigEndian.Uint32(d)
		if n == 0 {
			return clientProtoErr("block status descriptor of length 0")
		}
		if r.length > 0 && sum >= uint64(r.length) {
			return clientProtoErr("block status descriptors continue past the requested length %d", r.length)
		}
		sum += uint64(n)
	}
	if r.flags&CmdFlagReqOne != 0 && sum > uint64(r.length) {
		return clientProtoErr("block status extent of %d bytes exceeds NBD_CMD_FLAG_REQ_ONE request of %d", sum, r.length)
	}
	return nil
}

func (c *Client) errorChunk(r *clientReq, typ uint16, length uint32) error {
	if length < 6 || length > clientMaxErrorChunk {
		return clientProtoErr("error chunk type %d with length %d", typ, length)
	}
	p := make([]byte, length)
	if _, err := io.ReadFull(c.br, p); err != nil {
		return c.readErr(err)
	}
	errno := binary.BigEndian.Uint32(p)
	ml := uint32(binary.BigEndian.Uint16(p[4:]))
	if ml > length-6 {
		return clientProtoErr("error chunk message length %d exceeds chunk length %d", ml, length)
	}
	if errno == 0 {
		return clientProtoErr("error chunk with error value 0")
	}
	msg := string(p[6 : 6+ml])
	switch typ {
	case replyTypeError:
		if length != 6+ml {
			return clientProtoErr("NBD_REPLY_TYPE_ERROR with length %d for message length %d", length, ml)
		}
	case replyTypeErrorOffset:
		if length != 14+ml {
			return clientProtoErr("NBD_REPLY_TYPE_ERROR_OFFSET with length %d for message length %d", length, ml)
		}
		if r.cmd == CmdFlush || r.cmd == CmdDisc {
			return clientProtoErr("NBD_REPLY_TYPE_ERROR_OFFSET in reply to %s", clientCmdName(uint32(r.cmd)))
		}
		off := binary.BigEndian.Uint64(p[6+ml:])
		if !r.inRange(off, 1) {
			return clientProtoErr("error offset %d outside request [%d,+%d)", off, r.off, r.length)
		}
		if msg == "" {
			msg = fmt.Sprintf("at offset %d", off)
		} else {
			msg = fmt.Sprintf("%s (at offset %d)", msg, off)
		}
	}
	c.setErr(r, errno, msg)
	return nil
}
