package nbd

// Raw-socket tests: byte-level conversations with the server for the
// protocol corners that no well-behaved client (libnbd, qemu) will ever
// produce. Each test speaks the wire format directly.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// rawGuard bounds every raw conversation so that a server bug shows up as
// a failed read rather than a hung test. It is a hang guard, not a timing
// assertion: nothing here should take more than a few milliseconds.
const rawGuard = 20 * time.Second

// rawConn is a hand-rolled NBD client.
type rawConn struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
	// structured and readLens tell readReply how to parse replies:
	// simple READ replies carry a payload whose length only the
	// request knew.
	structured bool
	// extended: requests go out in the 32-byte extended form (see
	// extheaders_test.go); replies are told apart by their magic.
	extended bool
	mu       sync.Mutex
	readLens map[uint64]uint32
}

func rawDialAddr(t testing.TB, network, addr string) *rawConn {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(rawGuard))
	return &rawConn{t: t, c: c, br: bufio.NewReader(c), readLens: map[uint64]uint32{}}
}

// rawDial connects to the server's unix socket.
func rawDial(t testing.TB, s *testServer) *rawConn {
	t.Helper()
	return rawDialAddr(t, "unix", s.sock)
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("write: %v", err)
	}
}

func (r *rawConn) readFull(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.br, b); err != nil {
		r.t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

// greet reads the server greeting and answers with client flags.
func (r *rawConn) greet(clientFlags uint32) {
	r.t.Helper()
	h := r.readFull(18)
	if m := binary.BigEndian.Uint64(h); m != nbdMagic {
		r.t.Fatalf("greeting magic %#x", m)
	}
	if m := binary.BigEndian.Uint64(h[8:]); m != optMagic {
		r.t.Fatalf("greeting option magic %#x (not newstyle)", m)
	}
	if f := binary.BigEndian.Uint16(h[16:]); f != flagFixedNewstyle|flagNoZeroes {
		r.t.Fatalf("handshake flags %#x", f)
	}
	r.write(binary.BigEndian.AppendUint32(nil, clientFlags))
}

func rawOption(opt uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func (r *rawConn) sendOpt(opt uint32, payload []byte) {
	r.t.Helper()
	r.write(rawOption(opt, payload))
}

type rawOptReply struct {
	opt, typ uint32
	data     []byte
}

func (r *rawConn) readOptReply() rawOptReply {
	r.t.Helper()
	h := r.readFull(20)
	if m := binary.BigEndian.Uint64(h); m != optReplyMagic {
		r.t.Fatalf("option reply magic %#x", m)
	}
	n := binary.BigEndian.Uint32(h[16:])
	if n > 1<<20 {
		r.t.Fatalf("option reply of %d bytes", n)
	}
	return rawOptReply{
		opt:  binary.BigEndian.Uint32(h[8:]),
		typ:  binary.BigEndian.Uint32(h[12:]),
		data: r.readFull(int(n)),
	}
}

// expectOptReply reads one option reply and checks its option and type.
func (r *rawConn) expectOptReply(opt, typ uint32) rawOptReply {
	r.t.Helper()
	rep := r.readOptReply()
	if rep.opt != opt || rep.typ != typ {
		r.t.Fatalf("option reply (opt %d, type %#x, %q), want (opt %d, type %#x)", rep.opt, rep.typ, rep.data, opt, typ)
	}
	return rep
}

// structuredWithAllocation negotiates structured replies, then selects
// base:allocation for export, checking each reply.
func (r *rawConn) structuredWithAllocation(export string) {
	r.t.Helper()
	r.sendOpt(optStructuredReply, nil)
	r.expectOptReply(optStructuredReply, repAck)
	r.setAllocation(export)
}

// setAllocation selects base:allocation for export, checking the replies.
func (r *rawConn) setAllocation(export string) {
	r.t.Helper()
	r.sendOpt(optSetMetaContext, rawMetaPayload(export, AllocationContext))
	rep := r.expectOptReply(optSetMetaContext, repMetaContext)
	if got := string(rep.data[4:]); got != AllocationContext {
		r.t.Fatalf("meta context %q", got)
	}
	if id := binary.BigEndian.Uint32(rep.data); id != allocationContextID {
		r.t.Fatalf("meta context id %d; block status replies use %d", id, allocationContextID)
	}
	r.expectOptReply(optSetMetaContext, repAck)
}

func rawGoPayload(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func rawMetaPayload(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// goInfo sends NBD_OPT_GO (or INFO) and collects the NBD_REP_INFO replies
// up to the final ACK, returning the export size and transmission flags.
func (r *rawConn) goInfo(opt uint32, name string, infos ...uint16) (size uint64, flags uint16, replies map[uint16][]byte) {
	r.t.Helper()
	r.sendOpt(opt, rawGoPayload(name, infos...))
	replies = map[uint16][]byte{}
	for {
		rep := r.readOptReply()
		if rep.opt != opt {
			r.t.Fatalf("reply for option %d, want %d", rep.opt, opt)
		}
		switch rep.typ {
		case repAck:
			e, ok := replies[infoExport]
			if !ok || len(e) != 10 {
				r.t.Fatalf("no valid NBD_INFO_EXPORT before ACK: %x", e)
			}
			return binary.BigEndian.Uint64(e), binary.BigEndian.Uint16(e[8:]), replies
		case repInfo:
			if len(rep.data) < 2 {
				r.t.Fatalf("short NBD_REP_INFO %x", rep.data)
			}
			replies[binary.BigEndian.Uint16(rep.data)] = rep.data[2:]
		default:
			r.t.Fatalf("option %d: reply type %#x %q", opt, rep.typ, rep.data)
		}
	}
}

// negotiate takes a fresh connection to transmission on export name, with
// structured replies and base:allocation if structured is set.
func (r *rawConn) negotiate(name string, structured bool) (size uint64, flags uint16) {
	r.t.Helper()
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	return r.haggle(name, structured)
}

// haggle is negotiate after the greeting.
func (r *rawConn) haggle(name string, structured bool) (size uint64, flags uint16) {
	r.t.Helper()
	if structured {
		r.structuredWithAllocation(name)
	}
	size, flags, _ = r.goInfo(optGo, name, infoBlockSize)
	r.structured = structured
	return size, flags
}

// rawRequest builds a compact request header (32-bit length);
// rawExtRequest an extended one (64-bit length).
func rawRequest(flags, typ uint16, cookie, off uint64, length uint32) []byte {
	return binary.BigEndian.AppendUint32(rawRequestHead(requestMagic, flags, typ, cookie, off), length)
}

func rawExtRequest(flags, typ uint16, cookie, off, length uint64) []byte {
	return binary.BigEndian.AppendUint64(rawRequestHead(extendedRequestMagic, flags, typ, cookie, off), length)
}

func rawRequestHead(magic uint32, flags, typ uint16, cookie, off uint64) []byte {
	b := binary.BigEndian.AppendUint32(nil, magic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	return binary.BigEndian.AppendUint64(b, off)
}

// send writes one request (with its payload for a WRITE).
func (r *rawConn) send(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	if typ == CmdRead {
		r.mu.Lock()
		r.readLens[cookie] = length
		r.mu.Unlock()
	}
	if r.extended {
		r.write(append(rawExtRequest(flags, typ, cookie, off, uint64(length)), payload...))
		return
	}
	r.write(append(rawRequest(flags, typ, cookie, off, length), payload...))
}

// rawReply is one simple reply or one structured chunk.
type rawReply struct {
	cookie     uint64
	structured bool
	flags, typ uint16 // structured only
	errno      uint32 // simple error, or the error chunk's code
	msg        string // error chunk message
	offset     uint64 // OFFSET_DATA chunk
	data       []byte // read data, or BLOCK_STATUS payload
	extended   bool   // an extended header, which also has:
	reqOffset  uint64 // the request's offset, echoed
}

func (r *rawConn) readReply() rawReply {
	r.t.Helper()
	h := r.readFull(4)
	switch m := binary.BigEndian.Uint32(h); m {
	case simpleMagic:
		h = r.readFull(12)
		rep := rawReply{errno: binary.BigEndian.Uint32(h), cookie: binary.BigEndian.Uint64(h[4:])}
		r.mu.Lock()
		n, isRead := r.readLens[rep.cookie]
		delete(r.readLens, rep.cookie)
		r.mu.Unlock()
		if isRead && rep.errno == 0 {
			rep.data = r.readFull(int(n))
		}
		return rep
	case structuredMagic:
		h = r.readFull(16)
		rep := rawReply{
			structured: true,
			flags:      binary.BigEndian.Uint16(h),
			typ:        binary.BigEndian.Uint16(h[2:]),
			cookie:     binary.BigEndian.Uint64(h[4:]),
		}
		return r.readChunk(rep, uint64(binary.BigEndian.Uint32(h[12:])))
	case extendedReplyMagic:
		h = r.readFull(28)
		rep := rawReply{
			structured: true,
			extended:   true,
			flags:      binary.BigEndian.Uint16(h),
			typ:        binary.BigEndian.Uint16(h[2:]),
			cookie:     binary.BigEndian.Uint64(h[4:]),
			reqOffset:  binary.BigEndian.Uint64(h[12:]),
		}
		return r.readChunk(rep, binary.BigEndian.Uint64(h[20:]))
	default:
		r.t.Fatalf("reply magic %#x", m)
		panic("unreachable")
	}
}

// readChunk reads the n-byte payload of a structured or extended chunk
// whose header is in rep, and decodes it.
func (r *rawConn) readChunk(rep rawReply, n uint64) rawReply {
	r.t.Helper()
	if n > 64<<20 {
		r.t.Fatalf("chunk of %d bytes", n)
	}
	p := r.readFull(int(n))
	switch rep.typ {
	case replyTypeOffsetData:
		rep.offset, rep.data = binary.BigEndian.Uint64(p), p[8:]
	case replyTypeOffsetHole:
		// Decoded as the zeros it stands for; typ tells them apart.
		rep.offset, rep.data = binary.BigEndian.Uint64(p), make([]byte, binary.BigEndian.Uint32(p[8:]))
	case replyTypeError, replyTypeErrorOffset:
		rep.errno = binary.BigEndian.Uint32(p)
		ml := binary.BigEndian.Uint16(p[4:])
		rep.msg = string(p[6 : 6+ml])
	default:
		rep.data = p
	}
	if rep.flags&replyFlagDone != 0 {
		r.mu.Lock()
		delete(r.readLens, rep.cookie)
		r.mu.Unlock()
	}
	return rep
}

// do sends one request and reads its (single-message) reply.
func (r *rawConn) do(flags, typ uint16, off uint64, length uint32, payload []byte) rawReply {
	r.t.Helper()
	cookie := uint64(time.Now().UnixNano())
	r.send(flags, typ, cookie, off, length, payload)
	rep := r.readReply()
	if rep.cookie != cookie {
		r.t.Fatalf("reply cookie %#x, want %#x", rep.cookie, cookie)
	}
	if rep.structured && rep.flags&replyFlagDone == 0 {
		r.t.Fatalf("chunk without DONE where one chunk was expected: %+v", rep)
	}
	return rep
}

// expectErrno sends a request and requires the given error reply.
func (r *rawConn) expectErrno(want uint32, flags, typ uint16, off uint64, length uint32, payload []byte) {
	r.t.Helper()
	rep := r.do(flags, typ, off, length, payload)
	if rep.errno != want {
		r.t.Fatalf("command %d flags %#x off %d len %d: errno %d (%q), want %d", typ, flags, off, length, rep.errno, rep.msg, want)
	}
	if r.structured && (rep.typ != replyTypeError || rep.msg == "") {
		r.t.Fatalf("error reply %+v: want an NBD_REPLY_TYPE_ERROR chunk with a message", rep)
	}
}

// readData reads [off, off+length) and returns the data.
func (r *rawConn) readData(off uint64, length uint32) []byte {
	r.t.Helper()
	rep := r.do(0, CmdRead, off, length, nil)
	if rep.errno != 0 {
		r.t.Fatalf("read %d+%d: errno %d %q", off, length, rep.errno, rep.msg)
	}
	if rep.structured && ((rep.typ != replyTypeOffsetData && rep.typ != replyTypeOffsetHole) || rep.offset != off) {
		r.t.Fatalf("read %d+%d: chunk type %d offset %d", off, length, rep.typ, rep.offset)
	}
	if len(rep.data) != int(length) {
		r.t.Fatalf("read %d+%d: %d bytes", off, length, len(rep.data))
	}
	return rep.data
}

func (r *rawConn) writeData(off uint64, p []byte) {
	r.t.Helper()
	if rep := r.do(0, CmdWrite, off, uint32(len(p)), p); rep.errno != 0 {
		r.t.Fatalf("write %d+%d: errno %d %q", off, len(p), rep.errno, rep.msg)
	}
}

// expectClosed requires the server to close the connection without
// sending anything more.
func (r *rawConn) expectClosed() {
	r.t.Helper()
	b, err := io.ReadAll(r.br)
	if len(b) != 0 {
		r.t.Fatalf("server sent %d more bytes (%q) before closing", len(b), b)
	}
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		r.t.Fatalf("connection was not closed by the server: %v", err)
	}
}

// expectClosedAfterReplies reads replies until the server closes,
// returning them.
func (r *rawConn) repliesUntilClose(max int) []rawReply {
	r.t.Helper()
	var out []rawReply
	for len(out) < max {
		if _, err := r.br.Peek(1); err != nil {
			if err == io.EOF || errors.Is(err, syscall.ECONNRESET) {
				return out
			}
			r.t.Fatalf("waiting for replies: %v", err)
		}
		out = append(out, r.readReply())
	}
	r.expectClosed()
	return out
}

func rawPattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

func TestRawHandshake(t *testing.T) {
	dev := newTestDevice(1 << 20)
	s := startServer(t, staticExports{"": {Device: dev, Description: "default"}, "other": {Device: newTestDevice(64 << 10)}})

	t.Run("info_name_description_blocksize", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		size, flags, infos := r.goInfo(optInfo, "", infoName, infoDescription, infoBlockSize)
		if size != 1<<20 || flags&FlagHasFlags == 0 {
			t.Fatalf("size %d flags %#x", size, flags)
		}
		if string(infos[infoName]) != "" || string(infos[infoDescription]) != "default" {
			t.Fatalf("name %q description %q", infos[infoName], infos[infoDescription])
		}
		bs := infos[infoBlockSize]
		if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 1 || binary.BigEndian.Uint32(bs[4:]) != 4096 ||
			binary.BigEndian.Uint32(bs[8:]) != DefaultMaxPayload {
			t.Fatalf("block sizes %x", bs)
		}
		// INFO leaves us negotiating: a second export can be chosen.
		size, _, _ = r.goInfo(optGo, "other")
		if size != 64<<10 {
			t.Fatalf("GO other: size %d", size)
		}
		r.readData(0, 512)
	})

	t.Run("unknown_option_unsupported", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(4242, []byte("whatever"))
		r.expectOptReply(4242, repErrUnsup)
		r.sendOpt(12, nil) // next after NBD_OPT_EXTENDED_HEADERS, unassigned
		r.expectOptReply(12, repErrUnsup)
		r.haggle("", true)
		r.readData(0, 4096)
	})

	t.Run("unknown_export_go", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optGo, rawGoPayload("nope"))
		rep := r.expectOptReply(optGo, repErrUnknown)
		if len(rep.data) == 0 {
			t.Error("NBD_REP_ERR_UNKNOWN without a message")
		}
		r.sendOpt(optInfo, rawGoPayload("nope"))
		r.expectOptReply(optInfo, repErrUnknown)
		// Still negotiating.
		r.haggle("", false)
	})

	t.Run("malformed_go", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optGo, []byte{0, 0})
		r.expectOptReply(optGo, repErrInvalid)
		// Name length beyond the payload.
		r.sendOpt(optGo, []byte{0, 0, 1, 0, 'x', 0, 0})
		r.expectOptReply(optGo, repErrInvalid)
		// Info count not matching the payload.
		r.sendOpt(optGo, []byte{0, 0, 0, 0, 0, 2, 0, 1})
		r.expectOptReply(optGo, repErrInvalid)
		r.sendOpt(optList, []byte("junk"))
		r.expectOptReply(optList, repErrInvalid)
		r.sendOpt(optStructuredReply, []byte("junk"))
		r.expectOptReply(optStructuredReply, repErrInvalid)
		r.haggle("", true)
	})

	t.Run("list", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optList, nil)
		var got []string
		for {
			rep := r.readOptReply()
			if rep.typ == repAck {
				break
			}
			if rep.typ != repServer {
				t.Fatalf("reply %#x", rep.typ)
			}
			n := binary.BigEndian.Uint32(rep.data)
			got = append(got, fmt.Sprintf("%s=%s", rep.data[4:4+n], rep.data[4+n:]))
		}
		if fmt.Sprint(got) != "[=default other=]" {
			t.Fatalf("list %q", got)
		}
	})

	t.Run("abort", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optAbort, nil)
		r.expectOptReply(optAbort, repAck)
		r.expectClosed()
	})

	t.Run("starttls_without_tls", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optStartTLS, nil)
		r.expectOptReply(optStartTLS, repErrPolicy)
		r.haggle("", true)
	})

	t.Run("unknown_client_flags", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(1 << 7)
		r.expectClosed()
	})

	t.Run("nonfixed_client_unknown_option", func(t *testing.T) {
		// A client without fixed newstyle cannot parse option replies.
		r := rawDial(t, s)
		r.greet(0)
		r.sendOpt(4242, nil)
		r.expectClosed()
	})

	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("export_name_nozeroes_%v", noZeroes), func(t *testing.T) {
			r := rawDial(t, s)
			cf := uint32(clientFlagFixedNewstyle)
			if noZeroes {
				cf |= clientFlagNoZeroes
			}
			r.greet(cf)
			r.sendOpt(optExportName, nil)
			b := r.readFull(10)
			if binary.BigEndian.Uint64(b) != 1<<20 {
				t.Fatalf("size %d", binary.BigEndian.Uint64(b))
			}
			if f := binary.BigEndian.Uint16(b[8:]); f&FlagSendDF != 0 {
				t.Fatalf("DF advertised without structured replies: %#x", f)
			}
			if !noZeroes {
				if z := r.readFull(124); !bytes.Equal(z, make([]byte, 124)) {
					t.Fatalf("padding %x", z)
				}
			}
			dev.WriteAt(context.Background(), rawPattern(512, 3), 8192, false)
			if got := r.readData(8192, 512); !bytes.Equal(got, rawPattern(512, 3)) {
				t.Fatal("read back mismatch")
			}
		})
	}

	t.Run("export_name_unknown", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optExportName, []byte("nope"))
		r.expectClosed()
	})

	t.Run("export_name_structured_and_meta", func(t *testing.T) {
		// EXPORT_NAME honours structured replies and the meta context
		// negotiated before it, like GO.
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		r.structuredWithAllocation("")
		r.sendOpt(optExportName, nil)
		b := r.readFull(10)
		if f := binary.BigEndian.Uint16(b[8:]); f&FlagSendDF == 0 {
			t.Fatalf("DF not advertised with structured replies: %#x", f)
		}
		r.structured = true
		if rep := r.do(0, CmdBlockStatus, 0, 4096, nil); rep.typ != replyTypeBlockStatus {
			t.Fatalf("block status: %+v", rep)
		}
	})
}

