package nbd

// Tests of the client against a scripted in-process server, for replies
// real servers never send: reordering, holes, and protocol violations.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

type clientFake struct {
	structured bool // accept NBD_OPT_STRUCTURED_REPLY
	goUnsup    bool // answer NBD_OPT_GO with NBD_REP_ERR_UNSUP
	goErr      uint32
	noZeroes   bool // advertise NO_ZEROES
	size       uint64
	flags      uint16
	// greeting, if set, replaces the whole handshake.
	greeting []byte
}

type clientFakeConn struct {
	t    testing.TB
	conn net.Conn
	mu   sync.Mutex
}

type clientFakeReq struct {
	flags, cmd uint16
	cookie     uint64
	off        uint64
	length     uint32
	payload    []byte
}

func (s *clientFakeConn) readReq() (clientFakeReq, error) {
	var h [28]byte
	if _, err := io.ReadFull(s.conn, h[:]); err != nil {
		return clientFakeReq{}, err
	}
	if binary.BigEndian.Uint32(h[:]) != requestMagic {
		s.t.Errorf("fake server: bad request magic")
	}
	r := clientFakeReq{
		flags:  binary.BigEndian.Uint16(h[4:]),
		cmd:    binary.BigEndian.Uint16(h[6:]),
		cookie: binary.BigEndian.Uint64(h[8:]),
		off:    binary.BigEndian.Uint64(h[16:]),
		length: binary.BigEndian.Uint32(h[24:]),
	}
	if r.cmd == CmdWrite {
		r.payload = make([]byte, r.length)
		if _, err := io.ReadFull(s.conn, r.payload); err != nil {
			return r, err
		}
	}
	return r, nil
}

func (s *clientFakeConn) mustReadReq() clientFakeReq {
	r, err := s.readReq()
	if err != nil {
		s.t.Errorf("fake server: reading request: %v", err)
	}
	return r
}

func (s *clientFakeConn) write(b ...[]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range b {
		s.conn.Write(p) // errors: the client hung up, as it may
	}
}

func (s *clientFakeConn) simple(cookie uint64, errno uint32, data []byte) {
	h := make([]byte, 16)
	binary.BigEndian.PutUint32(h, simpleMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], cookie)
	s.write(h, data)
}

func (s *clientFakeConn) chunk(flags, typ uint16, cookie uint64, payload ...[]byte) {
	n := 0
	for _, p := range payload {
		n += len(p)
	}
	s.chunkLen(flags, typ, cookie, uint32(n), payload...)
}

func (s *clientFakeConn) chunkLen(flags, typ uint16, cookie uint64, length uint32, payload ...[]byte) {
	h := make([]byte, 20)
	binary.BigEndian.PutUint32(h, structuredMagic)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint32(h[16:], length)
	s.write(append([][]byte{h}, payload...)...)
}

func clientBE64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
func clientBE32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func clientErrPayload(errno uint32, msg string, off *uint64) []byte {
	p := binary.BigEndian.AppendUint32(nil, errno)
	p = binary.BigEndian.AppendUint16(p, uint16(len(msg)))
	p = append(p, msg...)
	if off != nil {
		p = binary.BigEndian.AppendUint64(p, *off)
	}
	return p
}

func (s *clientFakeConn) optReply(opt, typ uint32, data []byte) {
	h := make([]byte, 20)
	binary.BigEndian.PutUint64(h, optReplyMagic)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	s.write(h, data)
}

