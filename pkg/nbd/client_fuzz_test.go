package nbd

// Fuzz targets for the client's parsers: the negotiation replies NewClient
// reads, and the transmission-phase replies (simple and structured) the
// reply reader parses. A hostile or broken server must never make the
// client panic, hang, or write outside a caller's buffer.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

// cfzMetaID is the id the scripted handshake assigns to base:allocation.
const cfzMetaID = 1

// cfzSize and cfzFlags describe the export of the scripted handshake.
const (
	cfzSize  = 1 << 20
	cfzFlags = FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn
)

// The requests FuzzClientReplies issues, in this order, each only after
// the server has read the previous one. The client assigns cookie
// gen<<32|slot with slots taken in order from an empty table, so the
// cookies are deterministic: generation 1, slots 0..3.
const (
	cfzCookieRead   = 1<<32 | 0 // ReadAt(4096 bytes at 0)
	cfzCookieStatus = 1<<32 | 1 // BlockStatus(0, 64 KiB)
	cfzCookieWrite  = 1<<32 | 2 // WriteAt(4096 bytes at 4096)
	cfzCookieFlush  = 1<<32 | 3 // Flush

	cfzReadLen   = 4096
	cfzStatusLen = 64 << 10
	cfzWriteOff  = 4096
)

// cfzTimeout bounds each client call; cfzHang is when the test gives up
// and reports a hang.
const (
	cfzTimeout = 2 * time.Second
	cfzHang    = 5 * time.Second
)

func cfzGreeting(hflags uint16) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdMagic)
	b = binary.BigEndian.AppendUint64(b, optMagic)
	return binary.BigEndian.AppendUint16(b, hflags)
}

func cfzOptReply(opt, typ uint32, data ...[]byte) []byte {
	var p []byte
	for _, d := range data {
		p = append(p, d...)
	}
	b := binary.BigEndian.AppendUint64(nil, optReplyMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
	return append(b, p...)
}

func cfzInfoExport(size uint64, flags uint16) []byte {
	b := binary.BigEndian.AppendUint16(nil, infoExport)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

func cfzInfoBlockSize(minBS, prefBS, maxBS uint32) []byte {
	b := binary.BigEndian.AppendUint16(nil, infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, minBS)
	b = binary.BigEndian.AppendUint32(b, prefBS)
	return binary.BigEndian.AppendUint32(b, maxBS)
}

func cfzInfoString(typ uint16, s string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, typ), s...)
}

func cfzCat(parts ...[]byte) []byte {
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

// cfzHandshake is a complete, valid server side of the negotiation the
// client performs with the default ClientConfig: structured replies,
// base:allocation as cfzMetaID, then NBD_OPT_GO for a cfzSize export.
func cfzHandshake() []byte {
	return cfzCat(
		cfzGreeting(flagFixedNewstyle|flagNoZeroes),
		cfzOptReply(optStructuredReply, repAck),
		cfzOptReply(optSetMetaContext, repMetaContext, clientBE32(cfzMetaID), []byte(AllocationContext)),
		cfzOptReply(optSetMetaContext, repAck),
		cfzOptReply(optGo, repInfo, cfzInfoExport(cfzSize, cfzFlags)),
		cfzOptReply(optGo, repInfo, cfzInfoBlockSize(1, 4096, 32<<20)),
		cfzOptReply(optGo, repInfo, cfzInfoString(infoName, "")),
		cfzOptReply(optGo, repInfo, cfzInfoString(infoDescription, "fuzz")),
		cfzOptReply(optGo, repAck),
	)
}

// cfzFinish waits for done or reports a hang.
func cfzFinish(t *testing.T, what string, done <-chan struct{}) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(cfzHang):
		buf := make([]byte, 1<<20)
		t.Fatalf("%s hung; goroutines:\n%s", what, buf[:runtime.Stack(buf, true)])
	}
}