func TestRawMetaContext(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}, "b": {Device: newTestDevice(1 << 20)}})

	t.Run("set_before_structured", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optSetMetaContext, rawMetaPayload("", AllocationContext))
		r.expectOptReply(optSetMetaContext, repErrInvalid)
	})

	t.Run("list", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optStructuredReply, nil)
		r.expectOptReply(optStructuredReply, repAck)
		for _, q := range [][]string{nil, {"base:"}, {AllocationContext}, {"x-unknown:foo", AllocationContext}} {
			r.sendOpt(optListMetaContext, rawMetaPayload("", q...))
			rep := r.expectOptReply(optListMetaContext, repMetaContext)
			if string(rep.data[4:]) != AllocationContext {
				t.Fatalf("query %q: context %q", q, rep.data[4:])
			}
			if id := binary.BigEndian.Uint32(rep.data); id != 0 {
				t.Errorf("query %q: LIST_META_CONTEXT id %d, want the reserved 0", q, id)
			}
			r.expectOptReply(optListMetaContext, repAck)
		}
		// Unknown namespaces are ignored: just an ACK.
		r.sendOpt(optListMetaContext, rawMetaPayload("", "x-unknown:foo"))
		r.expectOptReply(optListMetaContext, repAck)
		// Malformed: query length beyond the payload.
		p := rawMetaPayload("", AllocationContext)
		r.sendOpt(optListMetaContext, p[:len(p)-1])
		r.expectOptReply(optListMetaContext, repErrInvalid)
	})

	t.Run("set_none_then_block_status", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optStructuredReply, nil)
		r.expectOptReply(optStructuredReply, repAck)
		r.sendOpt(optSetMetaContext, rawMetaPayload("", "x-unknown:foo"))
		r.expectOptReply(optSetMetaContext, repAck)
		r.goInfo(optGo, "")
		r.structured = true
		r.expectErrno(EINVAL, 0, CmdBlockStatus, 0, 4096, nil)
		r.readData(0, 4096)
	})

	t.Run("set_for_other_export", func(t *testing.T) {
		// A context chosen for export "b" does not apply to "".
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.structuredWithAllocation("b")
		r.goInfo(optGo, "")
		r.structured = true
		r.expectErrno(EINVAL, 0, CmdBlockStatus, 0, 4096, nil)
	})

	t.Run("failed_set_clears_previous", func(t *testing.T) {
		// proto.md: SET_META_CONTEXT replaces all previously set
		// contexts "including when this command fails".
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.structuredWithAllocation("")
		p := rawMetaPayload("", AllocationContext)
		r.sendOpt(optSetMetaContext, p[:len(p)-1])
		r.expectOptReply(optSetMetaContext, repErrInvalid)
		r.goInfo(optGo, "")
		r.structured = true
		r.expectErrno(EINVAL, 0, CmdBlockStatus, 0, 4096, nil)
	})
}