// handshake plays the server side of negotiation; false if the client
// went away or the script ends the session.
func (s *clientFakeConn) handshake(f clientFake) bool {
	if f.greeting != nil {
		s.write(f.greeting)
		return false
	}
	g := binary.BigEndian.AppendUint64(nil, nbdMagic)
	g = binary.BigEndian.AppendUint64(g, optMagic)
	hflags := uint16(flagFixedNewstyle)
	if f.noZeroes {
		hflags |= flagNoZeroes
	}
	g = binary.BigEndian.AppendUint16(g, hflags)
	s.write(g)
	var cf [4]byte
	if _, err := io.ReadFull(s.conn, cf[:]); err != nil {
		return false
	}
	for {
		var h [16]byte
		if _, err := io.ReadFull(s.conn, h[:]); err != nil {
			return false
		}
		opt := binary.BigEndian.Uint32(h[8:])
		data := make([]byte, binary.BigEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(s.conn, data); err != nil {
			return false
		}
		switch opt {
		case optStructuredReply:
			if f.structured {
				s.optReply(opt, repAck, nil)
			} else {
				s.optReply(opt, repErrUnsup, nil)
			}
		case optSetMetaContext:
			s.optReply(opt, repMetaContext, append(clientBE32(7), AllocationContext...))
			s.optReply(opt, repAck, nil)
		case optGo:
			switch {
			case f.goUnsup:
				s.optReply(opt, repErrUnsup, nil)
				continue
			case f.goErr != 0:
				s.optReply(opt, f.goErr, []byte("go away"))
				continue
			}
			info := binary.BigEndian.AppendUint16(nil, infoExport)
			info = binary.BigEndian.AppendUint64(info, f.size)
			info = binary.BigEndian.AppendUint16(info, f.flags)
			s.optReply(opt, repInfo, info)
			s.optReply(opt, repAck, nil)
			return true
		case optExportName:
			b := binary.BigEndian.AppendUint64(nil, f.size)
			b = binary.BigEndian.AppendUint16(b, f.flags)
			if !f.noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			s.write(b)
			return true
		case optAbort:
			s.optReply(opt, repAck, nil)
			return false
		default:
			s.optReply(opt, repErrUnsup, nil)
		}
	}
}

// clientFakeServe starts a fake server running script after the
// handshake and returns a connected client (or the handshake error).
func clientFakeServe(t *testing.T, f clientFake, script func(s *clientFakeConn)) (*Client, error) {
	t.Helper()
	if f.size == 0 {
		f.size = 1 << 20
	}
	if f.flags == 0 {
		f.flags = FlagHasFlags | FlagSendFlush
	}
	sock := filepath.Join(clientShortTempDir(t), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		conn, err := l.Accept()
		l.Close()
		if err != nil {
			return
		}
		defer conn.Close()
		s := &clientFakeConn{t: t, conn: conn}
		if s.handshake(f) && script != nil {
			script(s)
		}
	}()
	t.Cleanup(func() {
		l.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("fake server script did not finish")
		}
	})
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewClient(clientCtx(t, 5*time.Second), conn, ClientConfig{})
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func TestClientFakeReorderedChunks(t *testing.T) {
	want := clientRandBytes(8192, 9)
	c, err := clientFakeServe(t, clientFake{structured: true}, func(s *clientFakeConn) {
		reqs := map[uint64]clientFakeReq{}
		for range 3 {
			r := s.mustReadReq()
			reqs[r.off] = r
		}
		a, b, cc := reqs[0], reqs[1<<16], reqs[1<<17]
		// c: second half first, interleaved with everything else.
		s.chunk(0, replyTypeOffsetData, cc.cookie, clientBE64(cc.off+4096), want[4096:])
		s.chunk(0, replyTypeOffsetHole, a.cookie, clientBE64(a.off), clientBE32(4096))
		off := b.off + 100
		s.chunk(0, replyTypeErrorOffset, b.cookie, clientErrPayload(EIO, "disk on fire", &off))
		s.chunk(0, replyTypeOffsetData, cc.cookie, clientBE64(cc.off), want[:4096])
		s.chunk(replyFlagDone, replyTypeNone, b.cookie)
		s.chunk(replyFlagDone, replyTypeOffsetHole, a.cookie, clientBE64(a.off+4096), clientBE32(4096))
		s.chunk(replyFlagDone, replyTypeNone, cc.cookie)
		r := s.mustReadReq() // Flush: simple reply is fine with structured replies.
		s.simple(r.cookie, 0, nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := clientCtx(t, 5*time.Second)
	bufs := [3][]byte{bytes.Repeat([]byte{0xff}, 8192), make([]byte, 8192), make([]byte, 8192)}
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range bufs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.ReadAt(ctx, bufs[i], uint64(i)<<16) }()
	}
	wg.Wait()
	if errs[0] != nil || !bytes.Equal(bufs[0], make([]byte, 8192)) {
		t.Errorf("hole read: %v, zeroed=%v", errs[0], bytes.Equal(bufs[0], make([]byte, 8192)))
	}
	if !errors.Is(errs[1], syscall.EIO) || !strings.Contains(errs[1].Error(), "disk on fire (at offset 65636)") {
		t.Errorf("error-offset read: %v", errs[1])
	}
	if errs[2] != nil || !bytes.Equal(bufs[2], want) {
		t.Errorf("reordered data read: %v, equal=%v", errs[2], bytes.Equal(bufs[2], want))
	}
	if err := c.Flush(ctx); err != nil {
		t.Errorf("Flush: %v", err)
	}
}

func TestClientFakeUnknownErrorChunk(t *testing.T) {
	c, err := clientFakeServe(t, clientFake{structured: true}, func(s *clientFakeConn) {
		r := s.mustReadReq()
		s.chunk(replyFlagDone, 1<<15|77, r.cookie, clientErrPayload(ENOSPC, "new kind", nil), []byte("extra"))
		r = s.mustReadReq()
		s.chunk(replyFlagDone, replyTypeError, r.cookie, clientErrPayload(1234, "", nil))
		r = s.mustReadReq()
		s.simple(r.cookie, 0, nil)
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := clientCtx(t, 5*time.Second)
	if err := c.Flush(ctx); !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "new kind") {
		t.Errorf("unknown error chunk: %v", err)
	}
	if err := c.Flush(ctx); !errors.Is(err, syscall.EIO) {
		t.Errorf("unknown errno: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Errorf("connection unusable after error chunks: %v", err)
	}
}

func TestClientFakeSimpleReordered(t *testing.T) {
	c, err := clientFakeServe(t, clientFake{}, func(s *clientFakeConn) {
		a, b := s.mustReadReq(), s.mustReadReq()
		s.simple(b.cookie, 0, bytes.Repeat([]byte{byte(b.off >> 12)}, int(b.length)))
		s.simple(a.cookie, 0, bytes.Repeat([]byte{byte(a.off >> 12)}, int(a.length)))
	})
	if err != nil {
		t.Fatal(err)
	}
	if c.StructuredReplies() {
		t.Fatal("structured replies negotiated")
	}
	ctx := clientCtx(t, 5*time.Second)
	var wg sync.WaitGroup
	for i := 1; i <= 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1000*i)
			if err := c.ReadAt(ctx, buf, uint64(i)<<12); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{byte(i)}, len(buf))) {
				t.Errorf("read %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
}

// TestClientFakeViolations: each broken reply must fail the pending
// request with ErrClientProtocol, close the connection, and fail later
// requests - promptly, without panics or unbounded allocation.
func TestClientFakeViolations(t *testing.T) {
	type op int
	const (
		opRead op = iota
		opStatus
	)
	for _, tc := range []struct {
		name       string
		structured bool
		op         op
		reply      func(s *clientFakeConn, r clientFakeReq)
		want       string
	}{
		{"bad magic", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.write([]byte{0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
		}, "bad reply magic"},
		{"unknown cookie", false, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.simple(r.cookie+1<<40, 0, nil)
		}, "unknown cookie"},
		{"structured on simple connection", false, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeNone, r.cookie)
		}, "not negotiated"},
		{"simple read reply with structured", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.simple(r.cookie, 0, make([]byte, r.length))
		}, "simple reply with data"},
		{"data outside request", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeOffsetData, r.cookie, clientBE64(r.off+uint64(r.length)-4), make([]byte, 8))
		}, "outside read request"},
		{"data before request", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeOffsetData, r.cookie, clientBE64(r.off-1), make([]byte, 1))
		}, "outside read request"},
		{"huge data chunk", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunkLen(0, replyTypeOffsetData, r.cookie, 1<<31, clientBE64(r.off))
		}, "outside read request"},
		{"hole of zero size", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeOffsetHole, r.cookie, clientBE64(r.off), clientBE32(0))
		}, "hole chunk"},
		{"partial coverage", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeOffsetData, r.cookie, clientBE64(r.off), make([]byte, r.length-1))
		}, "covered"},
		{"overlapping chunks", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(0, replyTypeOffsetData, r.cookie, clientBE64(r.off), make([]byte, r.length))
			s.chunk(replyFlagDone, replyTypeOffsetHole, r.cookie, clientBE64(r.off), clientBE32(1))
		}, "overlapping"},
		{"none without done", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(0, replyTypeNone, r.cookie)
		}, "NBD_REPLY_TYPE_NONE"},
		{"unknown chunk type", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, 42, r.cookie, make([]byte, 3))
		}, "unknown structured reply type"},
		{"error message too long", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			p := clientErrPayload(EIO, "xx", nil)
			s.chunk(replyFlagDone, replyTypeError, r.cookie, p[:7])
		}, "message length"},
		{"error value zero", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeError, r.cookie, clientErrPayload(0, "", nil))
		}, "error value 0"},
		{"huge error chunk", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunkLen(replyFlagDone, replyTypeError, r.cookie, 1<<30)
		}, "error chunk"},
		{"error offset outside", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			off := r.off + uint64(r.length)
			s.chunk(replyFlagDone, replyTypeErrorOffset, r.cookie, clientErrPayload(EIO, "", &off))
		}, "outside request"},
		{"block status for read", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeBlockStatus, r.cookie, clientBE32(7), clientBE32(512), clientBE32(0))
		}, "NBD_REPLY_TYPE_BLOCK_STATUS in reply to NBD_CMD_READ"},
		{"huge block status", true, opStatus, func(s *clientFakeConn, r clientFakeReq) {
			s.chunkLen(replyFlagDone, replyTypeBlockStatus, r.cookie, 1<<30+4, clientBE32(7))
		}, "block status reply larger"},
		{"block status unknown context", true, opStatus, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeBlockStatus, r.cookie, clientBE32(8), clientBE32(512), clientBE32(0))
		}, "unknown meta context"},
		{"block status zero-length extent", true, opStatus, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeBlockStatus, r.cookie, clientBE32(7), clientBE32(0), clientBE32(0))
		}, "length 0"},
		{"block status missing", true, opStatus, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeNone, r.cookie)
		}, "0 status chunks"},
		{"block status past request", true, opStatus, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(replyFlagDone, replyTypeBlockStatus, r.cookie, clientBE32(7),
				clientBE32(r.length), clientBE32(0), clientBE32(512), clientBE32(0))
		}, "past the requested length"},
		{"block status twice", true, opStatus, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(0, replyTypeBlockStatus, r.cookie, clientBE32(7), clientBE32(512), clientBE32(0))
			s.chunk(replyFlagDone, replyTypeBlockStatus, r.cookie, clientBE32(7), clientBE32(512), clientBE32(0))
		}, "two block status chunks"},
		{"simple success to block status", true, opStatus, func(s *clientFakeConn, r clientFakeReq) {
			s.simple(r.cookie, 0, nil)
		}, "simple reply to NBD_CMD_BLOCK_STATUS"},
		{"simple after chunks", true, opRead, func(s *clientFakeConn, r clientFakeReq) {
			s.chunk(0, replyTypeOffsetData, r.cookie, clientBE64(r.off), make([]byte, 1))
			s.simple(r.cookie, 0, nil)
		}, "after structured chunks"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := clientFakeServe(t, clientFake{structured: tc.structured}, func(s *clientFakeConn) {
				r := s.mustReadReq()
				tc.reply(s, r)
				// Wait for the client to hang up.
				s.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				io.Copy(io.Discard, s.conn)
			})
			if err != nil {
				t.Fatal(err)
			}
			ctx := clientCtx(t, 5*time.Second)
			buf := make([]byte, 4096)
			switch tc.op {
			case opRead:
				err = c.ReadAt(ctx, buf, 8192)
			case opStatus:
				err = c.BlockStatus(ctx, 8192, 4096, 0, func(uint32, uint64, uint32) {})
			}
			if !errors.Is(err, ErrClientProtocol) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a protocol error containing %q", err, tc.want)
			}
			if err := c.Flush(ctx); !errors.Is(err, ErrClientProtocol) {
				t.Fatalf("request after protocol error: %v", err)
			}
		})
	}
}

