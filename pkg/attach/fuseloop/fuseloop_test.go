package fuseloop

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

const mi = 1 << 20

// The whole life of a volume: mkfs, mount, write, remount and verify,
// delete and fstrim (the freed space must reach the device), detach; and
// nothing of ours is left while a stranger's loop device is left alone.
func TestFilesystemCycle(t *testing.T) {
	requireFuseLoop(t)
	mkfs := testserver.RequireTool(t, "mkfs.ext4")
	fstrim := testserver.RequireTool(t, "fstrim")

	dev := &countingDevice{Device: openMemory(t, "size=64Mi;memory:cycle")}
	dir := filepath.Join(t.TempDir(), "vol")
	strangerDev, strangerFile := foreignLoop(t, dir)

	a, err := Attach(context.Background(), dev, Config{Name: "disk", Dir: dir, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	if got := deviceSize(t, a.Path()); got != 64*mi {
		t.Fatalf("size of %s = %d, want %d", a.Path(), got, 64*mi)
	}
	info, ok := readLoopInfo(int(a.index.Load()))
	if !ok || info.backing != filepath.Join(dir, "disk") {
		t.Fatalf("%s backing file = %q (bound %v), want %s", a.Path(), info.backing, ok, filepath.Join(dir, "disk"))
	}
	if !info.dio {
		t.Errorf("%s does not use direct I/O", a.Path())
	}
	if name, err := loopFileName(int(a.index.Load())); err != nil || name != loopMarker(dir, "disk") {
		t.Errorf("lo_file_name = %q, %v; want %q", name, err, loopMarker(dir, "disk"))
	}

	run(t, mkfs, "-q", "-F", a.Path())
	mnt := t.TempDir()
	mountExt4(t, a.Path(), mnt)
	sums := map[string][sha256.Size]byte{}
	for i := range 16 {
		data := make([]byte, mi+i*4097)
		rand.Read(data)
		name := filepath.Join(mnt, fmt.Sprintf("f%d", i))
		if err := os.WriteFile(name, data, 0o600); err != nil {
			t.Fatal(err)
		}
		sums[name] = sha256.Sum256(data)
	}
	unix.Sync()
	umount(t, mnt)
	if dev.writes.Load() == 0 || dev.flushes.Load() == 0 {
		t.Errorf("device saw %d writes and %d flushes", dev.writes.Load(), dev.flushes.Load())
	}

	mountExt4(t, a.Path(), mnt)
	for name, want := range sums {
		data, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(data) != want {
			t.Fatalf("%s: checksum mismatch after remount", name)
		}
		if err := os.Remove(name); err != nil {
			t.Fatal(err)
		}
	}
	unix.Sync()
	before, zerosBefore := allocated(t, dev), dev.zeros.Load()
	run(t, fstrim, mnt)
	after := allocated(t, dev)
	if dev.zeros.Load() == zerosBefore || before-after < 15*mi {
		t.Errorf("fstrim: %d Zero calls, allocated %d → %d bytes; want the 16+ MiB of deleted files freed",
			dev.zeros.Load()-zerosBefore, before, after)
	}
	if dev.trims.Load() != 0 {
		t.Errorf("Trim called %d times: discards must zero (see package doc)", dev.trims.Load())
	}
	// Detach refuses while mounted, and changes nothing.
	if err := a.Detach(context.Background()); !errors.Is(err, syscall.EBUSY) {
		t.Fatalf("Detach while mounted = %v, want EBUSY", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "still"), []byte("alive"), 0o600); err != nil {
		t.Fatal(err)
	}
	umount(t, mnt)

	flushes := dev.flushes.Load()
	if err := a.Detach(context.Background()); err != nil {
		t.Fatal(err)
	}
	if dev.flushes.Load() == flushes {
		t.Error("Detach did not flush the device")
	}
	select {
	case <-a.Done():
	default:
		t.Error("Done not closed after Detach")
	}
	if a.Err() != nil {
		t.Errorf("Err after Detach = %v", a.Err())
	}
	if err := a.Detach(context.Background()); err != nil {
		t.Errorf("second Detach: %v", err)
	}
	if l := ourLoops(t, dir); len(l) != 0 {
		t.Errorf("loop devices of ours left after Detach: %v", l)
	}
	if m, _ := isMountPoint(dir); m {
		t.Errorf("%s still mounted after Detach", dir)
	}
	if err := CleanupStale(dir); err != nil {
		t.Errorf("CleanupStale after a clean detach: %v", err)
	}
	if !loopBoundTo(strangerDev, strangerFile) {
		t.Errorf("someone else's %s (over %s) was detached", strangerDev, strangerFile)
	}
}

// The file's operations map onto the device as documented.
func TestFileOperations(t *testing.T) {
	requireFuseLoop(t)
	dev := &countingDevice{Device: openMemory(t, "size=4Mi;memory:fileops")}
	dir := filepath.Join(t.TempDir(), "vol")
	a := attach(t, dev, Config{Name: "disk", Dir: dir})

	f, err := os.OpenFile(filepath.Join(dir, "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil || st.Size() != 4*mi || !st.Mode().IsRegular() {
		t.Fatalf("stat = %v, %v; want a regular file of 4 MiB", st, err)
	}
	data := bytes.Repeat([]byte("csi-nbd!"), 8192) // 64 KiB
	if _, err := f.WriteAt(data, 100_000); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := dev.ReadAt(context.Background(), got, 100_000); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("device does not hold the written data (%v)", err)
	}
	if _, err := f.ReadAt(got, 100_000); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	if err := f.Sync(); err != nil || dev.flushes.Load() == 0 {
		t.Fatalf("fsync: %v, %d flushes", err, dev.flushes.Load())
	}

	// PUNCH_HOLE and ZERO_RANGE both zero through Device.Zero.
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 100_000, 4096); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 110_000, 4096); err != nil {
		t.Fatal(err)
	}
	if dev.zeros.Load() != 2 || backends.ZeroFlags(dev.zeroFlags.Load()) != backends.ZeroNoHole {
		t.Errorf("%d Zero calls with flags %b; want 2, ZeroNoHole from ZERO_RANGE only", dev.zeros.Load(), dev.zeroFlags.Load())
	}
	want := bytes.Clone(data)
	clear(want[:4096])
	clear(want[10_000 : 10_000+4096])
	if _, err := f.ReadAt(got, 100_000); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("after punch and zero range: %v, data mismatch %v", err, !bytes.Equal(got, want))
	}

	// The file never changes size.
	if _, err := f.WriteAt([]byte("x"), 4*mi); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write past the end = %v, want ENOSPC", err)
	}
	if err := f.Truncate(mi); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate = %v, want EPERM", err)
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_COLLAPSE_RANGE, 0, 4096); !errors.Is(err, syscall.EOPNOTSUPP) {
		t.Errorf("collapse range = %v, want EOPNOTSUPP", err)
	}
	if n, err := f.ReadAt(got, 4*mi-10); n != 10 {
		t.Errorf("read across the end = %d, %v; want 10 bytes", n, err)
	}
	_ = a
}

