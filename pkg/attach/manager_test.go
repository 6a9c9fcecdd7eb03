package attach

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/cache"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// "attachtest:NAME" is a memory volume that outlives its opener, like a
// file or a remote volume does: what a restart test needs.
var (
	persistMu sync.Mutex
	persisted = map[string]*memory.Device{}
)

type persistentDev struct {
	*memory.Device
	buffered bool
}

func (persistentDev) Close() error { return nil }

// Caps: unlike a plain memory volume, this one outlives its process;
// "attachtest:buffered-…" volumes claim a write-back buffer in memory.
func (d persistentDev) Caps() backends.Caps {
	c := d.Device.Caps()
	c.Volatile = false
	c.BufferedWrites = d.buffered
	return c
}

func init() {
	backends.Register(backends.Backend{
		Scheme:  "attachtest",
		Doc:     "test volume that survives Close",
		Options: []backends.Option{{Key: "size", Kind: backends.OptSize, Default: "16Mi"}},
		Open: func(_ context.Context, s backends.Spec, env backends.Env) (backends.Device, error) {
			if want, ok := s.Value("size"); ok && want == "13Mi" && env.Secrets["token"] != "s3cret" {
				return nil, errors.New("attachtest: secret missing")
			}
			size, _ := s.Size("size")
			persistMu.Lock()
			defer persistMu.Unlock()
			d := persisted[s.URL]
			if d == nil {
				d = memory.New(size)
				persisted[s.URL] = d
			}
			return persistentDev{d, strings.HasPrefix(s.URL, "attachtest:buffered-")}, nil
		},
	})
}