func TestRawBadOptionMagic(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}})
	// A second connection, opened first, must not be disturbed.
	good := rawDial(t, s)
	good.greet(clientFlagFixedNewstyle)

	bad := rawDial(t, s)
	bad.greet(clientFlagFixedNewstyle)
	opt := rawOption(optList, nil)
	opt[0] ^= 0xff
	bad.write(opt)
	bad.expectClosed()

	good.haggle("", true)
	good.writeData(0, rawPattern(4096, 1))
	if !bytes.Equal(good.readData(0, 4096), rawPattern(4096, 1)) {
		t.Fatal("read back mismatch")
	}
}

func TestRawBadRequestMagic(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}})
	good := rawDial(t, s)
	good.negotiate("", true)
	bad := rawDial(t, s)
	bad.negotiate("", false)
	bad.readData(0, 512)

	req := rawRequest(0, CmdRead, 1, 0, 512)
	req[0] ^= 0xff
	bad.write(req)
	bad.expectClosed()

	good.writeData(4096, rawPattern(4096, 2))
	if !bytes.Equal(good.readData(4096, 4096), rawPattern(4096, 2)) {
		t.Fatal("read back mismatch")
	}
}

func TestRawOversizeOption(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}})

	t.Run("1MiB_too_big", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		// The payload is sent from another goroutine: the server
		// skips it while we wait for the reply.
		go r.c.Write(rawOption(optList, make([]byte, 1<<20)))
		r.expectOptReply(optList, repErrTooBig)
		r.haggle("", true)
		r.readData(0, 4096)
	})

	t.Run("17MiB_closes", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		h := rawOption(optList, nil)
		binary.BigEndian.PutUint32(h[12:], 17<<20)
		r.write(h)
		// No payload follows: the server must hang up on the header
		// alone rather than read (or allocate) 17 MiB.
		r.expectClosed()
	})

	t.Run("export_name_over_64KiB_closes", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		h := rawOption(optExportName, nil)
		binary.BigEndian.PutUint32(h[12:], 100<<10)
		r.write(h)
		r.expectClosed()
	})
}