// A device without efficient zeroing refuses PUNCH_HOLE rather than
// writing zeros over every discarded range.
func TestPunchHoleWithoutEfficientZero(t *testing.T) {
	requireFuseLoop(t)
	mem := openMemory(t, "size=4Mi;memory:nozero")
	caps := mem.Caps()
	caps.Zero, caps.FastZero = false, false
	dev := &countingDevice{Device: &capsDevice{Device: mem, caps: caps}}
	dir := filepath.Join(t.TempDir(), "vol")
	attach(t, dev, Config{Name: "disk", Dir: dir})
	f, err := os.OpenFile(filepath.Join(dir, "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); !errors.Is(err, syscall.EOPNOTSUPP) {
		t.Errorf("punch hole = %v, want EOPNOTSUPP", err)
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); err != nil {
		t.Errorf("zero range: %v", err)
	}
	if dev.zeros.Load() != 1 {
		t.Errorf("%d Zero calls, want 1 (zero range)", dev.zeros.Load())
	}
}

func TestReadOnly(t *testing.T) {
	requireFuseLoop(t)
	mem := openMemory(t, "size=8Mi;memory:ro")
	pattern := bytes.Repeat([]byte{0xa5}, 4096)
	if err := mem.WriteAt(context.Background(), pattern, 0, false); err != nil {
		t.Fatal(err)
	}
	roCaps := mem.Caps()
	roCaps.ReadOnly = true
	for _, tc := range []struct {
		name string
		dev  backends.Device
		cfg  Config
	}{
		{"config", mem, Config{Name: "disk", ReadOnly: true}},
		{"caps", &capsDevice{Device: mem, caps: roCaps}, Config{Name: "disk"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := &countingDevice{Device: tc.dev}
			tc.cfg.Dir = filepath.Join(t.TempDir(), "vol")
			a := attach(t, dev, tc.cfg)

			f, err := os.Open(a.Path())
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			ro, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKROGET)
			if err != nil || ro != 1 {
				t.Errorf("BLKROGET = %d, %v; want 1", ro, err)
			}
			got := make([]byte, 4096)
			if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, pattern) {
				t.Errorf("read: %v, data matches %v", err, bytes.Equal(got, pattern))
			}
			if w, err := os.OpenFile(a.Path(), os.O_WRONLY, 0); err == nil {
				_, err = w.WriteAt(got, 0)
				w.Close()
				if err == nil {
					t.Error("wrote to a read-only loop device")
				}
			}
			if _, err := os.OpenFile(filepath.Join(tc.cfg.Dir, "disk"), os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
				t.Errorf("opening the FUSE file for writing = %v, want EROFS", err)
			}
			if dev.writes.Load() != 0 || dev.zeros.Load() != 0 {
				t.Errorf("device saw %d writes, %d zeroes", dev.writes.Load(), dev.zeros.Load())
			}
		})
	}
}

