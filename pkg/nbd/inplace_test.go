package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// TestWriteInPlace drives a memory device the way the kernel does (simple
// replies, pipelined requests over a socketpair), so that WRITE payloads
// are read straight into the device's pages, and checks every byte.
func TestWriteInPlace(t *testing.T) {
	const size = 8 << 20
	dev := memory.New(size)
	if _, ok := any(dev).(writeLender); !ok || !dev.Caps().Fast {
		t.Fatal("the memory device no longer takes the write-in-place path this test covers")
	}
	srv, err := NewServer(ServerConfig{Exports: staticExports{}})
	if err != nil {
		t.Fatal(err)
	}
	client, server := socketPair(t)
	done := make(chan struct{})
	go func() {
		srv.ServeTransmission(context.Background(), server, &Export{Device: dev})
		close(done)
	}()
	defer func() { client.Close(); <-done }()

	rng := rand.New(rand.NewPCG(3, 4))
	model := make([]byte, size)
	type op struct {
		typ     uint16
		flags   uint16
		off     uint64
		length  uint32
		payload []byte
		errno   uint32
	}
	var ops []op
	write := func(off uint64, p []byte, flags uint16) {
		ops = append(ops, op{typ: CmdWrite, flags: flags, off: off, length: uint32(len(p)), payload: p})
		copy(model[off:], p)
	}
	noise := func(n int) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.UintN(255) + 1)
		}
		return p
	}
	write(3*4096+512, noise(1<<20), 0) // over many pages, unaligned
	for i := range 64 {                // a queue of small writes
		write(rng.Uint64N(size-4096)&^511, noise(4096), 0)
		if i%16 == 0 {
			write(rng.Uint64N(size-1000), noise(1000), CmdFlagFUA)
		}
	}
	write(0, make([]byte, 200<<10), 0) // zeros over data
	ops = append(ops, op{typ: CmdWrite, off: size - 100, length: 4096, payload: noise(4096), errno: ENOSPC})
	write(size-(1<<20), noise(1<<20), 0) // the stream is still in step
	for off := uint64(0); off < size; off += 1 << 20 {
		ops = append(ops, op{typ: CmdRead, off: off, length: 1 << 20})
	}

	sendErr := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(client, 64<<10)
		for i, o := range ops {
			w.Write(rawRequest(o.flags, o.typ, uint64(i), o.off, o.length))
			if o.payload == nil {
				continue
			}
			// Half, flushed, then the rest: payloads arrive in pieces.
			half := len(o.payload) / 2
			w.Write(o.payload[:half])
			if err := w.Flush(); err != nil {
				sendErr <- err
				return
			}
			w.Write(o.payload[half:])
		}
		sendErr <- w.Flush()
	}()
	br := bufio.NewReader(client)
	got := make([]byte, 0, size)
	for i, o := range ops {
		var rh [simpleReplySize]byte
		if _, err := io.ReadFull(br, rh[:]); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		if m := binary.BigEndian.Uint32(rh[0:]); m != simpleMagic {
			t.Fatalf("reply %d: magic %#x", i, m)
		}
		if c := binary.BigEndian.Uint64(rh[8:]); c != uint64(i) {
			t.Fatalf("reply %d: cookie %d (replies are in order on this path)", i, c)
		}
		if e := binary.BigEndian.Uint32(rh[4:]); e != o.errno {
			t.Fatalf("reply %d: errno %d, want %d", i, e, o.errno)
		}
		if o.typ == CmdRead {
			p := make([]byte, o.length)
			if _, err := io.ReadFull(br, p); err != nil {
				t.Fatal(err)
			}
			got = append(got, p...)
		}
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("data read back differs from what was written")
	}
	var holes uint64
	if err := dev.Extents(context.Background(), 0, 200<<10, func(e backends.Extent) {
		if e.Flags&backends.ExtentHole != 0 {
			holes += e.Length
		}
	}); err != nil {
		t.Fatal(err)
	}
	if holes < 3*65536 {
		t.Errorf("zeros written over whole pages left %d bytes of holes, want at least 3 pages", holes)
	}
}

// panickyLender is a memory device whose write-in-place calls panic.
type panickyLender struct {
	*memory.Device
	inBorrow bool // panic in BorrowWrite (payload unread), else in CommitWrite
}