func TestRawTransmissionErrors(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured_%v", structured), func(t *testing.T) {
			dev := newTestDevice(1 << 20)
			dev.caps.FastZero = false
			ro := newTestDevice(64 << 10)
			ro.caps.ReadOnly = true
			s := startServer(t, staticExports{"": {Device: dev}, "ro": {Device: ro}})
			r := rawDial(t, s)
			_, flags := r.negotiate("", structured)
			if flags&FlagSendFastZero != 0 {
				t.Fatalf("FAST_ZERO advertised without caps.FastZero: %#x", flags)
			}
			r.writeData(0, rawPattern(8192, 9))

			// A WRITE with a flag not valid for it: the payload must be
			// skipped, the data not written, and the stream stay in step.
			r.expectErrno(EINVAL, CmdFlagDF, CmdWrite, 0, 4096, make([]byte, 4096))
			r.expectErrno(EINVAL, CmdFlagReqOne, CmdWrite, 0, 4096, make([]byte, 4096))
			// Unknown flag bits.
			r.expectErrno(EINVAL, 1<<9, CmdWrite, 0, 4096, make([]byte, 4096))
			if !bytes.Equal(r.readData(0, 8192), rawPattern(8192, 9)) {
				t.Fatal("rejected write changed the data, or the stream lost step")
			}
			r.expectErrno(EINVAL, CmdFlagFastZero, CmdWriteZeroes, 0, 4096, nil)
			r.expectErrno(EINVAL, CmdFlagNoHole, CmdRead, 0, 4096, nil)
			if !structured {
				// DF needs structured replies.
				r.expectErrno(EINVAL, CmdFlagDF, CmdRead, 0, 4096, nil)
			}
			r.expectErrno(EINVAL, 0, 99, 0, 4096, nil)       // unknown command
			r.expectErrno(EINVAL, 0, CmdRead, 0, 0, nil)     // zero length
			r.expectErrno(EINVAL, 0, CmdWrite, 0, 0, nil)    // zero length write, no payload
			r.expectErrno(EINVAL, 0, CmdFlush, 0, 4096, nil) // flush with a length
			r.expectErrno(EINVAL, 0, CmdFlush, 512, 0, nil)  // flush with an offset
			r.expectErrno(EINVAL, 0, CmdRead, 1<<20, 1, nil) // beyond the end
			r.expectErrno(EINVAL, 0, CmdRead, 1<<63, 1, nil) // far beyond the end
			r.expectErrno(EINVAL, 0, CmdRead, 1<<20-1, 2, nil)
			r.expectErrno(EINVAL, 0, CmdTrim, 1<<20-4096, 8192, nil)
			r.expectErrno(EINVAL, 0, CmdCache, 1<<20, 4096, nil)
			r.expectErrno(ENOSPC, 0, CmdWrite, 1<<20-4096, 8192, make([]byte, 8192))
			r.expectErrno(ENOSPC, 0, CmdWriteZeroes, 1<<20-4096, 8192, nil)
			// Offset+length overflowing 64 bits must not wrap around.
			r.expectErrno(ENOSPC, 0, CmdWriteZeroes, ^uint64(0)-100, 4096, nil)
			// Over the maximum payload (but small enough to skip).
			r.expectErrno(EINVAL, 0, CmdRead, 0, DefaultMaxPayload+1, nil)
			if !structured {
				r.expectErrno(EINVAL, 0, CmdBlockStatus, 0, 4096, nil)
			}
			if !bytes.Equal(r.readData(0, 8192), rawPattern(8192, 9)) {
				t.Fatal("stream lost step")
			}

			w := rawDial(t, s)
			w.negotiate("ro", structured)
			w.expectErrno(EPERM, 0, CmdWrite, 0, 512, make([]byte, 512))
			w.expectErrno(EPERM, 0, CmdWriteZeroes, 0, 512, nil)
			w.expectErrno(EPERM, 0, CmdTrim, 0, 512, nil)
			if rep := w.do(0, CmdFlush, 0, 0, nil); rep.errno != 0 {
				t.Fatalf("flush on a read-only export: %+v", rep)
			}
			if rep := w.do(0, CmdCache, 0, 4096, nil); rep.errno != 0 {
				t.Fatalf("cache on a read-only export: %+v", rep)
			}
			w.readData(0, 512)
		})
	}
}