func TestResize(t *testing.T) {
	requireFuseLoop(t)
	dev := openMemory(t, "size=32Mi;memory:grow")
	dir := filepath.Join(t.TempDir(), "vol")
	a := attach(t, dev, Config{Name: "disk", Dir: dir, BlockSize: 4096})
	if got := deviceSize(t, a.Path()); got != 32*mi {
		t.Fatalf("size = %d, want %d", got, 32*mi)
	}
	ctx := context.Background()
	if err := a.Resize(ctx, 48*mi); !errors.Is(err, backends.ErrInvalid) {
		t.Errorf("Resize before the device grew = %v, want ErrInvalid", err)
	}
	if err := backends.Resize(ctx, dev, 48*mi); err != nil {
		t.Fatal(err)
	}
	if err := a.Resize(ctx, 48*mi); err != nil {
		t.Fatal(err)
	}
	if got := deviceSize(t, a.Path()); got != 48*mi {
		t.Fatalf("size after Resize = %d, want %d", got, 48*mi)
	}
	if err := a.Resize(ctx, 40*mi); !errors.Is(err, backends.ErrInvalid) {
		t.Errorf("shrinking Resize = %v, want ErrInvalid", err)
	}
	// The new tail is usable: a direct write to the last block lands in
	// the device.
	f, err := os.OpenFile(a.Path(), os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBlock(4096)
	copy(buf, "the end")
	if _, err := f.WriteAt(buf, 48*mi-4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 7)
	if err := dev.ReadAt(ctx, got, 48*mi-4096); err != nil || string(got) != "the end" {
		t.Errorf("device at the new end: %q, %v", got, err)
	}
}

// alignedBlock returns a buffer aligned for O_DIRECT.
func alignedBlock(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafePtr(b))%4096)
	return b[off%4096 : off%4096+n]
}

func TestConfigErrors(t *testing.T) {
	dev := openMemory(t, "size=1Mi;memory:cfg")
	for _, cfg := range []Config{
		{Name: "", Dir: "/x"},
		{Name: "a/b", Dir: "/x"},
		{Name: "..", Dir: "/x"},
		{Name: "disk", Dir: ""},
		{Name: "disk", Dir: "/x", BlockSize: 1000},
		{Name: "disk", Dir: "/x", BlockSize: 256},
		{Name: "disk", Dir: "/x", BlockSize: 1 << 20},
	} {
		if _, err := Attach(context.Background(), dev, cfg); err == nil || !strings.Contains(err.Error(), "config") {
			t.Errorf("Attach(%+v) = %v, want an error naming the config field", cfg, err)
		}
	}
}