// cfzHandshakeRun plays data as the server side of a negotiation: it
// writes data, discards whatever the client sends, and hangs up once data
// is written. NewClient must return either way.
func cfzHandshakeRun(t *testing.T, data []byte) {
	cli, srv := net.Pipe()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		srv.SetWriteDeadline(time.Now().Add(cfzHang))
		srv.Write(data) // fails once the client gives up: fine
		srv.Close()
	}()
	go func() {
		defer wg.Done()
		io.Copy(io.Discard, srv) // ends when either side closes
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), cfzTimeout)
		defer cancel()
		c, err := NewClient(ctx, cli, ClientConfig{})
		if err == nil {
			// A valid handshake: the client must be sane and closable.
			if c.minBS == 0 || c.maxReq == 0 || c.maxReq%c.minBS != 0 {
				t.Errorf("block sizes min=%d max request=%d", c.minBS, c.maxReq)
			}
			c.Close()
		}
	}()
	cfzFinish(t, "NewClient", done)
	wg2 := make(chan struct{})
	go func() { wg.Wait(); close(wg2) }()
	cfzFinish(t, "fake server", wg2)
}

func FuzzClientHandshake(f *testing.F) {
	nz := cfzGreeting(flagFixedNewstyle | flagNoZeroes)
	sr := cfzOptReply(optStructuredReply, repAck)
	meta := cfzCat(cfzOptReply(optSetMetaContext, repMetaContext, clientBE32(cfzMetaID), []byte(AllocationContext)),
		cfzOptReply(optSetMetaContext, repAck))
	goOK := cfzCat(cfzOptReply(optGo, repInfo, cfzInfoExport(cfzSize, cfzFlags)), cfzOptReply(optGo, repAck))
	exportName := cfzCat(clientBE64(cfzSize), []byte{0, FlagHasFlags | FlagReadOnly})

	// Valid negotiations.
	f.Add(cfzHandshake())
	f.Add(cfzCat(nz, sr, meta, goOK))
	// Structured replies refused: no meta context option is sent.
	f.Add(cfzCat(nz, cfzOptReply(optStructuredReply, repErrUnsup), goOK))
	// Meta contexts refused, carry on without.
	f.Add(cfzCat(nz, sr, cfzOptReply(optSetMetaContext, repErrUnsup, []byte("no")), goOK))
	// NBD_OPT_GO unsupported: EXPORT_NAME fallback, with and without zeroes.
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repErrUnsup), exportName))
	f.Add(cfzCat(cfzGreeting(flagFixedNewstyle), sr, meta, cfzOptReply(optGo, repErrUnsup), exportName, make([]byte, 124)))
	// Refusals.
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repErrPolicy, []byte("go away"))))
	f.Add(cfzCat(nz, cfzOptReply(optStructuredReply, repErrTLSReqd, []byte("tls please"))))
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repErrShutdown)))
	// Protocol violations.
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repInfo, cfzInfoBlockSize(3, 4096, 1<<20)), cfzOptReply(optGo, repAck)))
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repInfo, cfzInfoBlockSize(4096, 512, 1<<20)), goOK))
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repAck)))
	f.Add(cfzCat(nz, sr, cfzOptReply(optSetMetaContext, repMetaContext, clientBE32(1), []byte("a")),
		cfzOptReply(optSetMetaContext, repMetaContext, clientBE32(1), []byte("b"))))
	f.Add(cfzCat(nz, cfzOptReply(optGo, repAck)))
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repInfo, []byte{0, 0, 1})))
	f.Add(cfzCat(nz, sr, meta, cfzOptReply(optGo, repInfo, cfzInfoBlockSize(512, 4096, 32<<20)),
		cfzOptReply(optGo, repInfo, cfzInfoString(infoName, "canonical")), goOK))
	f.Add(cfzCat(cfzGreeting(0)))
	f.Add(cfzCat(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, nbdMagic), clientOldstyleMagic), make([]byte, 8+2+124)))
	f.Add([]byte("SSH-2.0-OpenSSH_9.6\r\n"))
	f.Add(nz[:10])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		cfzHandshakeRun(t, data)
	})
}

