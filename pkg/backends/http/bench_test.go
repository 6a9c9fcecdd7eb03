package httpdev_test

import (
	"context"
	"crypto/x509"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testpki"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// BenchmarkReadAt measures the backend alone against a local nginx: one
// 4 KiB random read at a time (latency) and 32 at once, and 1 MiB reads.
func BenchmarkReadAt(b *testing.B) {
	ca := testpki.NewCA(b, "bench CA")
	cert, key := ca.Issue(b, "localhost", x509.ExtKeyUsageServerAuth)
	caFile := filepath.Join(b.TempDir(), "ca.pem")
	os.WriteFile(caFile, ca.PEM, 0o600)
	const size = 64 << 20
	data := devtest.RandBytes(size)
	for _, tls := range []bool{false, true} {
		var o testserver.NginxOptions
		spec := ""
		if tls {
			o.CertPEM, o.KeyPEM = cert, key
			spec = "ca=" + caFile + ";"
		}
		n := testserver.StartNginx(b, o)
		n.WriteFile(b, "disk.img", data, mtime)
		dev, err := devtest.TryOpen(spec+n.URL+"/disk.img", backends.Env{})
		if err != nil {
			b.Fatal(err)
		}
		defer dev.Close()
		name := map[bool]string{false: "http", true: "https"}[tls]
		b.Run(name+"/4k", func(b *testing.B) {
			p := make([]byte, 4096)
			b.SetBytes(4096)
			for b.Loop() {
				if err := dev.ReadAt(context.Background(), p, rand.Uint64N(size/4096)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(name+"/4k-parallel", func(b *testing.B) {
			b.SetBytes(4096)
			b.SetParallelism(16)
			b.RunParallel(func(pb *testing.PB) {
				p := make([]byte, 4096)
				for pb.Next() {
					if err := dev.ReadAt(context.Background(), p, rand.Uint64N(size/4096)*4096); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
		b.Run(name+"/1m", func(b *testing.B) {
			p := make([]byte, 1<<20)
			b.SetBytes(1 << 20)
			for b.Loop() {
				if err := dev.ReadAt(context.Background(), p, rand.Uint64N(size/(1<<20))<<20); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
