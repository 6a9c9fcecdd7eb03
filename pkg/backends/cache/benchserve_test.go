package cache

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/cow"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// slowmem: is a test-only backend for hack/bench-filters-cache-cow.sh: a
// memory volume that sleeps `delay` before every read and write, the same
// slow origin as nbdkit's `--filter=delay memory` (used while csi-nbd has
// no nbd: backend to put our filters over nbdkit's origin itself).
func init() {
	backends.Register(backends.Backend{
		Scheme: "slowmem",
		Options: []backends.Option{
			{Key: "size", Kind: backends.OptSize, Default: "64Mi"},
			{Key: "delay", Kind: backends.OptDuration, Default: "5ms"},
		},
		Open: func(_ context.Context, s backends.Spec, _ backends.Env) (backends.Device, error) {
			size, _ := s.Size("size")
			delay, _ := s.Duration("delay")
			return &countDev{Device: memory.New(size), delay: delay}, nil
		},
	})
}

// anySpec opens whatever spec the export name is (test-only: no policy).
type anySpec struct{ pool *backends.Pool }

func (a anySpec) Open(ctx context.Context, name string) (*nbd.Export, func(), error) {
	s, err := backends.Parse(name)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", nbd.ErrUnknownExport, err)
	}
	dev, release, err := a.pool.Acquire(ctx, s)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", nbd.ErrUnknownExport, err)
	}
	return &nbd.Export{Device: dev}, release, nil
}

func (anySpec) List(context.Context) []nbd.ExportInfo { return nil }

// TestServeForBenchmark serves every spec (export name) over slowmem: and
// the registered filters on the unix socket $CSI_NBD_BENCH_SOCK until
// SIGTERM, and with $CSI_NBD_BENCH_HTTP=ADDR a slow HTTP origin there too.
// It is the benchmark script's server, not a test: without the variable it
// skips.
func TestServeForBenchmark(t *testing.T) {
	sock := os.Getenv("CSI_NBD_BENCH_SOCK")
	if sock == "" {
		t.Skip("only for hack/bench-filters-cache-cow.sh (CSI_NBD_BENCH_SOCK unset)")
	}
	pool := backends.NewPool(backends.Env{StateDir: os.Getenv("CSI_NBD_BENCH_STATE")})
	defer pool.Close()
	srv, err := nbd.NewServer(nbd.ServerConfig{Exports: anySpec{pool}})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if addr := os.Getenv("CSI_NBD_BENCH_HTTP"); addr != "" {
		go serveSlowHTTP(t, addr)
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	srv.Serve(ctx, ln)
}

// serveSlowHTTP serves /disk.img ($CSI_NBD_BENCH_MIB MiB of random bytes,
// a strong ETag, ranges) on addr, sleeping $CSI_NBD_BENCH_DELAY before
// every request: one origin both csi-nbd's http backend and nbdkit's curl
// plugin read.
func serveSlowHTTP(t *testing.T, addr string) {
	mib, _ := strconv.Atoi(os.Getenv("CSI_NBD_BENCH_MIB"))
	delay, _ := time.ParseDuration(os.Getenv("CSI_NBD_BENCH_DELAY"))
	img := make([]byte, max(mib, 1)<<20)
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i+8 <= len(img); i += 8 {
		v := r.Uint64()
		for j := range 8 {
			img[i+j] = byte(v >> (8 * j))
		}
	}
	mtime := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(delay)
		w.Header().Set("ETag", `"bench"`)
		http.ServeContent(w, r, "disk.img", mtime, bytes.NewReader(img))
	})
	if err := http.ListenAndServe(addr, h); err != nil {
		t.Error(err)
	}
}