func TestRawHugeWriteCloses(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}})
	r := rawDial(t, s)
	r.negotiate("", true)
	// A WRITE announcing more than twice the maximum payload is not
	// worth skipping: the server hangs up instead of reading it.
	r.write(rawRequest(0, CmdWrite, 7, 0, 2*DefaultMaxPayload+1))
	r.expectClosed()
}

func TestRawWriteOverMaxPayloadSkipped(t *testing.T) {
	dev := newTestDevice(64 << 20)
	dev.caps.MaxBlock = 1 << 20
	s := startServer(t, staticExports{"": {Device: dev}})
	r := rawDial(t, s)
	r.negotiate("", true)
	go r.c.Write(append(rawRequest(0, CmdWrite, 1, 0, 2<<20), make([]byte, 2<<20)...))
	rep := r.readReply()
	if rep.cookie != 1 || rep.errno != EINVAL {
		t.Fatalf("oversize write: %+v", rep)
	}
	r.readData(0, 1<<20)
	r.expectErrno(EINVAL, 0, CmdRead, 0, 1<<20+512, nil)
	r.expectErrno(EINVAL, CmdFlagDF, CmdRead, 0, 1<<20+512, nil)
	// Payload-less commands are not bound by the maximum payload.
	if rep := r.do(0, CmdWriteZeroes, 0, 8<<20, nil); rep.errno != 0 {
		t.Fatalf("zero over max payload: %+v", rep)
	}
	if rep := r.do(0, CmdBlockStatus, 0, 8<<20, nil); rep.errno != 0 {
		t.Fatalf("block status over max payload: %+v", rep)
	}
}

