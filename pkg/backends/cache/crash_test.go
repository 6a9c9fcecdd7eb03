package cache

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
)

// The kill -9 test: a child process (this test binary, re-executed) writes
// through cache=writeback over a file-backed device and reports each write
// as it begins ("B slot") and once acknowledged ("A slot"); the parent
// kills it with SIGKILL mid-stream, reopens the cache over the same files
// and checks that every acknowledged write is there, that every begun one
// reads as old bytes or its own, and that nothing else changed; then that
// the backend holds it all once the cache is closed.

const (
	crashChildEnv = "CSI_NBD_CACHE_CRASH_CHILD"
	crashSize     = 64 << 20
	crashSlot     = 8 << 10
	crashSlots    = crashSize / crashSlot
	crashBlock    = 16 << 10
	crashCap      = 2 << 20 // small: write-around and writeback happen too
	crashWorkers  = 4
)

// crashWrite is slot s's write: a range inside the slot and its bytes.
func crashWrite(s int) (off uint64, p []byte) {
	r := rand.New(rand.NewPCG(uint64(s), 42))
	lo := r.Uint64N(crashSlot - 1)
	n := 1 + r.Uint64N(crashSlot-lo)
	p = make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32()) | 1 // never 0, so old (zero) bytes are told apart
	}
	return uint64(s)*crashSlot + lo, p
}

func crashConfig(dir string) Config {
	return Config{Mode: "writeback", Size: crashCap, Block: crashBlock, OnRead: true, Dir: filepath.Join(dir, "cache")}
}

func crashChild() {
	dir := os.Getenv(crashChildEnv)
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(2)
	}
	f, err := os.OpenFile(filepath.Join(dir, "backend"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		fail(err)
	}
	if err := f.Truncate(crashSize); err != nil {
		fail(err)
	}
	d, err := Open(ctx, &fileDev{f: f, size: crashSize}, crashConfig(dir))
	if err != nil {
		fail(err)
	}
	var mu sync.Mutex
	say := func(format string, args ...any) {
		mu.Lock()
		fmt.Fprintf(os.Stdout, format, args...)
		mu.Unlock()
	}
	order := rand.New(rand.NewPCG(7, 7)).Perm(crashSlots)
	var wg sync.WaitGroup
	for w := range crashWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(order); i += crashWorkers {
				s := order[i]
				off, p := crashWrite(s)
				say("B %d\n", s)
				if err := d.WriteAt(ctx, p, off, s%16 == 0); err != nil {
					fail(err)
				}
				say("A %d\n", s)
				if s%64 == 1 {
					if err := d.Flush(ctx); err != nil {
						fail(err)
					}
				}
			}
		}()
	}
	wg.Wait()
	say("DONE\n")
	select {} // wait for the kill
}