func TestClientFakeServerDiesMidPayload(t *testing.T) {
	c, err := clientFakeServe(t, clientFake{structured: true}, func(s *clientFakeConn) {
		r := s.mustReadReq()
		s.chunkLen(replyFlagDone, replyTypeOffsetData, r.cookie, r.length+8, clientBE64(r.off), make([]byte, 100))
	})
	if err != nil {
		t.Fatal(err)
	}
	err = c.ReadAt(clientCtx(t, 5*time.Second), make([]byte, 4096), 0)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("got %v, want unexpected EOF", err)
	}
}

func TestClientFakeCancelMidPayload(t *testing.T) {
	old := clientCancelGrace
	clientCancelGrace = 200 * time.Millisecond
	defer func() { clientCancelGrace = old }()
	release := make(chan struct{})
	c, err := clientFakeServe(t, clientFake{structured: true}, func(s *clientFakeConn) {
		r := s.mustReadReq()
		// Start the data, then stall in the middle of it.
		s.chunkLen(replyFlagDone, replyTypeOffsetData, r.cookie, r.length+8, clientBE64(r.off), make([]byte, 1000))
		<-release
	})
	if err != nil {
		t.Fatal(err)
	}
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	buf := make([]byte, 1<<20)
	start := time.Now()
	if err := c.ReadAt(ctx, buf, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("cancel took %v", d)
	}
	// The stalled connection was given up on.
	if err := c.Flush(clientCtx(t, 5*time.Second)); err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("request after stalled cancel: %v", err)
	}
}

