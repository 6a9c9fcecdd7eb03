package nbd

// Extended headers (NBD_OPT_EXTENDED_HEADERS): byte-level tests with the
// raw client, and qemu 10 (hack/deps.sh installs it as qemu-*-ext) as the
// real client that negotiates them.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// negotiateExtended takes a fresh connection to transmission on export
// name with extended headers and base:allocation.
func (r *rawConn) negotiateExtended(name string) (size uint64, flags uint16) {
	r.t.Helper()
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	r.askExtended()
	r.setAllocation(name)
	return r.goExtended(name)
}

// askExtended asks for extended headers, which the server must grant.
func (r *rawConn) askExtended() {
	r.t.Helper()
	r.sendOpt(optExtendedHeaders, nil)
	r.expectOptReply(optExtendedHeaders, repAck)
}

// goExtended enters transmission on export name with the extended
// headers already granted.
func (r *rawConn) goExtended(name string) (size uint64, flags uint16) {
	r.t.Helper()
	size, flags, _ = r.goInfo(optGo, name, infoBlockSize)
	r.structured, r.extended = true, true
	return size, flags
}

// doExt sends one extended request with a 64-bit length and reads its one
// reply, which must be an extended chunk echoing the request's offset.
func (r *rawConn) doExt(flags, typ uint16, off, length uint64, payload []byte) rawReply {
	r.t.Helper()
	cookie := uint64(time.Now().UnixNano())
	r.write(append(rawExtRequest(flags, typ, cookie, off, length), payload...))
	rep := r.readReply()
	if !rep.extended || rep.cookie != cookie || rep.reqOffset != off || rep.flags&replyFlagDone == 0 {
		r.t.Fatalf("command %d %d+%d: reply %+v, want one extended chunk with DONE, cookie %#x and offset %d",
			typ, off, length, rep, cookie, off)
	}
	return rep
}

// extDescs decodes an NBD_REPLY_TYPE_BLOCK_STATUS_EXT payload.
func extDescs(t *testing.T, rep rawReply) [][2]uint64 {
	t.Helper()
	if rep.typ != replyTypeBlockStatusExt || len(rep.data) < 24 || (len(rep.data)-8)%16 != 0 {
		t.Fatalf("block status reply type %d, %d bytes: want BLOCK_STATUS_EXT", rep.typ, len(rep.data))
	}
	if id := binary.BigEndian.Uint32(rep.data); id != allocationContextID {
		t.Fatalf("context id %d", id)
	}
	var out [][2]uint64
	for p := rep.data[8:]; len(p) > 0; p = p[16:] {
		out = append(out, [2]uint64{binary.BigEndian.Uint64(p), binary.BigEndian.Uint64(p[8:])})
	}
	if n := binary.BigEndian.Uint32(rep.data[4:]); int(n) != len(out) {
		t.Fatalf("descriptor count %d, %d descriptors", n, len(out))
	}
	return out
}

func TestRawExtendedNegotiation(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}})

	t.Run("options", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		r.sendOpt(optExtendedHeaders, []byte{0})
		r.expectOptReply(optExtendedHeaders, repErrInvalid)
		r.askExtended()
		// Extended headers take precedence over structured replies.
		r.sendOpt(optStructuredReply, nil)
		r.expectOptReply(optStructuredReply, repErrExtHeaderReq)
		// They enable what structured replies do: meta contexts, DF.
		r.setAllocation("")
		if _, flags := r.goExtended(""); flags&FlagSendDF == 0 {
			t.Fatalf("transmission flags %#x lack SEND_DF", flags)
		}
		if rep := r.doExt(0, CmdFlush, 0, 0, nil); rep.typ != replyTypeNone || rep.errno != 0 || len(rep.data) != 0 {
			t.Fatalf("flush: %+v", rep)
		}
	})

	t.Run("after_structured", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		r.sendOpt(optStructuredReply, nil)
		r.expectOptReply(optStructuredReply, repAck)
		r.askExtended()
		r.goExtended("")
		r.doExt(0, CmdFlush, 0, 0, nil)
	})

	t.Run("export_name_forbidden", func(t *testing.T) {
		// NBD_OPT_EXPORT_NAME has no error reply: the server hangs up.
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		r.askExtended()
		r.sendOpt(optExportName, nil)
		r.expectClosed()
	})

	t.Run("compact_request_closes", func(t *testing.T) {
		r := rawDial(t, s)
		r.negotiateExtended("")
		// Two compact requests: the first 32 bytes hold the wrong magic.
		r.write(append(rawRequest(0, CmdFlush, 1, 0, 0), rawRequest(0, CmdFlush, 2, 0, 0)...))
		r.expectClosed()
	})
}