func TestKill9LosesNoAcknowledgedWrite(t *testing.T) {
	if testing.Short() {
		t.Skip("re-executes the test binary")
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	begun, acked := map[int]bool{}, map[int]bool{}
	// The child prints "B slot" as a write begins and "A slot" once it is
	// acknowledged.
	record := func(line string) {
		f := strings.Fields(line)
		if len(f) == 2 {
			s, _ := strconv.Atoi(f[1])
			if f[0] == "B" {
				begun[s] = true
			} else {
				acked[s] = true
			}
		}
	}
	sc := bufio.NewScanner(out)
	killAt := crashSlots / 5
	for sc.Scan() {
		record(sc.Text())
		if len(acked) == killAt {
			cmd.Process.Signal(syscall.SIGKILL)
			break
		}
	}
	// Lines already in the pipe were written before the kill: they count.
	for sc.Scan() {
		record(sc.Text())
	}
	cmd.Wait()
	if len(acked) < killAt {
		t.Fatalf("child died after %d acknowledged writes", len(acked))
	}
	inFlight := len(begun) - len(acked)
	t.Logf("killed after %d acknowledged writes, %d in flight", len(acked), inFlight)

	check := func(what string, img []byte) { t.Helper(); checkCrashImage(t, what, img, begun, acked) }

	fd := openFileDev(t, filepath.Join(dir, "backend"), crashSize)
	d, err := Open(ctx, fd, crashConfig(dir))
	if err != nil {
		t.Fatal(err)
	}
	check("through the reopened cache", devtest.ReadAll(t, d, 0, crashSize))
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(filepath.Join(dir, "backend"))
	if err != nil {
		t.Fatal(err)
	}
	check("backend after close", img)
}

// setMapHeader rewrites the boot ID and flags of the map in dir, as a map
// written in another boot would have them.
func setMapHeader(t *testing.T, dir string, boot [16]byte, flags uint32) {
	t.Helper()
	path := filepath.Join(dir, "map")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := parseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	h.boot, h.flags = boot, flags
	copy(b, h.marshal())
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// crashClose abandons d as a killed process would: files closed, nothing
// written back, the map left as it is.
func (d *Device) crashClose() {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	close(d.stop)
	<-d.done
	d.closeFiles()
}

// After a power loss (another boot, no clean close) the cache is dropped,
// not trusted; after a clean close it is kept across reboots.
func TestRebootDropsUncleanCacheKeepsCleanOne(t *testing.T) {
	const bs = 4096
	org := newMem(1 << 20)
	org.Device.WriteAt(ctx, pattern(1<<20, 1), 0, false)
	c := cfg(t, modeWriteback, 1<<20, bs)

	d := mustOpen(t, org, c)
	devtest.ReadAll(t, d, 0, 64*bs)               // clean blocks
	d.WriteAt(ctx, pattern(bs, 9), 100*bs, false) // a dirty one
	d.crashClose()
	setMapHeader(t, c.Dir, [16]byte{0xde, 0xad}, 0) // written in another boot
	d = mustOpen(t, org, c)
	if used, dirty := d.stats(); used != 0 || dirty != 0 {
		t.Fatalf("after a reboot without a clean close: %d blocks kept, %d dirty", used, dirty)
	}
	devtest.CheckRead(t, "backend data", d, 100*bs, pattern(1<<20, 1)[100*bs:101*bs])
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}

	// The same after a clean close: kept, served without the backend.
	setMapHeader(t, c.Dir, [16]byte{0xbe, 0xef}, flagClean)
	org2 := &countDev{Device: org.Device}
	d = mustOpen(t, org2, c)
	defer d.Close()
	if used, _ := d.stats(); used == 0 {
		t.Fatal("a cleanly closed cache was dropped after a reboot")
	}
	devtest.ReadAll(t, d, 100*bs, bs)
	if org2.reads.Load() != 0 {
		t.Fatal("a cleanly closed cache was not served after a reboot")
	}
}

// checkCrashImage checks a volume image after a crash: every acknowledged
// slot write is there, a begun one reads as old (zero) bytes or its own,
// and nothing else changed.
func checkCrashImage(t *testing.T, what string, img []byte, begun, acked map[int]bool) {
	t.Helper()
	bad := 0
	for s := 0; s < crashSlots; s++ {
		off, p := crashWrite(s)
		base := uint64(s) * crashSlot
		slot := img[base : base+crashSlot]
		lo, hi := off-base, off-base+uint64(len(p))
		for i, c := range slot {
			u := uint64(i)
			var ok bool
			switch {
			case u < lo || u >= hi:
				ok = c == 0
			case acked[s]:
				ok = c == p[u-lo]
			case begun[s]:
				ok = c == 0 || c == p[u-lo]
			default:
				ok = c == 0
			}
			if !ok {
				if bad < 5 {
					t.Errorf("%s: slot %d (acked %v, begun %v) byte %d: %#x", what, s, acked[s], begun[s], i, c)
				}
				bad++
				break
			}
		}
	}
	if bad > 0 {
		t.Fatalf("%s: %d slots wrong", what, bad)
	}
}
