package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/internal/testpki"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// idleThreads lists the threads of this process under SCHED_IDLE.
func idleThreads(t *testing.T) []string {
	t.Helper()
	tasks, err := filepath.Glob("/proc/self/task/*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var idle []string
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread ended
		}
		// Fields after the parenthesised name; policy is field 41.
		fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if p, _ := strconv.Atoi(fields[41-3]); p == schedIdle {
			idle = append(idle, f)
		}
	}
	return idle
}

// idleAllowed skips a test that needs SCHED_IDLE and back where the
// process may not have it; as root (CI) it must work.
func idleAllowed(t *testing.T, s *idleSpin) {
	t.Helper()
	if s.probe() {
		return
	}
	if os.Geteuid() == 0 {
		t.Fatal("root cannot switch a thread to SCHED_IDLE and back")
	}
	t.Skip("this process may not return a thread from SCHED_IDLE (CAP_SYS_NICE or RLIMIT_NICE)")
}

func TestIdleSpinWindow(t *testing.T) {
	s := &idleSpin{wake: make(chan struct{}, 1)}
	idleAllowed(t, s)
	runtime.LockOSThread() // so that getPolicy reads the window's thread
	defer runtime.UnlockOSThread()
	if !s.enter(-1) {
		t.Fatal("no window opened")
	}
	if p := getPolicy(); p != schedIdle {
		t.Fatalf("policy in a window = %d, want SCHED_IDLE", p)
	}
	s.leave()
	if p := getPolicy(); p != schedOther {
		t.Fatalf("policy after the window = %d, want SCHED_OTHER", p)
	}
	if s.windows.Load() != 1 || s.starved.Load() != 0 || s.since.Load() != 0 {
		t.Fatalf("windows %d starved %d since %d", s.windows.Load(), s.starved.Load(), s.since.Load())
	}

	// A window for a client on another CPU moves the thread there, and
	// gives it its whole CPU set back at the end.
	other := -1
	for cpu := range s.mask.Count() + 64 {
		if s.mask.IsSet(cpu) && cpu != getcpu() {
			other = cpu
			break
		}
	}
	if other < 0 {
		t.Skip("one CPU: nowhere to move")
	}
	if !s.enter(other) {
		t.Fatal("no window opened")
	}
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	if cpu := getcpu(); cpu != other || set.Count() != 1 {
		t.Errorf("in a window for CPU %d: on CPU %d, allowed %d CPUs", other, cpu, set.Count())
	}
	s.leave()
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	if set != s.mask {
		t.Errorf("CPU set after the window: %d CPUs, want the %d it had", set.Count(), s.mask.Count())
	}
}

// A spinner starved by a CPU hog is raised by the watchdog, and windows
// stop opening for a while.
func TestIdleSpinWatchdog(t *testing.T) {
	s := &idleSpin{wake: make(chan struct{}, 1)}
	idleAllowed(t, s)
	if runtime.NumCPU() < 2 {
		t.Skip("the watchdog needs a CPU the hog leaves free")
	}
	errc := make(chan string, 1)
	go func() {
		// Never unlocked: the narrowed CPU sets end with the threads.
		runtime.LockOSThread()
		var one unix.CPUSet
		one.Set(getcpu())
		if err := unix.SchedSetaffinity(0, &one); err != nil {
			errc <- err.Error()
			return
		}
		var stop atomic.Bool
		started := make(chan struct{})
		go func() {
			runtime.LockOSThread()
			_ = unix.SchedSetaffinity(0, &one)
			close(started)
			for !stop.Load() {
			}
		}()
		<-started
		defer stop.Store(true)
		if !s.enter(-1) {
			errc <- "no window opened"
			return
		}
		// Spin, as the reader does, until raised.
		deadline := time.Now().Add(20 * time.Second)
		for getPolicy() == schedIdle && time.Now().Before(deadline) {
		}
		stop.Store(true)
		starved, until := s.starved.Load(), s.until.Load()
		s.leave()
		switch {
		case getPolicy() == schedIdle:
			errc <- "the watchdog did not raise a starved thread"
		case starved == 0:
			errc <- "starvation not counted"
		case until == 0:
			errc <- "no back-off after a starved window"
		default:
			errc <- ""
		}
	}()
	if msg := <-errc; msg != "" {
		t.Fatal(msg)
	}
	s.until.Store(0) // the back-off over
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if !s.enter(-1) {
		t.Fatal("no window after the back-off")
	}
	s.leave()
}

// Starvations close together (a busy machine) back off longer and
// longer; a stray one after many good windows only briefly.
func TestIdleBackOff(t *testing.T) {
	s := &idleSpin{}
	backoff := func() time.Duration {
		s.backOff()
		return time.Duration(s.until.Load() - time.Now().UnixNano())
	}
	var last time.Duration
	for i := range 12 {
		s.windows.Add(3)
		d := backoff()
		want := idleBackoff << min(i, idleMaxShift)
		if d > want || d < want-100*time.Millisecond || d < last && i <= idleMaxShift {
			t.Fatalf("starvation %d in a row: backing off %v, want %v", i+1, d, want)
		}
		last = d
	}
	s.windows.Add(idleStreakWindows)
	if d := backoff(); d > idleBackoff {
		t.Fatalf("stray starvation after %d good windows: backing off %v", idleStreakWindows, d)
	}
}

