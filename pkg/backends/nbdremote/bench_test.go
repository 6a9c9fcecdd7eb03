package nbdremote

import (
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// BenchmarkRead4k compares a 4 KiB read at depth 1 through the backend
// (retry bookkeeping, per-request timeout) with the bare pkg/nbd client,
// both against nbdkit memory.
func BenchmarkRead4k(b *testing.B) {
	k := startNbdkit(b, testserver.FreePort(b), "memory", "64M")
	buf := make([]byte, 4096)
	b.Run("backend", func(b *testing.B) {
		s, _ := backends.Parse(k.uri())
		dev, err := backends.Open(ctx, s, backends.Env{})
		if err != nil {
			b.Fatal(err)
		}
		defer dev.Close()
		b.SetBytes(4096)
		for i := 0; b.Loop(); i++ {
			if err := dev.ReadAt(ctx, buf, uint64(i%16000)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("client", func(b *testing.B) {
		c, err := nbd.Dial(ctx, k.uri(), nbd.ClientConfig{})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		b.SetBytes(4096)
		for i := 0; b.Loop(); i++ {
			if err := c.ReadAt(ctx, buf, uint64(i%16000)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
}