// A crash (SIGKILL of the serving process) leaves a dead FUSE mount and,
// while something still has it open, the loop device. CleanupStale
// removes both and nothing else.
func TestCleanupStaleAfterCrash(t *testing.T) {
	requireFuseLoop(t)
	mkfs := testserver.RequireTool(t, "mkfs.ext4")
	base := t.TempDir()

	t.Run("unused", func(t *testing.T) {
		dir := filepath.Join(base, "unused")
		strangerDev, strangerFile := foreignLoop(t, dir)
		path, kill := startHelper(t, dir)
		kill()
		// Nobody had the loop open: AUTOCLEAR detached it with our
		// descriptor. The FUSE mount stays, dead.
		waitUntil(t, "loop gone after the crash", func() bool { return len(ourLoops(t, dir)) == 0 })
		if m, _ := isMountPoint(dir); !m {
			t.Fatalf("%s: expected the dead FUSE mount to remain", dir)
		}
		if err := CleanupStale(dir); err != nil {
			t.Fatal(err)
		}
		if m, _ := isMountPoint(dir); m {
			t.Errorf("%s still mounted after CleanupStale", dir)
		}
		if !loopBoundTo(strangerDev, strangerFile) {
			t.Errorf("someone else's %s was detached", strangerDev)
		}
		_ = path
	})

	t.Run("mounted", func(t *testing.T) {
		dir := filepath.Join(base, "mounted")
		strangerDev, strangerFile := foreignLoop(t, dir)
		path, kill := startHelper(t, dir)
		run(t, mkfs, "-q", "-F", path)
		mnt := t.TempDir()
		mountExt4(t, path, mnt)
		mounted := true
		defer func() {
			if mounted {
				unix.Unmount(mnt, unix.MNT_DETACH)
			}
		}()
		kill()
		// The loop stays while mounted: CleanupStale says so (EBUSY),
		// and removes the dead FUSE mount.
		if err := CleanupStale(dir); !errors.Is(err, syscall.EBUSY) {
			t.Fatalf("CleanupStale with the loop mounted = %v, want EBUSY", err)
		}
		if m, _ := isMountPoint(dir); m {
			t.Errorf("%s still mounted after CleanupStale", dir)
		}
		// Found again by its marker, though its path is now detached.
		if l := ourLoops(t, dir); len(l) != 1 {
			t.Errorf("our loops after lazy unmount: %v, want the one still mounted", l)
		}
		umount(t, mnt) // ext4 over a dead device still unmounts
		mounted = false
		waitUntil(t, "loop detached once unmounted", func() bool { return len(ourLoops(t, dir)) == 0 })
		if err := CleanupStale(dir); err != nil {
			t.Errorf("second CleanupStale: %v", err)
		}
		if !loopBoundTo(strangerDev, strangerFile) {
			t.Errorf("someone else's %s was detached", strangerDev)
		}
	})
}

// startHelper runs this test binary as a serving process (see TestMain)
// and returns the device it attached and a function that SIGKILLs it.
func startHelper(t *testing.T, dir string) (path string, kill func()) {
	t.Helper()
	cmd := execSelf(t, dir, "size=32Mi;memory:crash")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 64)
	n, _ := out.Read(line)
	path = strings.TrimSpace(string(line[:n]))
	if !strings.HasPrefix(path, "/dev/loop") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper printed %q; stderr:\n%s", path, stderr.String())
	}
	killed := false
	kill = func() {
		if !killed {
			killed = true
			cmd.Process.Signal(syscall.SIGKILL)
			cmd.Wait()
		}
	}
	t.Cleanup(func() {
		kill()
		CleanupStale(dir)
	})
	return path, kill
}