func TestRawExtendedTransmission(t *testing.T) {
	const size = 8 << 30 // sparse: costs what is written
	const gib = 1 << 30
	dev := memory.New(size)
	small := newTestDevice(1 << 20) // through the workers unless NBD_TEST_INLINE
	s := startServer(t, staticExports{"": {Device: dev}, "small": {Device: small}})
	r := rawDial(t, s)
	if sz, _ := r.negotiateExtended(""); sz != size {
		t.Fatalf("size %d", sz)
	}

	// WRITE with NBD_CMD_FLAG_PAYLOAD_LEN, as proto.md has it, and
	// without, as qemu 10 sends it: the payload follows either way.
	at5 := uint64(5 * gib)
	for i, flags := range []uint16{CmdFlagPayloadLen, 0, CmdFlagPayloadLen | CmdFlagFUA} {
		p := rawPattern(65536, byte(i+1))
		if rep := r.doExt(flags, CmdWrite, at5, uint64(len(p)), p); rep.errno != 0 || rep.typ != replyTypeNone || len(rep.data) != 0 {
			t.Fatalf("write flags %#x: %+v", flags, rep)
		}
		rep := r.doExt(0, CmdRead, at5, uint64(len(p)), nil)
		if rep.typ != replyTypeOffsetData || rep.offset != at5 || !bytes.Equal(rep.data, p) {
			t.Fatalf("read back after write flags %#x: type %d offset %d, %d bytes", flags, rep.typ, rep.offset, len(rep.data))
		}
	}
	// An unwritten range reads as a hole chunk; DF is accepted.
	if rep := r.doExt(CmdFlagDF, CmdRead, gib, 4096, nil); rep.typ != replyTypeOffsetHole || rep.offset != gib || len(rep.data) != 4096 {
		t.Fatalf("sparse read: %+v", rep)
	}

	// 64-bit effect lengths: more than 4 GiB in one request.
	if rep := r.doExt(0, CmdBlockStatus, 0, size, nil); fmt.Sprint(extDescs(t, rep)) != fmt.Sprint([][2]uint64{{at5, 3}, {65536, 0}, {size - at5 - 65536, 3}}) {
		t.Fatalf("block status: %v", extDescs(t, rep))
	}
	if got := extDescs(t, r.doExt(CmdFlagReqOne, CmdBlockStatus, 0, size, nil)); fmt.Sprint(got) != fmt.Sprint([][2]uint64{{at5, 3}}) {
		t.Fatalf("block status REQ_ONE: %v", got)
	}
	p := rawPattern(4096, 9)
	r.doExt(CmdFlagPayloadLen, CmdWrite, 7*gib, 4096, p)
	if rep := r.doExt(0, CmdWriteZeroes, 4*gib, 4*gib, nil); rep.errno != 0 { // covers 5 GiB and 7 GiB
		t.Fatalf("write zeroes of 4 GiB: %+v", rep)
	}
	if got := extDescs(t, r.doExt(0, CmdBlockStatus, 0, size, nil)); fmt.Sprint(got) != fmt.Sprint([][2]uint64{{size, 3}}) {
		t.Fatalf("after zeroing 4 GiB: %v, want one 8 GiB hole", got)
	}
	if rep := r.doExt(0, CmdRead, 7*gib, 4096, nil); !bytes.Equal(rep.data, make([]byte, 4096)) {
		t.Fatal("7 GiB still holds data after a 4 GiB write zeroes over it")
	}
	r.doExt(CmdFlagPayloadLen, CmdWrite, 6*gib, 4096, p)
	if rep := r.doExt(0, CmdTrim, gib, 6*gib, nil); rep.errno != 0 || rep.typ != replyTypeNone {
		t.Fatalf("trim of 6 GiB: %+v", rep)
	}
	if rep := r.doExt(0, CmdRead, 6*gib, 4096, nil); !bytes.Equal(rep.data, make([]byte, 4096)) {
		t.Fatal("6 GiB still holds data after a 6 GiB trim over it")
	}
	if rep := r.doExt(0, CmdCache, 0, size, nil); rep.errno != 0 {
		t.Fatalf("cache of the whole 8 GiB: %+v", rep)
	}

	// Errors come as extended error chunks, and the stream stays in step.
	for _, c := range []struct {
		name        string
		flags, typ  uint16
		off, length uint64
		payload     []byte
		want        uint32
	}{
		{"read over the maximum payload", 0, CmdRead, 0, 5 * gib, nil, EINVAL},
		{"effect length past the end", 0, CmdTrim, gib, size, nil, EINVAL},
		{"offset and length wrap around", 0, CmdWriteZeroes, 1 << 63, 1 << 63, nil, ENOSPC},
		{"trim with a payload", CmdFlagPayloadLen, CmdTrim, 0, 100, rawPattern(100, 3), EINVAL},
		{"block status with a payload", CmdFlagPayloadLen, CmdBlockStatus, 0, 8, rawPattern(8, 4), EINVAL},
		{"flush with a length", 0, CmdFlush, 0, 4096, nil, EINVAL},
		{"unknown flag", 1 << 9, CmdRead, 0, 4096, nil, EINVAL},
	} {
		rep := r.doExt(c.flags, c.typ, c.off, c.length, c.payload)
		if rep.typ != replyTypeError || rep.errno != c.want || rep.msg == "" {
			t.Fatalf("%s: %+v, want an error chunk with errno %d and a message", c.name, rep, c.want)
		}
		if rep := r.doExt(0, CmdRead, at5, 16, nil); rep.errno != 0 || len(rep.data) != 16 {
			t.Fatalf("after %s: the next request got %+v", c.name, rep)
		}
	}

	// The worker path answers in the same form.
	r2 := rawDial(t, s)
	r2.negotiateExtended("small")
	q := rawPattern(8192, 7)
	r2.doExt(0, CmdWrite, 4096, uint64(len(q)), q)
	if rep := r2.doExt(0, CmdRead, 4096, uint64(len(q)), nil); !bytes.Equal(rep.data, q) {
		t.Fatalf("small export read back: %+v", rep)
	}
	if got := extDescs(t, r2.doExt(0, CmdBlockStatus, 0, 1<<20, nil)); len(got) != 3 || got[1] != [2]uint64{8192, 0} {
		t.Fatalf("small export block status: %v", got)
	}
	r2.write(rawExtRequest(0, CmdDisc, 1, 0, 0))
	r2.expectClosed()

	// A payload over the advertised maximum ends the connection
	// (proto.md: SHOULD hard disconnect) without a reply.
	r.write(rawExtRequest(CmdFlagPayloadLen, CmdWrite, 1, 0, DefaultMaxPayload+1))
	r.expectClosed()
}

