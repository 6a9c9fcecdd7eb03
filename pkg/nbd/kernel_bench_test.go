package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"syscall"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// benchKernel measures what the kernel's nbd driver does to an attached
// memory volume: simple replies only, depth requests pipelined over a
// socketpair, the device a real memory backend (Caps.Fast, a Lender)
// already written through so that pages exist, as in a filesystem.
func benchKernel(b *testing.B, cmd uint16, size uint32, depth int) {
	const volume = 256 << 20
	dev := memory.New(volume)
	fill := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range fill {
		fill[i] = byte(rng.Uint32() | 1)
	}
	for off := uint64(0); off < volume; off += uint64(len(fill)) {
		if err := dev.WriteAt(context.Background(), fill, off, false); err != nil {
			b.Fatal(err)
		}
	}
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

	payload := fill[:size]
	blocks := uint64(volume) / uint64(size)
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
	w.Write(reqBytes(0, CmdDisc, 0, 0, 0))
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

func BenchmarkKernelRead4KQD1(b *testing.B)   { benchKernel(b, CmdRead, 4096, 1) }
func BenchmarkKernelRead4KQD32(b *testing.B)  { benchKernel(b, CmdRead, 4096, 32) }
func BenchmarkKernelWrite4KQD32(b *testing.B) { benchKernel(b, CmdWrite, 4096, 32) }
func BenchmarkKernelWrite1MQD8(b *testing.B)  { benchKernel(b, CmdWrite, 1<<20, 8) }