// When the FUSE connection dies underneath (here: umount -f, which aborts
// it), Done closes, Err says why, I/O on the loop device fails instead of
// hanging, and Detach still cleans up.
func TestDoneWhenFUSEGoesAway(t *testing.T) {
	requireFuseLoop(t)
	dev := openMemory(t, "size=8Mi;memory:gone")
	dir := filepath.Join(t.TempDir(), "vol")
	a, err := Attach(context.Background(), dev, Config{Name: "disk", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	// MNT_FORCE aborts the FUSE connection before finding the mount busy.
	if err := unix.Unmount(dir, unix.MNT_FORCE); err != nil && !errors.Is(err, unix.EBUSY) {
		t.Fatal(err)
	}
	<-a.Done()
	if a.Err() == nil {
		t.Error("Err is nil after the FUSE server went away")
	}
	f, err := os.OpenFile(a.Path(), os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(alignedBlock(4096), 0); err == nil {
		t.Error("read from a loop device over a dead FUSE file succeeded")
	}
	f.Close()
	a.Detach(context.Background()) // the flush fails; detaching must not
	if l := ourLoops(t, dir); len(l) != 0 {
		t.Errorf("loop devices of ours left: %v", l)
	}
	if m, _ := isMountPoint(dir); m {
		t.Errorf("%s still mounted", dir)
	}
}

// Discard, zero-out and write-zeroes-with-unmap on the block device reach
// the device as Zero and read back as zeros (the kernel's loop driver
// turns them into fallocate modes; this pins down which).
func TestBlockDiscardAndZeroout(t *testing.T) {
	requireFuseLoop(t)
	blkdiscard := testserver.RequireTool(t, "blkdiscard")
	fallocate := testserver.RequireTool(t, "fallocate")
	dev := &countingDevice{Device: openMemory(t, "size=16Mi;memory:discard")}
	a := attach(t, dev, Config{Name: "disk", Dir: filepath.Join(t.TempDir(), "vol"), BlockSize: 4096})
	ctx := context.Background()
	fill := bytes.Repeat([]byte{0x5a}, 4*mi)
	rng := []string{"--offset", fmt.Sprint(4 * mi), "--length", fmt.Sprint(4 * mi), a.Path()}
	for _, c := range []struct {
		name     string
		cmd      []string
		wantFlag backends.ZeroFlags // ZeroNoHole when space must stay allocated
	}{
		{"discard", append([]string{blkdiscard}, rng...), 0},
		{"zeroout", append([]string{blkdiscard, "--zeroout"}, rng...), backends.ZeroNoHole},
		// Write-zeroes that may unmap: reaches us as PUNCH_HOLE too,
		// which is why a punched range must read back as zeros.
		{"punch", append([]string{fallocate, "--punch-hole"}, rng...), 0},
	} {
		if err := dev.WriteAt(ctx, fill, 4*mi, false); err != nil {
			t.Fatal(err)
		}
		zeros := dev.zeros.Load()
		dev.zeroFlags.Store(0)
		run(t, c.cmd[0], c.cmd[1:]...)
		if dev.zeros.Load() == zeros {
			t.Errorf("%s: no Zero call reached the device", c.name)
		}
		if got := backends.ZeroFlags(dev.zeroFlags.Load()); got != c.wantFlag {
			t.Errorf("%s: Zero flags %b, want %b", c.name, got, c.wantFlag)
		}
		got := make([]byte, 4*mi)
		if err := dev.ReadAt(ctx, got, 4*mi); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, make([]byte, 4*mi)) {
			t.Errorf("%s: range does not read back as zeros", c.name)
		}
	}
	if dev.trims.Load() != 0 {
		t.Errorf("Trim called %d times", dev.trims.Load())
	}
}

// Concurrent direct I/O of mixed sizes (up to 2 MiB, so FUSE splits
// requests) lands intact: fio writes checksummed blocks from two jobs at
// depth 16 and reads every one back.
func TestConcurrentVerify(t *testing.T) {
	requireFuseLoop(t)
	fio := testserver.RequireTool(t, "fio")
	dev := openMemory(t, "size=64Mi;memory:verify")
	a := attach(t, dev, Config{Name: "disk", Dir: filepath.Join(t.TempDir(), "vol"), BlockSize: 4096})
	run(t, fio, "--name=verify", "--filename="+a.Path(), "--rw=randwrite", "--bsrange=4k-2m",
		"--ioengine=libaio", "--iodepth=16", "--direct=1", "--numjobs=2", "--offset_increment=32m",
		"--size=32m", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--verify_state_save=0")
}