// FuzzExtendedRequests is FuzzRequests after negotiating extended headers.
func FuzzExtendedRequests(f *testing.F) {
	b := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	b = append(b, optBytes(optExtendedHeaders, nil)...)
	b = append(b, optBytes(optSetMetaContext, rawMetaPayload("", AllocationContext))...)
	pre := append(b, optBytes(optGo, rawGoPayload("", infoBlockSize))...)
	add := seeder(f)
	add(rawExtRequest(0, CmdRead, 1, 0, 4096))
	add(rawExtRequest(CmdFlagPayloadLen|CmdFlagFUA, CmdWrite, 2, 4096, 8), []byte("abcdefgh"))
	add(rawExtRequest(0, CmdWrite, 3, 0, 4), []byte("abcd"))
	add(rawExtRequest(CmdFlagReqOne, CmdBlockStatus, 4, 0, 1<<40))
	add(rawExtRequest(CmdFlagPayloadLen, CmdBlockStatus, 5, 0, 8), []byte{0, 0, 0, 1, 0, 0, 0, 1})
	add(rawExtRequest(CmdFlagFastZero, CmdWriteZeroes, 6, 0, 1<<33), rawExtRequest(0, CmdTrim, 7, 0, 1<<20))
	add(rawExtRequest(CmdFlagPayloadLen, CmdTrim, 8, 0, 3), []byte("xyz"), rawExtRequest(0, CmdDisc, 9, 0, 0))
	add(rawExtRequest(CmdFlagPayloadLen, CmdWrite, 10, 0, 1<<40))
	add(rawRequest(0, CmdRead, 11, 0, 4096))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzServe(t, append(pre[:len(pre):len(pre)], data...))
	})
}

