package fuseloop

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// TestMain doubles as a helper process: with FUSELOOP_HELPER_DIR set, the
// test binary attaches a volume, prints its device path and serves until
// stdin closes or SIGTERM (then detaches). Tests kill it to simulate a
// crash; hack/bench-fuseloop.sh uses it to get a device to measure.
func TestMain(m *testing.M) {
	if dir := os.Getenv("FUSELOOP_HELPER_DIR"); dir != "" {
		os.Exit(runHelper(dir, os.Getenv("FUSELOOP_HELPER_SPEC")))
	}
	os.Exit(m.Run())
}

func runHelper(dir, spec string) int {
	s, err := backends.Parse(spec)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx := context.Background()
	dev, err := backends.Open(ctx, s, backends.Env{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	a, err := Attach(ctx, dev, Config{Name: "disk", Dir: dir, BlockSize: 4096})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(a.Path())
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	eof := make(chan struct{})
	go func() {
		bufio.NewReader(os.Stdin).ReadString(0)
		close(eof)
	}()
	select {
	case <-stop:
	case <-eof:
	case <-a.Done():
		fmt.Fprintln(os.Stderr, "attachment ended:", a.Err())
		return 1
	}
	if err := a.Detach(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// requireFuseLoop skips unless this host can attach (root, /dev/fuse,
// /dev/loop-control); in CI it fails instead.
func requireFuseLoop(t *testing.T) {
	t.Helper()
	err := Available()
	if err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("FUSE+loop is required in CI: %v", err)
	}
	t.Skip(err)
}

func openMemory(t *testing.T, spec string) backends.Device {
	t.Helper()
	s, err := backends.Parse(spec)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := backends.Open(context.Background(), s, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	return dev
}

// countingDevice counts the calls that reach the device.
type countingDevice struct {
	backends.Device
	writes, flushes, trims, zeros atomic.Int64
	zeroFlags                     atomic.Uint32 // OR of every Zero's flags
}

func (d *countingDevice) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	d.writes.Add(1)
	return d.Device.WriteAt(ctx, p, off, fua)
}

func (d *countingDevice) Flush(ctx context.Context) error {
	d.flushes.Add(1)
	return d.Device.Flush(ctx)
}

func (d *countingDevice) Trim(ctx context.Context, off, length uint64, fua bool) error {
	d.trims.Add(1)
	return d.Device.Trim(ctx, off, length, fua)
}

func (d *countingDevice) Zero(ctx context.Context, off, length uint64, f backends.ZeroFlags) error {
	d.zeros.Add(1)
	d.zeroFlags.Or(uint32(f))
	return d.Device.Zero(ctx, off, length, f)
}

// capsDevice overrides a device's capabilities.
type capsDevice struct {
	backends.Device
	caps backends.Caps
}

func (d *capsDevice) Caps() backends.Caps { return d.caps }

// allocated is how many bytes of dev are allocated (not holes).
func allocated(t *testing.T, dev backends.Device) uint64 {
	t.Helper()
	var n, off uint64
	for off < dev.Size() {
		err := dev.Extents(context.Background(), off, dev.Size()-off, func(e backends.Extent) {
			if e.Flags&backends.ExtentHole == 0 {
				n += e.Length
			}
			off += e.Length
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return n
}

func attach(t *testing.T, dev backends.Device, cfg Config) *Attachment {
	t.Helper()
	a, err := Attach(context.Background(), dev, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := a.Detach(ctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return a
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func deviceSize(t *testing.T, path string) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size uint64
	if err := ioctlPtr(f, unix.BLKGETSIZE64, &size); err != nil {
		t.Fatalf("BLKGETSIZE64 %s: %v", path, err)
	}
	return size
}

func ioctlPtr(f *os.File, req uint, p *uint64) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(req), uintptr(unsafe.Pointer(p)))
	if e != 0 {
		return e
	}
	return nil
}

func mountExt4(t *testing.T, dev, dir string) {
	t.Helper()
	if err := unix.Mount(dev, dir, "ext4", 0, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", dev, dir, err)
	}
}

func umount(t *testing.T, dir string) {
	t.Helper()
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatalf("umount %s: %v", dir, err)
	}
}

// ourLoops lists the bound loop devices CleanupStale(dir) would call ours.
func ourLoops(t *testing.T, dir string) []int {
	t.Helper()
	dir, err := resolveStaleDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := loopIndexes()
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, i := range idx {
		info, ok := readLoopInfo(i)
		if !ok {
			continue
		}
		name, _ := loopFileName(i)
		if under(info.backing, dir) || strings.HasPrefix(name, dirMarker(dir)) {
			out = append(out, i)
		}
	}
	return out
}

// foreignLoop attaches a loop device to a plain file the way another
// program on the machine would (losetup), in a directory whose name
// starts like dir's, and detaches it at the end of the test.
func foreignLoop(t *testing.T, dir string) (dev, file string) {
	t.Helper()
	losetup := testserver.RequireTool(t, "losetup")
	other := dir + "-other"
	if err := os.MkdirAll(other, 0o700); err != nil {
		t.Fatal(err)
	}
	file = filepath.Join(other, "disk")
	if err := os.WriteFile(file, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev = strings.TrimSpace(run(t, losetup, "-f", "--show", file))
	t.Cleanup(func() { exec.Command(losetup, "-d", dev).Run() })
	return dev, file
}

// loopBoundTo reports whether the loop device path is bound to file.
func loopBoundTo(path, file string) bool {
	var i int
	if _, err := fmt.Sscanf(path, "/dev/loop%d", &i); err != nil {
		return false
	}
	info, ok := readLoopInfo(i)
	return ok && info.backing == file
}

// waitUntil polls cond until it holds or a generous deadline passes (the
// kernel finishes some detaches asynchronously); it is not a timing
// assertion.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// execSelf is this test binary as a helper process serving spec in dir.
func execSelf(t *testing.T, dir, spec string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "FUSELOOP_HELPER_DIR="+dir, "FUSELOOP_HELPER_SPEC="+spec)
	return cmd
}

func unsafePtr(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }
