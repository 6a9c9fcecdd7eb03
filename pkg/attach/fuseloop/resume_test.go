package fuseloop

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// slowDevice delays writes, so that requests are in flight whenever the
// server is abandoned.
type slowDevice struct {
	backends.Device
	delay time.Duration
}

func (d *slowDevice) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	time.Sleep(d.delay)
	return d.Device.WriteAt(ctx, p, off, fua)
}

// fileWriter writes files with fsync into dir until stopped, recording
// the checksum of every file whose fsync returned.
type fileWriter struct {
	dir     string
	mu      sync.Mutex
	synced  map[string][sha256.Size]byte
	err     error
	written atomic.Int64
	stop    chan struct{}
	done    chan struct{}
}

func startWriter(dir string) *fileWriter {
	w := &fileWriter{dir: dir, synced: map[string][sha256.Size]byte{}, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

func (w *fileWriter) run() {
	defer close(w.done)
	for i := 0; ; i++ {
		select {
		case <-w.stop:
			return
		default:
		}
		data := bytes.Repeat([]byte(fmt.Sprintf("file %d ", i)), 4096+i%7*1000)
		name := filepath.Join(w.dir, fmt.Sprintf("f%05d", i))
		err := os.WriteFile(name, data, 0o600)
		if err == nil {
			var f *os.File
			if f, err = os.Open(name); err == nil {
				err = f.Sync()
				f.Close()
			}
		}
		if err != nil {
			w.mu.Lock()
			w.err = err
			w.mu.Unlock()
			return
		}
		w.mu.Lock()
		w.synced[name] = sha256.Sum256(data)
		w.mu.Unlock()
		w.written.Add(1)
	}
}

func (w *fileWriter) finish(t *testing.T) {
	t.Helper()
	close(w.stop)
	<-w.done
	if w.err != nil {
		t.Fatalf("writer failed: %v", w.err)
	}
}

func (w *fileWriter) verify(t *testing.T) {
	t.Helper()
	for name, sum := range w.synced {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(b) != sum {
			t.Fatalf("%s: content differs from what was fsynced", name)
		}
	}
	t.Logf("%d fsynced files verified", len(w.synced))
}

// waitWritten waits until the writer has fsynced n more files.
func (w *fileWriter) waitWritten(t *testing.T, n int64) {
	t.Helper()
	target := w.written.Load() + n
	waitUntil(t, fmt.Sprintf("%d more files written", n), func() bool {
		w.mu.Lock()
		err := w.err
		w.mu.Unlock()
		if err != nil {
			t.Fatalf("writer failed: %v", err)
		}
		return w.written.Load() >= target
	})
}

// The server goes away without a word while I/O is in flight (its
// readers stop, its answers are dropped, its descriptors closed) but a
// keeper holds the connection; Resume takes over, and the application
// sees a pause, not an error.
func TestResumeInProcess(t *testing.T) {
	requireFuseLoop(t)
	mkfs := testserver.RequireTool(t, "mkfs.ext4")
	dev := &slowDevice{Device: openMemory(t, "size=64Mi;memory:resume"), delay: 2 * time.Millisecond}
	dir := filepath.Join(t.TempDir(), "vol")
	cfg := Config{Name: "disk", Dir: dir, BlockSize: 4096}
	a, err := Attach(context.Background(), dev, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cur := a
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := cur.Detach(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if l := ourLoops(t, dir); len(l) != 0 {
			t.Errorf("loop devices of ours left: %v", l)
		}
		if m, _ := isMountPoint(dir); m {
			t.Errorf("%s still mounted", dir)
		}
	})
	fuseFD, err := a.FuseFD()
	if err != nil {
		t.Fatal(err)
	}
	defer fuseFD.Close()
	loopFD, err := a.LoopFD()
	if err != nil {
		t.Fatal(err)
	}
	defer loopFD.Close()
	init := a.InitRequest()
	path := a.Path()

	run(t, mkfs, "-q", "-F", path)
	mnt := t.TempDir()
	mountExt4(t, path, mnt)
	defer umount(t, mnt)

	w := startWriter(mnt)
	var dropped int64
	for round := range 3 {
		w.waitWritten(t, 20)
		cur.abandon()
		dropped += cur.srv.dropped.Load()
		time.Sleep(200 * time.Millisecond) // the application waits
		start := time.Now()
		b, err := Resume(context.Background(), dev, cfg, ResumeState{FUSE: fuseFD, Loop: loopFD, LoopPath: path, Init: init})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		cur = b
		t.Logf("round %d: resumed in %v", round, time.Since(start))
		if b.Path() != path {
			t.Fatalf("resumed as %s, attached as %s", b.Path(), path)
		}
	}
	// Requests were in flight when the server went: the kernel resent
	// them (or the writer would hang above).
	t.Logf("%d answers dropped by abandoned servers", dropped)
	if dropped == 0 {
		t.Error("no request was in flight when a server was abandoned: the test proves nothing")
	}
	w.waitWritten(t, 20)
	w.finish(t)
	// Drop the page cache: verify what the device holds.
	umount(t, mnt)
	mountExt4(t, path, mnt)
	w.verify(t)
	select {
	case <-cur.Done():
		t.Fatalf("attachment ended: %v", cur.Err())
	default:
	}
}

// Readers start one at a time as the others get busy and stop when
// enough wait: under a load of small direct I/O their number stays near
// the requests in flight. (A reader started but not yet scheduled once
// did not count as waiting, and every read started another: thousands
// of threads within seconds.)
func TestReadersStayBounded(t *testing.T) {
	requireFuseLoop(t)
	dev := openMemory(t, "size=64Mi;memory:readers")
	a := attach(t, dev, Config{Name: "disk", Dir: filepath.Join(t.TempDir(), "vol"), BlockSize: 4096})
	f, err := os.OpenFile(a.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const workers = 16
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := alignedBlock(4096)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				off := int64((w*7919+i*104729)%16384) * 4096
				var err error
				if i%2 == 0 {
					_, err = f.WriteAt(buf, off)
				} else {
					_, err = f.ReadAt(buf, off)
				}
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	most := int32(0)
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		most = max(most, a.srv.readers.Load())
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	t.Logf("at most %d readers for %d concurrent requests", most, workers)
	if most > workers+maxIdle+2 {
		t.Errorf("%d readers for %d requests in flight", most, workers)
	}
}
