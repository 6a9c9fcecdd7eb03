package cache

import (
	"context"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/file"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// The kill -9 test end to end: `csi-nbd serve` (the real binary) serves
// cache=writeback over the file backend; an NBD client writes slots from
// several goroutines, pipelined, noting each write as it begins and once
// the server acknowledged it; the server is killed with SIGKILL mid-stream;
// the same spec reopened must show every acknowledged write, and so must
// the file once the cache is closed.
func TestServeKill9LosesNoAcknowledgedWrite(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs csi-nbd")
	}
	dir := t.TempDir()
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(dir, "csi-nbd")
	if out, err := exec.Command(goTool, "build", "-o", bin, "github.com/csi-nbd/csi-nbd/cmd/csi-nbd").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	spec := "cache=writeback,cache-block=16Ki,cache-size=2Mi,cache-dir=" + filepath.Join(dir, "cache") +
		",size=64Mi;file://" + filepath.Join(dir, "backend.img")
	sock := filepath.Join(dir, "nbd.sock")
	srv := exec.Command(bin, "serve", "--listen", "unix://"+sock, spec)
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer srv.Process.Kill()
	var conn net.Conn
	for range 200 {
		if conn, err = net.Dial("unix", sock); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := nbd.NewClient(ctx, conn, nbd.ClientConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	var mu sync.Mutex
	begun, acked := map[int]bool{}, map[int]bool{}
	killAt := crashSlots / 5
	var once sync.Once
	order := rand.New(rand.NewPCG(7, 7)).Perm(crashSlots)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(order); i += 8 {
				s := order[i]
				off, p := crashWrite(s)
				mu.Lock()
				begun[s] = true
				mu.Unlock()
				var flags uint16
				if s%16 == 0 {
					flags = nbd.CmdFlagFUA
				}
				if err := c.WriteAt(ctx, p, off, flags); err != nil {
					return // the server is gone
				}
				mu.Lock()
				acked[s] = true
				n := len(acked)
				mu.Unlock()
				if n >= killAt {
					once.Do(func() { srv.Process.Signal(syscall.SIGKILL) })
				}
				if s%64 == 1 {
					if err := c.Flush(ctx); err != nil {
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	srv.Wait()
	if len(acked) < killAt || len(acked) == crashSlots {
		t.Fatalf("%d of %d writes acknowledged: the kill did not land mid-stream", len(acked), crashSlots)
	}
	t.Logf("killed after %d acknowledged writes, %d in flight", len(acked), len(begun)-len(acked))

	dev, err := devtest.TryOpen(spec, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	checkCrashImage(t, "reopened volume", devtest.ReadAll(t, dev, 0, crashSize), begun, acked)
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(filepath.Join(dir, "backend.img"))
	if err != nil {
		t.Fatal(err)
	}
	checkCrashImage(t, "backend file after close", img, begun, acked)
}