func TestRawUnalignedMinBlock(t *testing.T) {
	dev := newTestDevice(1 << 20)
	dev.caps.MinBlock = 512
	s := startServer(t, staticExports{"": {Device: dev}})
	r := rawDial(t, s)
	r.negotiate("", true)
	r.expectErrno(EINVAL, 0, CmdRead, 1, 512, nil)
	r.expectErrno(EINVAL, 0, CmdRead, 0, 100, nil)
	r.expectErrno(EINVAL, 0, CmdWrite, 0, 100, make([]byte, 100))
	r.expectErrno(EINVAL, 0, CmdWriteZeroes, 256, 512, nil)
	r.expectErrno(EINVAL, 0, CmdBlockStatus, 0, 100, nil)
	r.readData(512, 1024)
}

func TestRawBlockStatus(t *testing.T) {
	dev := newTestDevice(1 << 20)
	s := startServer(t, staticExports{"": {Device: dev}})
	ctx := context.Background()
	dev.WriteAt(ctx, rawPattern(8192, 1), 16384, false) // data at [16K, 24K)
	dev.WriteAt(ctx, make([]byte, 4096), 65536, false)

	r := rawDial(t, s)
	r.negotiate("", true)
	descs := func(rep rawReply) [][2]uint32 {
		t.Helper()
		if rep.typ != replyTypeBlockStatus || rep.flags&replyFlagDone == 0 || len(rep.data) < 12 || (len(rep.data)-4)%8 != 0 {
			t.Fatalf("block status reply %+v", rep)
		}
		if id := binary.BigEndian.Uint32(rep.data); id != allocationContextID {
			t.Fatalf("context id %d", id)
		}
		var out [][2]uint32
		for p := rep.data[4:]; len(p) > 0; p = p[8:] {
			out = append(out, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		}
		return out
	}
	got := descs(r.do(0, CmdBlockStatus, 0, 1<<20, nil))
	want := [][2]uint32{{16384, 3}, {8192, 0}, {65536 - 24576, 3}, {4096, 2}, {1<<20 - 69632, 3}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
	// REQ_ONE: exactly one descriptor, no longer than asked for.
	for _, c := range []struct {
		off  uint64
		n    uint32
		want [2]uint32
	}{{0, 1 << 20, [2]uint32{16384, 3}}, {0, 100, [2]uint32{100, 3}}, {16384 + 100, 1 << 19, [2]uint32{8092, 0}}, {70000, 5, [2]uint32{5, 3}}} {
		got := descs(r.do(CmdFlagReqOne, CmdBlockStatus, c.off, c.n, nil))
		if len(got) != 1 || got[0] != c.want {
			t.Fatalf("REQ_ONE %d+%d: %v, want %v", c.off, c.n, got, c.want)
		}
	}
	// Unaligned request: descriptors cover exactly the request.
	got = descs(r.do(0, CmdBlockStatus, 100, 20000, nil))
	if fmt.Sprint(got) != "[[16284 3] [3716 0]]" {
		t.Fatalf("unaligned: %v", got)
	}
	r.expectErrno(EINVAL, 0, CmdBlockStatus, 1<<20, 1, nil)
	r.expectErrno(EINVAL, CmdFlagDF, CmdBlockStatus, 0, 4096, nil)

	// A device without extent support reports one allocated extent.
	dev2 := newTestDevice(1 << 20)
	dev2.caps.Extents = false
	s2 := startServer(t, staticExports{"": {Device: dev2}})
	r2 := rawDial(t, s2)
	r2.negotiate("", true)
	if got := descs(r2.do(0, CmdBlockStatus, 4096, 8192, nil)); fmt.Sprint(got) != "[[8192 0]]" {
		t.Fatalf("no-extents device: %v", got)
	}
}

func TestRawStructuredRead(t *testing.T) {
	dev := newTestDevice(1 << 20)
	s := startServer(t, staticExports{"": {Device: dev}})
	dev.WriteAt(context.Background(), rawPattern(10000, 5), 3000, false)
	r := rawDial(t, s)
	r.negotiate("", true)
	for _, flags := range []uint16{0, CmdFlagDF, CmdFlagFUA} {
		rep := r.do(flags, CmdRead, 3000, 10000, nil)
		if !rep.structured || rep.typ != replyTypeOffsetData || rep.offset != 3000 || !bytes.Equal(rep.data, rawPattern(10000, 5)) {
			t.Fatalf("flags %#x: chunk type %d offset %d len %d", flags, rep.typ, rep.offset, len(rep.data))
		}
	}
}

func TestRawPipelined(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured_%v", structured), func(t *testing.T) {
			dev := newTestDevice(8 << 20)
			s := startServer(t, staticExports{"": {Device: dev}}, func(c *ServerConfig) { c.MaxInFlight = 8 })
			r := rawDial(t, s)
			r.negotiate("", structured)
			const n = 64
			// Reads of the first 4 MiB (written beforehand) mixed with
			// writes and zeroes beyond it, all queued before a single
			// reply is read.
			for i := 0; i < n; i++ {
				r.writeData(uint64(i)*65536, rawPattern(65536, byte(i)))
			}
			var buf bytes.Buffer
			for i := 0; i < n; i++ {
				cookie := uint64(1000 + i)
				switch i % 4 {
				case 0, 1:
					r.mu.Lock()
					r.readLens[cookie] = 65536
					r.mu.Unlock()
					buf.Write(rawRequest(0, CmdRead, cookie, uint64(i)*65536, 65536))
				case 2:
					buf.Write(rawRequest(0, CmdWrite, cookie, 4<<20+uint64(i)*4096, 4096))
					buf.Write(rawPattern(4096, byte(i)))
				case 3:
					buf.Write(rawRequest(CmdFlagFUA, CmdWriteZeroes, cookie, 4<<20+uint64(i)*4096, 4096))
				}
			}
			// Written from another goroutine: with a small MaxInFlight
			// the server stops reading until we take replies.
			go r.c.Write(buf.Bytes())
			seen := map[uint64]bool{}
			for len(seen) < n {
				rep := r.readReply()
				i := int(rep.cookie) - 1000
				if i < 0 || i >= n || seen[rep.cookie] {
					t.Fatalf("unexpected or duplicate reply %+v", rep)
				}
				if rep.errno != 0 {
					t.Fatalf("request %d: errno %d", i, rep.errno)
				}
				if i%4 < 2 && !bytes.Equal(rep.data, rawPattern(65536, byte(i))) {
					t.Fatalf("request %d: wrong data", i)
				}
				seen[rep.cookie] = true
			}
			data, _ := dev.snapshot()
			for i := 2; i < n; i += 4 {
				if !bytes.Equal(data[4<<20+i*4096:4<<20+(i+1)*4096], rawPattern(4096, byte(i))) {
					t.Fatalf("pipelined write %d missing", i)
				}
			}
		})
	}
}

