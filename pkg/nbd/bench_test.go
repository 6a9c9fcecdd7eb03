package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// socketPair returns two connected unix stream sockets, the transport the
// node plugin uses to hand a connection to the kernel.
func socketPair(tb testing.TB) (net.Conn, net.Conn) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	conv := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close() // FileConn dups the descriptor
		c, err := net.FileConn(f)
		if err != nil {
			tb.Fatal(err)
		}
		return c
	}
	return conv(fds[0]), conv(fds[1])
}

// benchTransmission measures the server's request path with no handshake:
// a pipelining raw client keeps depth requests in flight.
func benchTransmission(b *testing.B, cmd uint16, size uint32, depth int) {
	for _, inline := range []bool{false, true} {
		name := "workers"
		if inline {
			name = "inline"
		}
		b.Run(name, func(b *testing.B) { benchTransmissionPath(b, cmd, size, depth, inline) })
	}
}

func benchTransmissionPath(b *testing.B, cmd uint16, size uint32, depth int, inline bool) {
	dev := newTestDevice(64 << 20)
	dev.caps.Fast = inline
	benchPipeline(b, dev, cmd, size, depth, make([]byte, size))
}

// benchPipeline serves dev over a socketpair with no handshake and keeps
// depth simple-reply requests of size bytes in flight, b.N in all; a WRITE
// sends payload. Besides wall time it reports CPU time per request.
func benchPipeline(b *testing.B, dev backends.Device, cmd uint16, size uint32, depth int, payload []byte) {
	srv, err := NewServer(ServerConfig{Exports: staticExports{}})
	if err != nil {
		b.Fatal(err)
	}
	client, server := socketPair(b)
	done := make(chan struct{})
	go func() {
		srv.ServeTransmission(context.Background(), server, &Export{Device: dev})
		close(done)
	}()
	defer func() { client.Close(); <-done }()

	blocks := dev.Size() / uint64(size)
	hdr := make([]byte, requestHeaderSize)
	w := bufio.NewWriterSize(client, 4<<20)
	send := func(i int) {
		binary.BigEndian.PutUint32(hdr[0:], requestMagic)
		binary.BigEndian.PutUint16(hdr[4:], 0)
		binary.BigEndian.PutUint16(hdr[6:], cmd)
		binary.BigEndian.PutUint64(hdr[8:], uint64(i))
		binary.BigEndian.PutUint64(hdr[16:], (uint64(i)*7919%blocks)*uint64(size))
		binary.BigEndian.PutUint32(hdr[24:], size)
		w.Write(hdr)
		if cmd == CmdWrite {
			w.Write(payload)
		}
	}
	br := bufio.NewReaderSize(client, 4<<20)
	rhdr := make([]byte, simpleReplySize)
	rbuf := make([]byte, size)
	recv := func() {
		if _, err := io.ReadFull(br, rhdr); err != nil {
			b.Fatal(err)
		}
		if e := binary.BigEndian.Uint32(rhdr[4:]); e != 0 {
			b.Fatalf("error %d", e)
		}
		if cmd == CmdRead {
			if _, err := io.ReadFull(br, rbuf); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	sent := 0
	for ; sent < depth && sent < b.N; sent++ {
		send(sent)
	}
	w.Flush()
	for n := 0; n < b.N; n++ {
		recv()
		if sent < b.N {
			send(sent)
			sent++
		}
		if br.Buffered() == 0 {
			w.Flush()
		}
	}
	b.StopTimer()
	// CPU time (client included) is steadier than wall time on a loaded
	// machine, and what a VM with few CPUs pays for.
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
	w.Write(rawRequest(0, CmdDisc, 0, 0, 0))
	w.Flush()
}

// cpuTime is the process's user and system time in nanoseconds.
func cpuTime() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

func BenchmarkRead4KDepth1(b *testing.B)   { benchTransmission(b, CmdRead, 4096, 1) }
func BenchmarkRead4KDepth32(b *testing.B)  { benchTransmission(b, CmdRead, 4096, 32) }
func BenchmarkWrite4KDepth32(b *testing.B) { benchTransmission(b, CmdWrite, 4096, 32) }
func BenchmarkRead1MDepth8(b *testing.B)   { benchTransmission(b, CmdRead, 1<<20, 8) }
func BenchmarkWrite1MDepth8(b *testing.B)  { benchTransmission(b, CmdWrite, 1<<20, 8) }