// TestQemuExtendedHeaders runs qemu 10, whose NBD client asks for
// extended headers first, against the server: I/O, zeroing, discard,
// 64-bit block status, and a whole-image copy and compare.
func TestQemuExtendedHeaders(t *testing.T) {
	requireTool(t, "qemu-io-ext")
	requireTool(t, "qemu-img-ext")
	const size = 6 << 30
	dev := memory.New(size)
	s := startServer(t, staticExports{"": {Device: dev}})
	full := bytes.Repeat([]byte{0x5a}, 1<<20)
	dev.WriteAt(context.Background(), full, 5<<30, false)

	out := run(t, "qemu-io-ext", "-f", "raw", "--trace", "nbd_receive_option_reply",
		"--trace", "nbd_receive_reply_chunk_header",
		"-c", "write -P 0xab 0 1M",
		"-c", "write -z 1M 1M",
		"-c", "discard 2M 1M",
		"-c", "read -P 0xab 0 1M",
		"-c", "read -P 0 1M 2M",
		"-c", "read -P 0x5a 5G 1M",
		"-c", "write -P 0xcd -f 5G 4k", // FUA
		"-c", "flush",
		s.uri(""))
	if !strings.Contains(out, "(extended headers), type 1 (ack)") {
		t.Fatalf("qemu did not negotiate extended headers:\n%s", out)
	}
	for _, bad := range []string{"error", "failed", "Pattern verification"} {
		if strings.Contains(strings.ToLower(out), strings.ToLower(bad)) {
			t.Fatalf("qemu-io reported %q:\n%s", bad, out)
		}
	}
	got := make([]byte, 3<<20)
	dev.ReadAt(context.Background(), got, 0)
	want := append(bytes.Repeat([]byte{0xab}, 1<<20), make([]byte, 2<<20)...)
	if !bytes.Equal(got, want) {
		t.Fatal("device content wrong after qemu-io")
	}
	dev.ReadAt(context.Background(), got[:4097], 5<<30)
	if !bytes.Equal(got[:4096], bytes.Repeat([]byte{0xcd}, 4096)) || got[4096] != 0x5a {
		t.Fatal("FUA write at 5 GiB wrong")
	}
	if out, err := runErr(t, "qemu-io-ext", "-f", "raw", "-c", "read -P 0xab 1M 4k", s.uri("")); err == nil && !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io did not notice a wrong pattern:\n%s", out)
	}

	// qemu-img map asks block status over the whole 6 GiB: the 5 GiB
	// hole in the middle comes back as one 64-bit extent.
	out = run(t, "qemu-img-ext", "--trace", "nbd_receive_reply_chunk_header", "map", "--output=json", "-f", "raw", s.uri(""))
	if !strings.Contains(out, "type = 6") {
		t.Fatalf("no BLOCK_STATUS_EXT chunk in qemu-img map's trace:\n%s", out)
	}
	var m []struct {
		Start  uint64 `json:"start"`
		Length uint64 `json:"length"`
		Data   bool   `json:"data"`
	}
	out = run(t, "qemu-img-ext", "map", "--output=json", "-f", "raw", s.uri(""))
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for i := 1; i < len(m); i++ { // qemu may split where the answer did not
		if m[i].Data == m[i-1].Data && m[i-1].Start+m[i-1].Length == m[i].Start {
			m[i-1].Length += m[i].Length
			m = append(m[:i], m[i+1:]...)
			i--
		}
	}
	wantMap := "[{0 1048576 true} {1048576 5367660544 false} {5368709120 1048576 true} {5369757696 1072693248 false}]"
	if fmt.Sprint(m) != wantMap {
		t.Fatalf("qemu-img map: %v, want %v", m, wantMap)
	}

	// A whole image through extended-header writes and back.
	src := filepath.Join(t.TempDir(), "src.img")
	img := make([]byte, 8<<20)
	for i := range img {
		img[i] = byte(i * 31 >> 9)
	}
	if err := os.WriteFile(src, img, 0o644); err != nil {
		t.Fatal(err)
	}
	dev2 := memory.New(8 << 20)
	s2 := startServer(t, staticExports{"disk": {Device: dev2}})
	run(t, "qemu-img-ext", "convert", "-n", "-f", "raw", "-O", "raw", src, s2.uri("disk"))
	back := make([]byte, len(img))
	dev2.ReadAt(context.Background(), back, 0)
	if !bytes.Equal(back, img) {
		t.Fatal("device differs after qemu-img convert")
	}
	if out := run(t, "qemu-img-ext", "compare", "-f", "raw", "-F", "raw", src, s2.uri("disk")); !strings.Contains(out, "identical") {
		t.Fatalf("compare: %s", out)
	}
	dev2.WriteAt(context.Background(), []byte{0xff}, 3<<20+7, false)
	if out, err := runErr(t, "qemu-img-ext", "compare", "-f", "raw", "-F", "raw", src, s2.uri("disk")); err == nil {
		t.Fatalf("compare missed a difference: %s", out)
	}
}