// gatedDevice holds every ReadAt until the gate opens, so requests stay
// in flight while the test does something else.
type gatedDevice struct {
	*testDevice
	gate    chan struct{}
	entered chan struct{}
}

func (d *gatedDevice) ReadAt(ctx context.Context, p []byte, off uint64) error {
	d.entered <- struct{}{}
	<-d.gate
	return d.testDevice.ReadAt(ctx, p, off)
}

func TestRawDiscWithRequestsInFlight(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured_%v", structured), func(t *testing.T) {
			const n = 16
			dev := &gatedDevice{testDevice: newTestDevice(1 << 20), gate: make(chan struct{}), entered: make(chan struct{}, n)}
			dev.WriteAt(context.Background(), rawPattern(1<<20, 4), 0, false)
			s := startServer(t, staticExports{"": {Device: dev}})
			r := rawDial(t, s)
			r.negotiate("", structured)
			var buf bytes.Buffer
			for i := 0; i < n; i++ {
				r.readLens[uint64(i)] = 4096
				buf.Write(rawRequest(0, CmdRead, uint64(i), uint64(i)*4096, 4096))
			}
			// A write that does not touch the gated reads.
			buf.Write(rawRequest(0, CmdWrite, n, 1<<19, 4096))
			buf.Write(rawPattern(4096, 77))
			r.write(buf.Bytes())
			for i := 0; i < n; i++ {
				<-dev.entered // every read is now inside the device
			}
			r.write(rawRequest(0, CmdDisc, 99, 0, 0))
			// Give the server a moment to see DISC while the reads are
			// held (coverage only: the outcome must be the same if it
			// has not seen it yet).
			time.Sleep(50 * time.Millisecond)
			close(dev.gate)
			reps := r.repliesUntilClose(n + 2)
			if len(reps) != n+1 {
				t.Fatalf("%d replies before close, want %d", len(reps), n+1)
			}
			for _, rep := range reps {
				if rep.errno != 0 {
					t.Fatalf("reply %+v", rep)
				}
				if rep.cookie < n && !bytes.Equal(rep.data, rawPattern(1<<20, 4)[rep.cookie*4096:(rep.cookie+1)*4096]) {
					t.Fatalf("read %d: wrong data", rep.cookie)
				}
			}
			data, _ := dev.snapshot()
			if !bytes.Equal(data[1<<19:1<<19+4096], rawPattern(4096, 77)) {
				t.Fatal("write before DISC was not applied")
			}
		})
	}
}

func TestRawDeviceErrors(t *testing.T) {
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprintf("structured_%v", structured), func(t *testing.T) {
			dev := newTestDevice(1 << 20)
			dev.fail = fmt.Errorf("boom: %w", syscall.EIO)
			dev.failOff, dev.failLen = 65536, 4096
			s := startServer(t, staticExports{"": {Device: dev}})
			r := rawDial(t, s)
			r.negotiate("", structured)
			r.expectErrno(EIO, 0, CmdRead, 65536, 4096, nil)
			r.expectErrno(EIO, 0, CmdWrite, 65536, 4096, make([]byte, 4096))
			r.expectErrno(EIO, 0, CmdWriteZeroes, 60000, 8192, nil)
			r.expectErrno(EIO, 0, CmdTrim, 65536, 1, nil)
			r.expectErrno(EIO, 0, CmdCache, 65536, 1, nil)
			if structured {
				r.expectErrno(EIO, 0, CmdBlockStatus, 65536, 4096, nil)
			}
			r.writeData(0, rawPattern(4096, 8))
			if !bytes.Equal(r.readData(0, 4096), rawPattern(4096, 8)) {
				t.Fatal("connection unusable after device errors")
			}
		})
	}
}

func TestRawErrnoMapping(t *testing.T) {
	for _, c := range []struct {
		err  error
		want uint32
	}{
		{syscall.EROFS, EPERM},
		{backends.ErrReadOnly, EPERM},
		{backends.ErrNoSpace, ENOSPC},
		{fmt.Errorf("quota: %w", syscall.EDQUOT), ENOSPC},
		{backends.ErrNotSupported, ENOTSUP},
		{backends.ErrInvalid, EINVAL},
		{syscall.ENOMEM, ENOMEM},
		{context.Canceled, ESHUTDOWN},
		{errors.New("anything else"), EIO},
		{syscall.EBADF, EIO},
	} {
		dev := newTestDevice(64 << 10)
		dev.fail = c.err
		s := startServer(t, staticExports{"": {Device: dev}})
		r := rawDial(t, s)
		r.negotiate("", true)
		r.expectErrno(c.want, 0, CmdRead, 0, 512, nil)
	}
}

// panicDevice panics on reads at offset 0.
type panicDevice struct{ *testDevice }

func (d panicDevice) Lend(off, length uint64, dst [][]byte) ([][]byte, bool, error) {
	return lendViaReadAt(d, off, length, dst)
}

func (d panicDevice) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if off == 0 {
		panic("device bug")
	}
	return d.testDevice.ReadAt(ctx, p, off)
}

func TestRawDevicePanic(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: panicDevice{newTestDevice(1 << 20)}}})
	r := rawDial(t, s)
	r.negotiate("", true)
	r.expectErrno(EIO, 0, CmdRead, 0, 4096, nil)
	r.readData(4096, 4096)
}