func TestSpinBatches(t *testing.T) {
	var r spinReader
	for i := range idleAfterSingles {
		r.setBatch(1)
		if r.waitsEachAnswer() != (i+1 == idleAfterSingles) {
			t.Fatalf("after %d single requests: waits for each answer %v", i+1, r.waitsEachAnswer())
		}
	}
	if !r.eager {
		t.Fatal("not spinning for a client that waits for each answer")
	}
	if r.setBatch(0); !r.waitsEachAnswer() || !r.eager {
		t.Fatal("an empty batch (requests served by workers) ended the run")
	}
	if r.setBatch(2); r.waitsEachAnswer() {
		t.Fatal("a batch of two did not end the run")
	}
	if r.depth() != 2 {
		t.Fatalf("depth %d after a batch of 2", r.depth())
	}
}

// At queue depth 1 over TCP the reader spins in windows at SCHED_IDLE;
// every byte still arrives, and no thread is left lowered or slot held,
// also when the connection turned to TLS and spinning is off, or is a
// unix socket, which spins but opens no windows.
func TestSpinTCPQueueDepth1(t *testing.T) {
	const size = 4 << 20
	ca := testpki.NewCA(t, "spin test CA")
	s := startServer(t, staticExports{"plain": {Device: memory.New(size)}, "tls": {Device: memory.New(size)}, "unix": {Device: memory.New(size)}}, func(c *ServerConfig) {
		c.TLSMode = TLSOn
		c.TLS = ca.ServerConfig(t)
	})
	for _, tc := range []struct {
		name, uri string
		tls       *tls.Config
	}{
		{"plain", "nbd://" + s.tcp + "/plain", nil},
		{"tls", "nbd://" + s.tcp + "/tls", &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"}},
		{"unix", "nbd+unix:///unix?socket=" + s.sock, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			idle.until.Store(0) // no back-off left by earlier tests
			before := idle.windows.Load()
			c, err := Dial(ctx, tc.uri, ClientConfig{TLS: tc.tls})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			rng := rand.New(rand.NewPCG(5, 6))
			model := make([]byte, size)
			buf := make([]byte, 64<<10)
			for i := range 3000 {
				n := 512 * (1 + rng.IntN(len(buf)/512))
				off := uint64(rng.IntN((size-n)/512)) * 512
				if i%2 == 0 {
					for j := range buf[:n] {
						buf[j] = byte(rng.Uint32())
					}
					if err := c.WriteAt(ctx, buf[:n], off, 0); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], buf[:n])
					continue
				}
				if err := c.ReadAt(ctx, buf[:n], off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(buf[:n], model[off:off+uint64(n)]) {
					t.Fatalf("request %d: read of %d at %d differs from what was written", i, n, off)
				}
			}
			// The connection is open and waiting: nothing may be held.
			time.Sleep(10 * time.Millisecond)
			if spinning.Load() {
				t.Error("the spin slot is held by a waiting connection")
			}
			if l := idleThreads(t); len(l) > 0 {
				t.Errorf("threads left at SCHED_IDLE: %v", l)
			}
			// A deep queue is no client waiting for each answer: it
			// needs both CPUs, not ours.
			deep := idle.windows.Load()
			var g errgroup.Group
			for w := range 32 {
				g.Go(func() error {
					b := make([]byte, 4096)
					for i := range 200 {
						if err := c.ReadAt(ctx, b, uint64(w*200+i)*4096%size); err != nil {
							return err
						}
					}
					return nil
				})
			}
			if err := g.Wait(); err != nil {
				t.Fatal(err)
			}
			if n := idle.windows.Load() - deep; n > 100 {
				t.Errorf("%d windows at SCHED_IDLE for 6400 reads from 32 at a time", n)
			}
			opened := deep - before
			t.Logf("%d windows at SCHED_IDLE, %d starved in all", opened, idle.starved.Load())
			switch {
			case tc.tls != nil && opened != 0:
				t.Errorf("%d windows opened for a TLS connection, which does not spin", opened)
			case tc.name == "unix" && opened != 0:
				t.Errorf("%d windows opened for a unix socket", opened)
			case tc.name == "plain" && idle.ok.Load() && opened == 0:
				t.Error("no window opened at queue depth 1")
			case tc.name == "plain" && !idle.ok.Load() && os.Geteuid() == 0:
				t.Error("spinning at SCHED_IDLE is off for root")
			}
		})
	}
}

// Over a unix socket (the node plugin's socketpair) the reader spins
// with raw reads when told to and reads through the runtime otherwise,
// and never lowers its thread, even when asked to prepare a window.
func TestSpinUnix(t *testing.T) {
	client, server := socketPair(t)
	defer client.Close()
	defer server.Close()
	r := newSpinReader(server)
	if !r.unix || r.rc == nil {
		t.Fatal("a unix socket is not read as one")
	}
	r.enabled = true
	raw := 0 // reads through the raw path (try)
	try := r.fn
	r.fn = func(fd uintptr) bool { raw++; return try(fd) }
	windows := idle.windows.Load()
	for _, eager := range []bool{true, false, true} {
		r.eager = eager
		before := raw
		for i := range idleAfterSingles {
			r.prepare()
			go func() {
				time.Sleep(20 * time.Microsecond)
				client.Write([]byte{byte(i)})
			}()
			var b [1]byte
			if n, err := r.Read(b[:]); n != 1 || err != nil || b[0] != byte(i) {
				t.Fatalf("spinning %v: read %d (%x), %v: want byte %x", eager, n, b[:n], err, byte(i))
			}
			if spinning.Load() || r.held || r.idle {
				t.Fatalf("spinning %v: the spin slot or SCHED_IDLE left held after a read", eager)
			}
		}
		if (raw > before) != eager {
			t.Errorf("spinning %v: %d reads went the raw way", eager, raw-before)
		}
	}
	if n := idle.windows.Load() - windows; n != 0 {
		t.Errorf("%d windows at SCHED_IDLE for a unix socket", n)
	}
	if l := idleThreads(t); len(l) > 0 {
		t.Errorf("threads left at SCHED_IDLE: %v", l)
	}
}
