package attach

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/attach/fuseloop"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/file"
	"github.com/csi-nbd/csi-nbd/pkg/fdstore"
)

func requireFuseLoop(t *testing.T) {
	t.Helper()
	if err := fuseloop.Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("FUSE+loop is required in CI: %v", err)
		}
		t.Skip(err)
	}
}

// startFDStore runs an fd store in-process; stop ends it (closing what it
// holds, as when its container goes).
func startFDStore(t *testing.T) (sock string, stop func()) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "fds.sock")
	l, err := fdstore.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := fdstore.NewServer()
	done := make(chan struct{})
	go func() { s.Serve(l); close(done) }()
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			l.Close()
			<-done
			s.Close()
		}
	}
	t.Cleanup(stop)
	return sock, stop
}

func writeThrough(t *testing.T, path string, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func readThrough(t *testing.T, path string, n int, off int64) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func newLoopManager(t *testing.T, stateDir, sock string) *Manager {
	t.Helper()
	m, err := NewManager(stateDir, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	m.FDStore = sock
	m.openKernel = func(context.Context) (kernel, error) { return nil, ErrNoNBD }
	return m
}

// With an fd store, Close leaves a FUSE+loop volume attached and a new
// Manager resumes it in place; Detach then releases everything.
func TestFuseLoopResumeWithFDStore(t *testing.T) {
	requireFuseLoop(t)
	ctx := ctxT(t)
	sock, _ := startFDStore(t)
	stateDir := t.TempDir()
	spec := "size=16Mi;file://" + filepath.Join(t.TempDir(), "disk.img")

	m1 := newLoopManager(t, stateDir, sock)
	path, err := m1.Attach(ctx, "v", spec, nil, Options{Fallback: FallbackAlways})
	if err != nil {
		t.Fatal(err)
	}
	want := pattern(4096, 7)
	writeThrough(t, path, want, 4096)
	names, err := (&fdstore.Client{Socket: sock}).List(ctx)
	if err != nil || len(names) != 2 {
		t.Fatalf("fd store holds %q (%v), want the /dev/fuse and loop descriptors", names, err)
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	// Still attached, nobody serving: I/O would wait. The loop stays
	// though nobody has it open.
	if _, err := os.Stat("/sys/block/" + filepath.Base(path) + "/loop/backing_file"); err != nil {
		t.Fatalf("%s detached after Close: %v", path, err)
	}

	m2 := newLoopManager(t, stateDir, sock)
	defer m2.Close()
	vols, err := m2.Resume(ctx)
	if err != nil || len(vols) != 1 || vols[0].Path != path || vols[0].Kind != KindFuseLoop {
		t.Fatalf("Resume = %+v, %v; want %s back", vols, err, path)
	}
	if got := readThrough(t, path, len(want), 4096); !bytes.Equal(got, want) {
		t.Fatal("data written before the restart reads back differently")
	}
	writeThrough(t, path, pattern(4096, 8), 8192)
	if err := m2.Health("v"); err != nil {
		t.Fatal(err)
	}
	if err := m2.Detach(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if names, err := (&fdstore.Client{Socket: sock}).List(ctx); err != nil || len(names) != 0 {
		t.Fatalf("fd store after Detach: %q, %v", names, err)
	}
	if b, err := os.ReadFile("/sys/block/" + filepath.Base(path) + "/loop/backing_file"); err == nil && bytes.Contains(b, []byte(stateDir)) {
		t.Fatalf("%s still attached to %s", path, b)
	}
	if ents, _ := os.ReadDir(m2.fuseDir("v")); len(ents) != 0 {
		t.Fatalf("FUSE file system still mounted: %v", ents)
	}
}

// When the store went too, Resume cannot re-serve: it says so and cleans
// up as without a store.
func TestFuseLoopResumeStoreLost(t *testing.T) {
	requireFuseLoop(t)
	ctx := ctxT(t)
	sock, stopStore := startFDStore(t)
	stateDir := t.TempDir()

	m1 := newLoopManager(t, stateDir, sock)
	path, err := m1.Attach(ctx, "v", "size=8Mi;memory:lost", nil, Options{Fallback: FallbackAlways})
	if err != nil {
		t.Fatal(err)
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	stopStore()

	sock2, _ := startFDStore(t)
	m2 := newLoopManager(t, stateDir, sock2)
	defer m2.Close()
	vols, err := m2.Resume(ctx)
	if len(vols) != 0 || err == nil {
		t.Fatalf("Resume = %+v, %v; want an error", vols, err)
	}
	t.Log(err)
	if _, err := os.Stat(m2.st.recordPath("v")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record kept: %v", err)
	}
	eventually(t, "the loop detached", func() bool {
		b, err := os.ReadFile("/sys/block/" + filepath.Base(path) + "/loop/backing_file")
		return err != nil || !bytes.Contains(b, []byte(stateDir))
	})
}
