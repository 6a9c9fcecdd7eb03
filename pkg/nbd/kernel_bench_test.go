package nbd

import (
	"context"
	"math/rand/v2"
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
	benchPipeline(b, dev, cmd, size, depth, fill[:size])
}

func BenchmarkKernelRead4KQD1(b *testing.B)   { benchKernel(b, CmdRead, 4096, 1) }
func BenchmarkKernelRead4KQD32(b *testing.B)  { benchKernel(b, CmdRead, 4096, 32) }
func BenchmarkKernelWrite4KQD32(b *testing.B) { benchKernel(b, CmdWrite, 4096, 32) }
func BenchmarkKernelWrite1MQD8(b *testing.B)  { benchKernel(b, CmdWrite, 1<<20, 8) }

// Large reads go to the socket by reference (give.go).
func BenchmarkKernelRead1MQD8(b *testing.B) { benchKernel(b, CmdRead, 1<<20, 8) }