func (p panickyLender) BorrowWrite(off, length uint64, dst [][]byte) ([][]byte, error) {
	if p.inBorrow {
		panic("borrow")
	}
	return p.Device.BorrowWrite(off, length, dst)
}

func (p panickyLender) CommitWrite(off, length uint64) {
	p.Device.CommitWrite(off, length)
	if !p.inBorrow {
		panic("commit")
	}
}

// A device panicking on the write-in-place path gets an EIO reply and the
// connection stays in step, as on every other path (no dead process under
// a kernel attach).
func TestWriteInPlacePanics(t *testing.T) {
	for _, inBorrow := range []bool{true, false} {
		dev := panickyLender{Device: memory.New(1 << 20), inBorrow: inBorrow}
		srv, err := NewServer(ServerConfig{Exports: staticExports{}})
		if err != nil {
			t.Fatal(err)
		}
		a, b := net.Pipe()
		go srv.ServeTransmission(context.Background(), b, &Export{Device: dev})
		r := &rawConn{t: t, c: a, br: bufio.NewReader(a), readLens: map[uint64]uint32{}}
		_ = a.SetDeadline(time.Now().Add(rawGuard))
		r.send(0, CmdWrite, 7, 4096, 8192, rawPattern(8192, 1))
		if rep := r.readReply(); rep.cookie != 7 || rep.errno != EIO {
			t.Fatalf("inBorrow=%v: reply %+v; want EIO for cookie 7", inBorrow, rep)
		}
		if got := r.readData(0, 512); !bytes.Equal(got, make([]byte, 512)) {
			t.Fatalf("inBorrow=%v: read after the panic differs", inBorrow)
		}
		a.Close()
		srv.Shutdown(context.Background())
	}
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n *int
}

func (c countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	*c.n += n
	return n, err
}

// A bulk payload passes the buffered reader by once what it read ahead is
// used up, whatever the parts it is read in (a write in place reads one
// per device page): only what br had already taken in is copied through
// it. Small payloads still come through br with the requests behind them.
func TestReadPayloadBypassesBuffer(t *testing.T) {
	const bufSize = 128 << 10
	for _, tc := range []struct {
		name        string
		payload     int
		parts       int // the payload is read in parts of this size
		viaBrAtMost int
	}{
		{"1MiB in 64KiB pages", 1 << 20, 64 << 10, bufSize},
		{"1MiB in 4KiB pieces", 1 << 20, 4 << 10, bufSize},
		{"1MiB whole", 1 << 20, 1 << 20, bufSize},
		{"small", 4 << 10, 4 << 10, 4<<10 + 2*32},
	} {
		t.Run(tc.name, func(t *testing.T) {
			payload := make([]byte, tc.payload)
			for i := range payload {
				payload[i] = byte(i*7 + i>>12)
			}
			hdr := bytes.Repeat([]byte{0xa5}, 32)
			stream := append(append(append([]byte{}, hdr...), payload...), hdr...)
			// A socket hands out at most what has arrived: 64 KiB at a time.
			under := &chunkReader{b: stream, max: 64 << 10}
			var viaBr, direct int
			c := &serverConn{
				br:  bufio.NewReaderSize(countingReader{under, &viaBr}, bufSize),
				src: countingReader{under, &direct},
			}
			got := make([]byte, 32)
			if _, err := io.ReadFull(c.br, got); err != nil || !bytes.Equal(got, hdr) {
				t.Fatalf("first header: %v", err)
			}
			dst := make([]byte, tc.payload)
			for off := 0; off < tc.payload; off += tc.parts {
				if err := c.readPayload(dst[off:off+tc.parts], uint64(tc.payload-off)); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(dst, payload) {
				t.Fatal("payload read back differs")
			}
			if _, err := io.ReadFull(c.br, got); err != nil || !bytes.Equal(got, hdr) {
				t.Fatalf("the header after the payload: %v (stream out of step)", err)
			}
			if viaBr > tc.viaBrAtMost {
				t.Errorf("%d bytes went through the buffered reader, want at most %d (direct %d)", viaBr, tc.viaBrAtMost, direct)
			}
		})
	}
}

// chunkReader returns b at most max bytes per Read.
type chunkReader struct {
	b   []byte
	max int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.max)], r.b)
	r.b = r.b[n:]
	return n, nil
}
