package cache

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestServeSlowHTTPForBenchmark is hack/bench-filters-cache-cow.sh's
// origin, not a test (without $CSI_NBD_BENCH_HTTP it skips): it serves
// /disk.img ($CSI_NBD_BENCH_MIB MiB of random bytes, a strong ETag,
// ranges) on $CSI_NBD_BENCH_HTTP, sleeping $CSI_NBD_BENCH_DELAY before
// every request, until SIGTERM. csi-nbd's http backend and nbdkit's curl
// plugin read the same one.
func TestServeSlowHTTPForBenchmark(t *testing.T) {
	addr := os.Getenv("CSI_NBD_BENCH_HTTP")
	if addr == "" {
		t.Skip("only for hack/bench-filters-cache-cow.sh (CSI_NBD_BENCH_HTTP unset)")
	}
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
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(delay)
		w.Header().Set("ETag", `"bench"`)
		http.ServeContent(w, r, "disk.img", mtime, bytes.NewReader(img))
	})}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	srv.Serve(ln)
}