func TestRawHandshakeTimeout(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}},
		func(c *ServerConfig) { c.HandshakeTimeout = 500 * time.Millisecond })

	// A connection in transmission is not subject to the timeout.
	live := rawDial(t, s)
	live.negotiate("", true)

	idle := rawDial(t, s)
	idle.readFull(18) // greeting, then silence
	mid := rawDial(t, s)
	mid.greet(clientFlagFixedNewstyle)
	mid.sendOpt(optStructuredReply, nil)
	mid.expectOptReply(optStructuredReply, repAck)

	idle.expectClosed()
	mid.expectClosed()
	live.readData(0, 4096)
}

func TestRawShutdownWithUnreadReplies(t *testing.T) {
	shutdownWithUnreadReplies(t, ServerConfig{}, func(sock string) *rawConn {
		r := rawDialAddr(t, "unix", sock)
		r.negotiate("", true)
		return r
	})
}

// shutdownWithUnreadReplies checks that a client which never reads its
// replies cannot make Shutdown outlast its context, nor leave connection
// goroutines behind. connect returns a connection in transmission on "".
func shutdownWithUnreadReplies(t *testing.T, cfg ServerConfig, connect func(sock string) *rawConn) {
	dev := newTestDevice(32 << 20)
	cfg.Exports = staticExports{"": {Device: dev}}
	cfg.MaxBufferedBytes = 1
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background(), ln) }()

	r := connect(sock)
	// 64 MiB of reads that we never read back: the socket buffers fill,
	// the reply writer blocks, and the memory budget (32 MiB, the
	// minimum) stops the request reader too.
	var buf bytes.Buffer
	for i := 0; i < 64; i++ {
		buf.Write(rawRequest(0, CmdRead, uint64(i), uint64(i%32)<<20, 1<<20))
	}
	r.write(buf.Bytes())
	// Let the server get stuck (coverage only, not an assertion).
	time.Sleep(100 * time.Millisecond)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("shutdown: %v", err)
		}
	case <-time.After(rawGuard):
		t.Fatal("Shutdown hung past its context")
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve returned %v", err)
	}
	// Once forced, every connection goroutine must actually end.
	ctx2, cancel2 := context.WithTimeout(context.Background(), rawGuard)
	defer cancel2()
	if err := srv.Shutdown(ctx2); err != nil {
		t.Fatalf("connections still running after a forced shutdown: %v", err)
	}
	// And the server refuses to serve again.
	ln2, err := net.Listen("unix", sock+"2")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(context.Background(), ln2); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Shutdown: %v", err)
	}
}

func TestRawShutdownGraceful(t *testing.T) {
	// Shutdown lets requests in flight finish and be answered, then
	// closes idle and negotiating connections.
	const n = 8
	dev := &gatedDevice{testDevice: newTestDevice(1 << 20), gate: make(chan struct{}), entered: make(chan struct{}, n)}
	srv, err := NewServer(ServerConfig{Exports: staticExports{"": {Device: dev}}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(context.Background(), ln)

	busy := rawDialAddr(t, "unix", sock)
	busy.negotiate("", true)
	idle := rawDialAddr(t, "unix", sock)
	idle.negotiate("", false)
	negotiating := rawDialAddr(t, "unix", sock)
	negotiating.greet(clientFlagFixedNewstyle)
	for i := 0; i < n; i++ {
		busy.send(0, CmdRead, uint64(i), uint64(i)*4096, 4096, nil)
	}
	for i := 0; i < n; i++ {
		<-dev.entered
	}
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), rawGuard)
		defer cancel()
		done <- srv.Shutdown(ctx)
	}()
	idle.expectClosed()
	negotiating.expectClosed()
	close(dev.gate)
	reps := busy.repliesUntilClose(n + 1)
	if len(reps) != n {
		t.Fatalf("%d replies, want %d", len(reps), n)
	}
	for _, rep := range reps {
		if rep.errno != 0 || len(rep.data) != 4096 {
			t.Fatalf("reply %+v", rep)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if _, err := net.Dial("unix", sock); err == nil {
		t.Fatal("listener still accepting after Shutdown")
	}
}

func TestRawServeTransmission(t *testing.T) {
	dev := newTestDevice(1 << 20)
	srv, err := NewServer(ServerConfig{Exports: staticExports{}})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	done := make(chan struct{})
	go func() {
		srv.ServeTransmission(context.Background(), b, &Export{Device: dev})
		close(done)
	}()
	r := &rawConn{t: t, c: a, br: bufio.NewReader(a), readLens: map[uint64]uint32{}}
	_ = a.SetDeadline(time.Now().Add(rawGuard))
	r.writeData(0, rawPattern(4096, 6))
	if !bytes.Equal(r.readData(0, 4096), rawPattern(4096, 6)) {
		t.Fatal("read back mismatch")
	}
	r.write(rawRequest(0, CmdDisc, 0, 0, 0))
	r.expectClosed()
	<-done
	if err := srv.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A device that grows under a running connection (expansion under a
// kernel attach, which never renegotiates) accepts requests up to its new
// end.
func TestRawDeviceGrowsUnderConnection(t *testing.T) {
	dev := memory.New(1 << 20)
	srv, err := NewServer(ServerConfig{Exports: staticExports{}})
	if err != nil {
		t.Fatal(err)
	}
	a, b := net.Pipe()
	go srv.ServeTransmission(context.Background(), b, &Export{Device: dev})
	defer srv.Shutdown(context.Background())
	r := &rawConn{t: t, c: a, br: bufio.NewReader(a), readLens: map[uint64]uint32{}}
	_ = a.SetDeadline(time.Now().Add(rawGuard))
	r.send(0, CmdRead, 1, 1<<20, 4096, nil)
	if rep := r.readReply(); rep.errno != EINVAL {
		t.Fatalf("read past the end: errno %d, want EINVAL", rep.errno)
	}
	if err := dev.Resize(context.Background(), 2<<20); err != nil {
		t.Fatal(err)
	}
	r.writeData(1<<20, rawPattern(4096, 7))
	if !bytes.Equal(r.readData(1<<20, 4096), rawPattern(4096, 7)) {
		t.Fatal("read back past the old end mismatch")
	}
}