func newTestManager(t *testing.T, dir string, k *fakeKernel) *Manager {
	t.Helper()
	m, err := NewManager(dir, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	m.openKernel = func(context.Context) (kernel, error) { return k, nil }
	m.loop = nil
	t.Cleanup(func() { m.Close() })
	return m
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// eventually polls cond until it holds (the watcher works asynchronously).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAttachServesKernelSockets(t *testing.T) {
	k := newFakeKernel()
	m := newTestManager(t, t.TempDir(), k)
	ctx := ctxT(t)
	path, err := m.Attach(ctx, "vol-a", "size=8Mi;memory:a", nil, Options{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	if path != "/dev/nbd0" {
		t.Fatalf("path %q", path)
	}
	cfg := k.devs[0].cfg
	if cfg.Size != 8<<20 || cfg.BackendIdentifier != "vol-a" || cfg.DeadConnTimeout != DefaultDeadConnTimeout ||
		cfg.Timeout != DefaultTimeout || cfg.Index != -1 || cfg.BlockSize != 512 {
		t.Fatalf("connect config %+v", cfg)
	}
	if cfg.ServerFlags&(1<<8) == 0 || cfg.ServerFlags&(1<<5) == 0 || cfg.ServerFlags&(1<<1) != 0 {
		t.Fatalf("server flags %#x: want multi-conn and trim, writable", cfg.ServerFlags)
	}
	// What one connection writes, the other reads: one device behind both.
	data := pattern(64<<10, 3)
	k.sock(t, 0, 0).write(t, 4096, data)
	k.sock(t, 0, 0).flush(t)
	if got := k.sock(t, 0, 1).read(t, 4096, uint32(len(data))); !bytes.Equal(got, data) {
		t.Fatal("read through the second connection differs")
	}
	if err := m.Health("vol-a"); err != nil {
		t.Fatal(err)
	}
	if l := m.List(); len(l) != 1 || l[0].Path != path || l[0].Kind != KindNBD || l[0].Spec != "size=8Mi;memory:a" {
		t.Fatalf("List %+v", l)
	}
}

func TestAttachIdempotentAndRecorded(t *testing.T) {
	k := newFakeKernel()
	dir := t.TempDir()
	m := newTestManager(t, dir, k)
	ctx := ctxT(t)
	secrets := map[string]string{"token": "s3cret"}
	p1, err := m.Attach(ctx, "pvc-1", "size=13Mi;attachtest:idem", secrets, Options{})
	if err != nil {
		t.Fatal(err)
	}
	p2, err := m.Attach(ctx, "pvc-1", "size=13Mi;attachtest:idem", secrets, Options{})
	if err != nil || p2 != p1 {
		t.Fatalf("second attach: %q, %v; want %q", p2, err, p1)
	}
	if len(k.devs) != 1 {
		t.Fatalf("%d kernel devices, want 1", len(k.devs))
	}
	if _, err := m.Attach(ctx, "pvc-1", "size=8Mi;attachtest:other", nil, Options{}); err == nil {
		t.Fatal("same ID with another spec accepted")
	}
	rec, err := os.ReadFile(m.st.recordPath("pvc-1"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(rec), "s3cret") {
		t.Fatal("the record holds a secret")
	}
	var r record
	if err := json.Unmarshal(rec, &r); err != nil || r.Index != 0 || r.Path != p1 || r.Kind != KindNBD || r.PID != os.Getpid() || !r.HasSecrets {
		t.Fatalf("record %+v, %v", r, err)
	}
	st, err := os.Stat(m.st.secretsPath("pvc-1"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("secrets file: %v, %v", st, err)
	}
	id, pid, err := FindByPath(dir, p1)
	if err != nil || id != "pvc-1" || pid != os.Getpid() {
		t.Fatalf("FindByPath: %q %d %v", id, pid, err)
	}
}

// The restart path: a new process (Manager) re-opens the volume and
// hands the kernel fresh sockets; what was written before is there.
func TestResumeAfterRestart(t *testing.T) {
	k := newFakeKernel()
	dir := t.TempDir()
	ctx := ctxT(t)
	m1 := newTestManager(t, dir, k)
	secrets := map[string]string{"token": "s3cret"}
	path, err := m1.Attach(ctx, "pvc-r", "size=13Mi;attachtest:restart", secrets, Options{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(128<<10, 9)
	k.sock(t, 0, 1).write(t, 1<<20, data)
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	k.serverDied(0)

	m2 := newTestManager(t, dir, k)
	vols, err := m2.Resume(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 1 || vols[0].Path != path || vols[0].ID != "pvc-r" {
		t.Fatalf("resumed %+v", vols)
	}
	if n := len(k.reconfig); n != 1 || k.reconfig[0].BackendIdentifier != "pvc-r" || len(k.reconfig[0].Sockets) != 2 {
		t.Fatalf("reconfigure calls %+v", k.reconfig)
	}
	if k.liveSocks(0) != 2 {
		t.Fatalf("%d live sockets after resume, want 2", k.liveSocks(0))
	}
	for i := 0; i < 2; i++ {
		if got := k.sock(t, 0, i).read(t, 1<<20, uint32(len(data))); !bytes.Equal(got, data) {
			t.Fatalf("connection %d after resume: data differs", i)
		}
	}
	if err := m2.Health("pvc-r"); err != nil {
		t.Fatal(err)
	}
	// Resuming again is a no-op for volumes already served.
	if vols, err := m2.Resume(ctx); err != nil || len(vols) != 1 || len(k.reconfig) != 1 {
		t.Fatalf("second resume: %+v, %v, %d reconfigures", vols, err, len(k.reconfig))
	}
}

func TestResumeForgetsVanishedDevices(t *testing.T) {
	k := newFakeKernel()
	dir := t.TempDir()
	ctx := ctxT(t)
	m1 := newTestManager(t, dir, k)
	if _, err := m1.Attach(ctx, "gone", "attachtest:gone", nil, Options{}); err != nil {
		t.Fatal(err)
	}
	m1.Close()
	k.devs[0].connected = false // torn down by its dead-connection timeout
	m2 := newTestManager(t, dir, k)
	vols, err := m2.Resume(ctx)
	if err == nil || len(vols) != 0 {
		t.Fatalf("resume of a vanished device: %+v, %v", vols, err)
	}
	if _, err := os.Stat(m2.st.recordPath("gone")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record kept: %v", err)
	}
}

func TestDetach(t *testing.T) {
	k := newFakeKernel()
	m := newTestManager(t, t.TempDir(), k)
	ctx := ctxT(t)
	if _, err := m.Attach(ctx, "d", "memory:d", nil, Options{Connections: 3}); err != nil {
		t.Fatal(err)
	}
	done := m.Done("d")
	if err := m.Detach(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	default:
		t.Fatal("Done not closed after Detach")
	}
	if k.devs[0].connected {
		t.Fatal("device still connected")
	}
	if _, err := os.Stat(m.st.recordPath("d")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record kept: %v", err)
	}
	if err := m.Detach(ctx, "d"); err != nil {
		t.Fatalf("second detach: %v", err)
	}
	if err := m.Health("d"); !errors.Is(err, ErrNotAttached) {
		t.Fatalf("Health after detach: %v", err)
	}
}

// A memory volume's contents die with the process that served it: the
// next process must not hand the kernel an empty disk in its place, but
// disconnect the device (I/O fails loudly) and forget the volume.
func TestResumeRefusesVolatileVolume(t *testing.T) {
	k := newFakeKernel()
	dir := t.TempDir()
	ctx := ctxT(t)
	m1 := newTestManager(t, dir, k)
	if _, err := m1.Attach(ctx, "mem", "size=8Mi;memory:gone", nil, Options{}); err != nil {
		t.Fatal(err)
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	k.serverDied(0)
	m2 := newTestManager(t, dir, k)
	vols, err := m2.Resume(ctx)
	if len(vols) != 0 || !errors.Is(err, errVolatile) {
		t.Fatalf("Resume = %+v, %v; want it refused as volatile", vols, err)
	}
	if k.devs[0].connected {
		t.Error("the device is still connected, waiting for a server that will never come")
	}
	if _, err := os.Stat(m2.st.recordPath("mem")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record kept: %v", err)
	}
}

// A stack with a write-back buffer in memory (s3 without a cache) is
// served again after a clean Close (everything flushed), but not after its
// process died without one: the kernel's next flush would succeed without
// the writes the buffer held.
func TestResumeBufferedWritesOnlyAfterCleanClose(t *testing.T) {
	k := newFakeKernel()
	dir := t.TempDir()
	ctx := ctxT(t)
	m1 := newTestManager(t, dir, k)
	if _, err := m1.Attach(ctx, "buf", "size=8Mi;attachtest:buffered-1", nil, Options{}); err != nil {
		t.Fatal(err)
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	k.serverDied(0)
	m2 := newTestManager(t, dir, k)
	if vols, err := m2.Resume(ctx); err != nil || len(vols) != 1 {
		t.Fatalf("Resume after a clean close = %+v, %v", vols, err)
	}
	// m2 dies without closing anything: its record says it was serving.
	k.serverDied(0)
	m3 := newTestManager(t, dir, k)
	vols, err := m3.Resume(ctx)
	if len(vols) != 0 || !errors.Is(err, errUnflushed) {
		t.Fatalf("Resume after a crash = %+v, %v; want it refused", vols, err)
	}
	if k.devs[0].connected {
		t.Error("the device is still connected")
	}
}

// A clean detach removes what filters keep on the node for the volume (a
// cache's files), so deleted volumes leave nothing behind; a cache-dir the
// spec names is the operator's and stays.
func TestDetachForgetsFilterState(t *testing.T) {
	k := newFakeKernel()
	state := t.TempDir()
	m, err := NewManager(t.TempDir(), backends.Env{StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	m.openKernel = func(context.Context) (kernel, error) { return k, nil }
	m.loop = nil
	t.Cleanup(func() { m.Close() })
	ctx := ctxT(t)
	own := t.TempDir()
	for id, spec := range map[string]string{
		"c": "cache=writeback,size=8Mi;memory:c",
		"o": "cache=writeback,cache-dir=" + own + ",size=8Mi;memory:o",
	} {
		if _, err := m.Attach(ctx, id, spec, nil, Options{}); err != nil {
			t.Fatal(err)
		}
		dev, _ := m.Device(id)
		if err := dev.WriteAt(ctx, pattern(64<<10, 3), 0, false); err != nil {
			t.Fatal(err)
		}
	}
	caches, _ := filepath.Glob(filepath.Join(state, "cache", "*"))
	if len(caches) != 1 {
		t.Fatalf("cache directories in the state dir while attached: %v", caches)
	}
	ownFiles, _ := os.ReadDir(own)
	if len(ownFiles) == 0 {
		t.Fatal("nothing in the cache-dir the spec names")
	}
	for _, id := range []string{"c", "o"} {
		if err := m.Detach(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if caches, _ := filepath.Glob(filepath.Join(state, "cache", "*")); len(caches) != 0 {
		t.Fatalf("cache state left after detach: %v", caches)
	}
	if after, _ := os.ReadDir(own); len(after) != len(ownFiles) {
		t.Fatalf("the operator's cache-dir was emptied: %d entries, had %d", len(after), len(ownFiles))
	}
}

// A connection the kernel drops (a request timed out) is replaced.
func TestRepairAfterLinkDead(t *testing.T) {
	k := newFakeKernel()
	m := newTestManager(t, t.TempDir(), k)
	ctx := ctxT(t)
	if _, err := m.Attach(ctx, "rep", "size=4Mi;memory:rep", nil, Options{Connections: 2}); err != nil {
		t.Fatal(err)
	}
	k.sock(t, 0, 0).write(t, 0, pattern(4096, 1))
	for i, announce := range []bool{true, false} {
		k.kill(0, i, announce)
		eventually(t, "the dead connection replaced", func() bool { return k.liveSocks(0) == 2 && m.Health("rep") == nil })
		if got := k.sock(t, 0, i).read(t, 0, 4096); !bytes.Equal(got, pattern(4096, 1)) {
			t.Fatal("data differs on the replacement connection")
		}
	}
	select {
	case <-m.Done("rep"):
		t.Fatal("a repaired volume was forgotten")
	default:
	}
}

// A device disconnected by someone else (csi-nbd detach with no serving
// process recorded, nbd-client -d) is forgotten.
func TestExternalDisconnectForgets(t *testing.T) {
	t.Run("device released", func(t *testing.T) { testExternalDisconnect(t, false) })
	t.Run("device still open", func(t *testing.T) { testExternalDisconnect(t, true) })
}

func testExternalDisconnect(t *testing.T, stillOpen bool) {
	k := newFakeKernel()
	k.stillOpen = stillOpen
	m := newTestManager(t, t.TempDir(), k)
	ctx := ctxT(t)
	if _, err := m.Attach(ctx, "ext", "memory:ext", nil, Options{Connections: 3}); err != nil {
		t.Fatal(err)
	}
	if err := k.Disconnect(ctx, 0); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done("ext"):
	case <-time.After(30 * time.Second):
		t.Fatal("volume not forgotten after an external disconnect")
	}
	if _, err := os.Stat(m.st.recordPath("ext")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record kept: %v", err)
	}
}

func TestFallbackPolicy(t *testing.T) {
	ctx := ctxT(t)
	m, err := NewManager(t.TempDir(), backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.loop = nil
	m.openKernel = func(context.Context) (kernel, error) { return nil, ErrNoNBD }
	for _, fb := range []string{"auto", "never", "always"} {
		_, err := m.Attach(ctx, "x", "memory:", nil, Options{Fallback: fb})
		if err == nil {
			t.Fatalf("fallback=%s: attached without nbd or fallback", fb)
		}
		if fb != "always" && !errors.Is(err, ErrNoNBD) {
			t.Fatalf("fallback=%s: %v does not say nbd is missing", fb, err)
		}
	}
	if _, err := m.Attach(ctx, "x", "memory:", nil, Options{Fallback: "sometimes"}); err == nil || !strings.Contains(err.Error(), "sometimes") {
		t.Fatalf("bad fallback value: %v", err)
	}
	if _, err := m.Attach(ctx, "x", "memory:", nil, Options{Connections: 1000}); err == nil {
		t.Fatal("1000 connections accepted")
	}
}

func TestResizeReconfigures(t *testing.T) {
	k := newFakeKernel()
	m := newTestManager(t, t.TempDir(), k)
	ctx := ctxT(t)
	if _, err := m.Attach(ctx, "grow", "size=4Mi;memory:grow", nil, Options{}); err != nil {
		t.Fatal(err)
	}
	if err := m.Resize(ctx, "grow", 8<<20); err != nil {
		t.Fatal(err)
	}
	if k.devs[0].cfg.Size != 8<<20 {
		t.Fatalf("kernel size %d", k.devs[0].cfg.Size)
	}
	k.sock(t, 0, 0).write(t, 6<<20, pattern(4096, 5))
	if err := m.Resize(ctx, "nope", 1); !errors.Is(err, ErrNotAttached) {
		t.Fatalf("resize of an unknown volume: %v", err)
	}
}

func TestSetIOFlusherMarksEveryThread(t *testing.T) {
	if err := SetIOFlusher(); err != nil {
		t.Skipf("cannot set PR_SET_IO_FLUSHER here: %v", err)
	}
	// Threads Go starts afterwards inherit the flag from their creator.
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lockAndSpin()
		}()
	}
	wg.Wait()
	marked, total, err := IOFlusherThreads()
	if err != nil {
		t.Fatal(err)
	}
	if marked != total || total == 0 {
		t.Fatalf("%d of %d threads marked", marked, total)
	}
}

// wrapped marks a stack wrapped by Manager.WrapDevice and counts writes.
type wrapped struct {
	backends.Device
	id     string
	writes atomic.Int64
}

func (w *wrapped) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	w.writes.Add(1)
	return w.Device.WriteAt(ctx, p, off, fua)
}

// WrapDevice wraps what is served, on attach and on resume, and Device
// returns the served stack.
func TestWrapDeviceServedAndFound(t *testing.T) {
	k := newFakeKernel()
	dir := t.TempDir()
	ctx := ctxT(t)
	wrap := func(id string, dev backends.Device) backends.Device { return &wrapped{Device: dev, id: id} }
	m1 := newTestManager(t, dir, k)
	m1.WrapDevice = wrap
	if _, err := m1.Attach(ctx, "pvc-w", "size=12Mi;attachtest:wrap", nil, Options{}); err != nil {
		t.Fatal(err)
	}
	k.sock(t, 0, 0).write(t, 0, pattern(4096, 1))
	dev, ok := m1.Device("pvc-w")
	if w, isW := dev.(*wrapped); !ok || !isW || w.id != "pvc-w" || w.writes.Load() != 1 {
		t.Fatalf("Device = %T %v", dev, ok)
	}
	if _, ok := m1.Device("nope"); ok {
		t.Error("Device of an unknown volume")
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	k.serverDied(0)
	m2 := newTestManager(t, dir, k)
	m2.WrapDevice = wrap
	if _, err := m2.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	k.sock(t, 0, 0).write(t, 0, pattern(4096, 2))
	if dev, ok := m2.Device("pvc-w"); !ok || dev.(*wrapped).writes.Load() != 1 {
		t.Fatalf("after resume: Device = %T %v", dev, ok)
	}
}