// cfzResults is what the client saw in one FuzzClientReplies run.
type cfzResults struct {
	read, status, write, flush error
	buf                        []byte
	extents                    [][3]uint64 // context id, length, status
}

// cfzRepliesRun negotiates with the scripted handshake, issues the four
// requests (cookies as in the cfzCookie constants), then plays data as the
// server's replies and hangs up. Nothing may panic or hang.
func cfzRepliesRun(t *testing.T, data []byte) cfzResults {
	cli, srv := net.Pipe()
	deadline := time.Now().Add(cfzHang)
	srv.SetDeadline(deadline)
	seen := make(chan uint64, 4) // cookies, as the server reads requests
	allRead := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // server writer
		defer wg.Done()
		defer srv.Close()
		if _, err := srv.Write(cfzHandshake()); err != nil {
			return
		}
		<-allRead // (the reader gives up by the connection deadline)
		srv.Write(data)
	}()
	go func() { // server reader
		defer wg.Done()
		ok := cfzReadRequests(srv, seen)
		close(seen)
		close(allRead)
		if ok {
			io.Copy(io.Discard, srv) // NBD_CMD_DISC, until the client hangs up
		}
	}()

	var res cfzResults
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), cfzTimeout)
		defer cancel()
		c, err := NewClient(ctx, cli, ClientConfig{})
		if err != nil {
			t.Errorf("scripted handshake failed: %v", err)
			return
		}
		defer c.Close()
		res.buf = bytes.Repeat([]byte{0xee}, cfzReadLen)
		payload := bytes.Repeat([]byte{0x5a}, 4096)
		var ops sync.WaitGroup
		for i, op := range []func(){
			func() { res.read = c.ReadAt(ctx, res.buf, 0) },
			func() {
				res.status = c.BlockStatus(ctx, 0, cfzStatusLen, 0, func(id uint32, n uint64, st uint32) {
					if n == 0 {
						t.Errorf("block status extent of length 0")
					}
					res.extents = append(res.extents, [3]uint64{uint64(id), n, uint64(st)})
				})
			},
			func() { res.write = c.WriteAt(ctx, payload, cfzWriteOff, 0) },
			func() { res.flush = c.Flush(ctx) },
		} {
			ops.Add(1)
			go func() { defer ops.Done(); op() }()
			// Issue the next request only once this one is on the wire,
			// so the cookies are assigned in a fixed order.
			if cookie, ok := <-seen; ok && cookie != 1<<32|uint64(i) {
				t.Errorf("request %d has cookie %#x, want %#x", i, cookie, 1<<32|uint64(i))
			}
		}
		ops.Wait()
	}()
	cfzFinish(t, "client requests", done)
	srvDone := make(chan struct{})
	go func() { wg.Wait(); close(srvDone) }()
	cfzFinish(t, "fake server", srvDone)
	return res
}

// cfzReadRequests reads the client's side of the scripted handshake (client
// flags, then three options: STRUCTURED_REPLY, SET_META_CONTEXT, GO) and
// then four requests, sending each request's cookie on seen.
func cfzReadRequests(srv net.Conn, seen chan<- uint64) bool {
	var fl [4]byte
	if _, err := io.ReadFull(srv, fl[:]); err != nil {
		return false
	}
	for range 3 {
		var h [16]byte
		if _, err := io.ReadFull(srv, h[:]); err != nil {
			return false
		}
		if _, err := io.CopyN(io.Discard, srv, int64(binary.BigEndian.Uint32(h[12:]))); err != nil {
			return false
		}
	}
	for range 4 {
		var h [requestHeaderSize]byte
		if _, err := io.ReadFull(srv, h[:]); err != nil {
			return false
		}
		if binary.BigEndian.Uint16(h[6:]) == CmdWrite {
			if _, err := io.CopyN(io.Discard, srv, int64(binary.BigEndian.Uint32(h[24:]))); err != nil {
				return false
			}
		}
		seen <- binary.BigEndian.Uint64(h[8:])
	}
	return true
}

