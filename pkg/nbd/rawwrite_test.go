package nbd

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// writeRaw writes every byte of many buffers, empty ones and more than
// one writev takes among them, in order, through partial writes and waits
// for a reader slower than the writer.
func TestWriteRaw(t *testing.T) {
	client, server := socketPair(t)
	defer client.Close()
	defer server.Close()
	rc, err := server.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var rw replyWriter
	rw.useRaw(rc)

	rng := rand.New(rand.NewPCG(7, 8))
	var want []byte
	var bufs [][]byte
	for len(bufs) < 3*rawMaxIov {
		n := []int{0, 1, 16, 4096, 100_000, 3 << 20}[rng.IntN(6)]
		if len(want) > 24<<20 {
			n = rng.IntN(64)
		}
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		bufs = append(bufs, b)
		want = append(want, b...)
	}

	got := make(chan []byte)
	go func() {
		var out bytes.Buffer
		p := make([]byte, 64<<10)
		for {
			time.Sleep(50 * time.Microsecond) // slower than the writer
			n, err := client.Read(p)
			out.Write(p[:n])
			if err != nil {
				got <- out.Bytes()
				return
			}
		}
	}()
	if err := rw.writeRaw(bufs); err != nil {
		t.Fatal(err)
	}
	server.Close()
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("read back %d bytes, differing from the %d written", len(b), len(want))
	}

	// A closed peer is an error, not a hang.
	c2, s2 := socketPair(t)
	defer s2.Close()
	c2.Close()
	rc2, _ := s2.(*net.UnixConn).SyscallConn()
	var rw2 replyWriter
	rw2.useRaw(rc2)
	if err := rw2.writeRaw([][]byte{make([]byte, 8<<20)}); err == nil {
		t.Fatal("writing to a closed peer succeeded")
	}
}

// Large reads of a memory volume over TCP leave the server as vectors
// of its pages, far more than one writev takes, through a socket buffer
// smaller than one reply; every byte must arrive, also with several in
// flight.
func TestRawLargeReadsTCP(t *testing.T) {
	const size = 64 << 20
	s := startServer(t, staticExports{"": {Device: memory.New(size)}})
	ctx := context.Background()
	c, err := Dial(ctx, "nbd://"+s.tcp+"/", ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(9, 10))
	for i := range model {
		model[i] = byte(rng.Uint32())
	}
	for off := 0; off < size; off += 4 << 20 {
		if err := c.WriteAt(ctx, model[off:off+4<<20], uint64(off), 0); err != nil {
			t.Fatal(err)
		}
	}
	big := make([]byte, DefaultMaxPayload)
	if err := c.ReadAt(ctx, big, 4096*3+512); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(big, model[4096*3+512:][:len(big)]) {
		t.Fatal("a 32 MiB read differs from what was written")
	}
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			b := make([]byte, 5<<20)
			off := uint64(i)*7<<20 + 1
			if err := c.ReadAt(ctx, b, off); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(b, model[off:off+uint64(len(b))]) {
				errs <- io.ErrUnexpectedEOF
				return
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal("concurrent large read:", err)
		}
	}
}