func TestClientFakeExportNameFallback(t *testing.T) {
	for _, nz := range []bool{true, false} {
		c, err := clientFakeServe(t, clientFake{structured: true, goUnsup: true, noZeroes: nz, size: 12345 * 512,
			flags: FlagHasFlags | FlagReadOnly}, func(s *clientFakeConn) {
			r := s.mustReadReq()
			s.chunk(replyFlagDone, replyTypeOffsetData, r.cookie, clientBE64(r.off), bytes.Repeat([]byte{7}, int(r.length)))
		})
		if err != nil {
			t.Fatalf("noZeroes=%v: %v", nz, err)
		}
		if c.Size() != 12345*512 || c.Flags() != FlagHasFlags|FlagReadOnly {
			t.Fatalf("noZeroes=%v: size %d flags %#x", nz, c.Size(), c.Flags())
		}
		buf := make([]byte, 512)
		if err := c.ReadAt(clientCtx(t, 5*time.Second), buf, 512); err != nil || buf[0] != 7 {
			t.Fatalf("read after EXPORT_NAME fallback: %v", err)
		}
	}
}

func TestClientFakeHandshakeErrors(t *testing.T) {
	old := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, nbdMagic), clientOldstyleMagic)
	for _, tc := range []struct {
		name string
		f    clientFake
		want string
	}{
		{"not nbd", clientFake{greeting: []byte("SSH-2.0-OpenSSH_9.6\r\n")}, "not an NBD server"},
		{"oldstyle", clientFake{greeting: append(old, make([]byte, 8+2+124)...)}, "oldstyle"},
		{"closed", clientFake{greeting: []byte("NBDM")}, "unexpected EOF"},
		{"go policy", clientFake{goErr: repErrPolicy}, `nbd: NBD_OPT_GO for export "": NBD_REP_ERR_POLICY: go away`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := clientFakeServe(t, tc.f, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if tc.f.goErr == repErrPolicy && !errors.Is(err, fs.ErrPermission) {
				t.Fatalf("%v is not fs.ErrPermission", err)
			}
		})
	}
}