func cfzSimple(cookie uint64, errno uint32, data ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, simpleMagic)
	b = binary.BigEndian.AppendUint32(b, errno)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return append(b, cfzCat(data...)...)
}

func cfzChunk(flags, typ uint16, cookie uint64, payload ...[]byte) []byte {
	p := cfzCat(payload...)
	b := binary.BigEndian.AppendUint32(nil, structuredMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint32(b, uint32(len(p)))
	return append(b, p...)
}

func cfzData(flags uint16, cookie, off uint64, data []byte) []byte {
	return cfzChunk(flags, replyTypeOffsetData, cookie, clientBE64(off), data)
}

func cfzHole(flags uint16, cookie, off uint64, n uint32) []byte {
	return cfzChunk(flags, replyTypeOffsetHole, cookie, clientBE64(off), clientBE32(n))
}

func cfzStatus(flags uint16, cookie uint64, id uint32, extents ...uint32) []byte {
	p := clientBE32(id)
	for _, e := range extents {
		p = append(p, clientBE32(e)...)
	}
	return cfzChunk(flags, replyTypeBlockStatus, cookie, p)
}

func cfzError(flags, typ uint16, cookie uint64, errno uint32, msg string, off *uint64) []byte {
	return cfzChunk(flags, typ, cookie, clientErrPayload(errno, msg, off))
}

func cfzNone(cookie uint64) []byte { return cfzChunk(replyFlagDone, replyTypeNone, cookie) }

// cfzValidReplies answers all four requests correctly; the read gets
// dataLen bytes of cfzPattern and a hole for the rest. (Seeds keep dataLen
// small: the fuzzer minimizes every new interesting input byte by byte,
// which for a 4 KiB input takes all of -fuzzminimizetime.)
func cfzValidReplies(dataLen int) []byte {
	read := cfzData(replyFlagDone, cfzCookieRead, 0, cfzPattern()[:dataLen])
	if dataLen < cfzReadLen {
		read = cfzCat(cfzData(0, cfzCookieRead, 0, cfzPattern()[:dataLen]),
			cfzHole(replyFlagDone, cfzCookieRead, uint64(dataLen), uint32(cfzReadLen-dataLen)))
	}
	return cfzCat(
		read,
		cfzStatus(replyFlagDone, cfzCookieStatus, cfzMetaID, 4096, 0, cfzStatusLen-4096, BlockStatusHole|BlockStatusZero),
		cfzSimple(cfzCookieWrite, 0),
		cfzSimple(cfzCookieFlush, 0),
	)
}

func cfzPattern() []byte {
	b := make([]byte, cfzReadLen)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	return b
}

func FuzzClientReplies(f *testing.F) {
	const (
		rd, bs, wr, fl = cfzCookieRead, cfzCookieStatus, cfzCookieWrite, cfzCookieFlush
		done           = replyFlagDone
	)
	pat := cfzPattern()[:64]
	off := uint64(100)
	// Well-formed traffic.
	f.Add(cfzValidReplies(len(pat)))
	// Out of order; the read as hole, data, hole; structured replies to
	// write and flush.
	f.Add(cfzCat(
		cfzNone(fl),
		cfzHole(0, rd, 0, 2048),
		cfzChunk(done, replyTypeNone, wr),
		cfzStatus(done, bs, cfzMetaID, 512, 0, 512, BlockStatusHole, 1<<20, BlockStatusHole|BlockStatusZero),
		cfzData(0, rd, 2048, pat),
		cfzHole(done, rd, 2048+64, cfzReadLen-2048-64),
	))
	// The read as one hole; chunks in reverse order and a NONE to end it.
	f.Add(cfzCat(cfzHole(done, rd, 0, cfzReadLen), cfzStatus(done, bs, cfzMetaID, cfzStatusLen, 0),
		cfzSimple(wr, 0), cfzSimple(fl, 0)))
	f.Add(cfzCat(cfzHole(0, rd, 64, cfzReadLen-64), cfzData(0, rd, 0, pat), cfzNone(rd),
		cfzSimple(fl, 0), cfzSimple(wr, 0), cfzStatus(done, bs, cfzMetaID, 1, 0)))
	// Error replies of every kind.
	f.Add(cfzCat(
		cfzError(done, replyTypeErrorOffset, rd, EIO, "bad sector", &off),
		cfzError(done, replyTypeError, bs, ENOTSUP, "no status", nil),
		cfzSimple(wr, ENOSPC),
		cfzError(done, replyTypeError, fl, ESHUTDOWN, "", nil),
	))
	f.Add(cfzCat(
		cfzData(0, rd, 0, pat),
		cfzError(0, replyTypeError, rd, EIO, "partial", nil),
		cfzNone(rd),
		cfzSimple(bs, EINVAL),
		cfzChunk(done, 1<<15|77, wr, clientErrPayload(EPERM, "new kind", nil), []byte("extra")),
		cfzSimple(fl, 1234),
	))
	// Protocol violations.
	f.Add(cfzSimple(rd+1<<40, 0))                                                     // unknown cookie
	f.Add(cfzSimple(rd, 0, pat))                                                      // simple reply with data despite structured
	f.Add(cfzData(done, rd, cfzReadLen-4, pat[:8]))                                   // data outside the request
	f.Add(cfzCat(cfzHole(0, rd, 0, cfzReadLen), cfzData(done, rd, 0, pat)))           // overlapping
	f.Add(cfzHole(done, rd, 0, cfzReadLen-1))                                         // partial coverage
	f.Add(cfzStatus(done, bs, cfzMetaID+1, 512, 0))                                   // unknown context
	f.Add(cfzStatus(done, bs, cfzMetaID, cfzStatusLen, 0, 512, 0))                    // past the request
	f.Add(cfzError(done, replyTypeErrorOffset, fl, EIO, "", &off))                    // offset for a flush
	f.Add(cfzCat(cfzChunk(0, replyTypeNone, rd), cfzSimple(wr, 0)))                   // NONE without DONE
	f.Add(cfzChunk(done, replyTypeOffsetData, rd, clientBE64(0)))                     // data chunk without data
	f.Add(cfzChunk(done, replyTypeOffsetData, rd, clientBE64(0), cfzPattern())[:100]) // truncated mid-payload
	f.Add([]byte("\xde\xad\xbe\xef garbage"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		cfzRepliesRun(t, data)
	})
}

// TestClientFuzzRepliesWellFormed checks the premise of FuzzClientReplies'
// seeds: with well-formed replies for the predicted cookies, every request
// succeeds with the data and extents sent.
func TestClientFuzzRepliesWellFormed(t *testing.T) {
	for _, dataLen := range []int{cfzReadLen, 64} {
		res := cfzRepliesRun(t, cfzValidReplies(dataLen))
		for _, err := range []error{res.read, res.status, res.write, res.flush} {
			if err != nil {
				t.Errorf("request failed: %v", err)
			}
		}
		want := append(cfzPattern()[:dataLen], make([]byte, cfzReadLen-dataLen)...)
		if !bytes.Equal(res.buf, want) {
			t.Errorf("read data differs (%d bytes of data)", dataLen)
		}
		wantExt := [][3]uint64{{cfzMetaID, 4096, 0}, {cfzMetaID, cfzStatusLen - 4096, BlockStatusHole | BlockStatusZero}}
		if len(res.extents) != len(wantExt) || res.extents[0] != wantExt[0] || res.extents[1] != wantExt[1] {
			t.Errorf("extents %v, want %v", res.extents, wantExt)
		}
	}
	// And with nothing but a hang-up, every request fails cleanly.
	res := cfzRepliesRun(t, nil)
	for _, err := range []error{res.read, res.status, res.write, res.flush} {
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("after hang-up: %v, want unexpected EOF", err)
		}
	}
}
