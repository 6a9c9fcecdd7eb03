package rate

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock only moves when a test advances it, so the limiter's
// arithmetic and ordering can be checked exactly, without timing.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	at   time.Time
	c    chan time.Time
	done bool // fired or stopped
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) (<-chan time.Time, func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{at: c.now.Add(d), c: make(chan time.Time, 1)}
	c.timers = append(c.timers, t)
	return t.c, func() {
		c.mu.Lock()
		t.done = true
		c.mu.Unlock()
	}
}

// pending returns the timers not yet fired or stopped.
func (c *fakeClock) pending() []*fakeTimer {
	c.mu.Lock()
	defer c.mu.Unlock()
	var p []*fakeTimer
	for _, t := range c.timers {
		if !t.done {
			p = append(p, t)
		}
	}
	return p
}

func (c *fakeClock) stopped(t *fakeTimer) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return t.done
}

// advanceTo moves the clock to at and fires the timers due.
func (c *fakeClock) advanceTo(at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if at.After(c.now) {
		c.now = at
	}
	for _, t := range c.timers {
		if !t.done && !t.at.After(c.now) {
			t.done = true
			t.c <- c.now
		}
	}
}

// harness runs requests through one lane in goroutines and records the
// order and fake times at which they are admitted.
type harness struct {
	t     *testing.T
	clk   *fakeClock
	l     *lane
	start time.Time

	mu       sync.Mutex
	started  int
	order    []string // as the waits returned (a cancelled one too)
	admitMu  sync.Mutex
	admitted []string                 // as the lane admitted them
	log      []string                 // admissions and clock moves, for failures
	at       map[string]time.Duration // admission times; admitMu
	errs     map[string]error
	wg       sync.WaitGroup
}

func newHarness(t *testing.T, bytesPerSec, opsPerSec int64, burst time.Duration) *harness {
	clk := newFakeClock()
	l := newLane(clk)
	l.set(bytesPerSec, opsPerSec, burst)
	h := &harness{t: t, clk: clk, l: l, start: clk.Now(),
		at: map[string]time.Duration{}, errs: map[string]error{}}
	// Called with l.mu held, so it takes its own lock, not h.mu
	// (settled takes l.mu under h.mu).
	l.onAdmit = func(ctx context.Context) {
		h.admitMu.Lock()
		defer h.admitMu.Unlock()
		name := ctx.Value(nameKey{}).(string)
		h.admitted = append(h.admitted, name)
		h.at[name] = clk.Now().Sub(h.start)
		h.log = append(h.log, fmt.Sprintf("%v admit %s", clk.Now().Sub(h.start), name))
	}
	return h
}

type nameKey struct{}

func (h *harness) queued() int {
	h.l.mu.Lock()
	defer h.l.mu.Unlock()
	return len(h.l.queue)
}

// eventually polls cond; the deadline only stops a broken test from
// hanging, it is not a timing assertion.
func (h *harness) eventually(what string, cond func() bool) {
	h.t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// submit starts request name and waits until it is admitted or queued, so
// requests enter the queue in the order they are submitted.
func (h *harness) submit(ctx context.Context, name string, op bool, n int64) {
	h.t.Helper()
	h.mu.Lock()
	h.started++
	want := h.started
	h.mu.Unlock()
	h.wg.Add(1)
	ctx = context.WithValue(ctx, nameKey{}, name)
	go func() {
		defer h.wg.Done()
		_, err := h.l.wait(ctx, op, n)
		h.mu.Lock()
		defer h.mu.Unlock()
		h.order = append(h.order, name)
		h.errs[name] = err
	}()
	h.eventually(name+" queued or admitted", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.queued()+len(h.order) == want
	})
}

// settled reports whether every request is either recorded or in the
// queue, with the head (if any) asleep on a timer.
func (h *harness) settled() (idle bool, next time.Time, ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	q := h.queued()
	if q+len(h.order) != h.started {
		return false, time.Time{}, false
	}
	if q == 0 {
		return true, time.Time{}, true
	}
	p := h.clk.pending()
	if len(p) != 1 {
		return false, time.Time{}, false
	}
	return false, p[0].at, true
}

// set changes the limits once the head sleeps, and waits until the head
// has dropped its old timer, so run never fires a stale one.
func (h *harness) set(bytesPerSec, opsPerSec int64, burst time.Duration) {
	h.t.Helper()
	h.eventually("the head to sleep", func() bool { return len(h.clk.pending()) == 1 })
	old := h.clk.pending()[0]
	h.l.set(bytesPerSec, opsPerSec, burst)
	h.eventually("the head to wake", func() bool { return h.clk.stopped(old) })
}

// run advances the clock from timer to timer until every request is in.
func (h *harness) run() {
	h.t.Helper()
	for {
		var idle bool
		var next time.Time
		h.eventually("the lane to settle", func() bool {
			var ok bool
			idle, next, ok = h.settled()
			return ok
		})
		if idle {
			h.wg.Wait()
			return
		}
		h.admitMu.Lock()
		h.log = append(h.log, fmt.Sprintf("advance to %v", next.Sub(h.start)))
		h.admitMu.Unlock()
		h.clk.advanceTo(next)
	}
}

// check compares the admission order (of the requests not cancelled) and
// the fake times at which they were admitted.
func (h *harness) check(order []string, at map[string]time.Duration) {
	h.t.Helper()
	h.admitMu.Lock()
	defer h.admitMu.Unlock()
	if !slices.Equal(h.admitted, order) {
		h.t.Errorf("admitted in order %v, want %v", h.admitted, order)
	}
	for name, want := range at {
		if got := h.at[name]; got < want || got > want+10*time.Microsecond {
			h.t.Errorf("%s admitted at %v, want %v", name, got, want)
		}
	}
	if h.t.Failed() {
		h.t.Logf("events:\n%s", strings.Join(h.log, "\n"))
	}
}

func TestLaneLargeRequestInterleavesWithSmall(t *testing.T) {
	// 1000 B/s with a 1 s bucket: 1000 tokens, chunks of 500.
	h := newHarness(t, 1000, 0, time.Second)
	ctx := context.Background()
	h.submit(ctx, "drain", false, 1000) // takes the full bucket at t=0
	h.submit(ctx, "big", false, 1000)   // 2 chunks of 500
	h.submit(ctx, "small1", false, 100)
	h.submit(ctx, "small2", false, 100)
	h.run()
	// big's first chunk at 0.5 s; small1 goes before its second (0.6 s);
	// big's second chunk at 1.1 s, small2 at 1.2 s.
	h.check([]string{"drain", "small1", "big", "small2"}, map[string]time.Duration{
		"drain": 0, "small1": 600 * time.Millisecond, "big": 1100 * time.Millisecond,
		"small2": 1200 * time.Millisecond,
	})
}

func TestLaneLargeRequestsStayInOrder(t *testing.T) {
	h := newHarness(t, 1000, 0, time.Second)
	ctx := context.Background()
	h.submit(ctx, "drain", false, 1000)
	h.submit(ctx, "big1", false, 2000)
	h.submit(ctx, "big2", false, 2000)
	h.submit(ctx, "big3", false, 1500)
	h.run()
	// Each finishes after its own bytes, not after everyone's.
	h.check([]string{"drain", "big1", "big2", "big3"}, map[string]time.Duration{
		"big1": 2 * time.Second, "big2": 4 * time.Second, "big3": 5500 * time.Millisecond,
	})
}

func TestLaneOpsAndBytesTogether(t *testing.T) {
	// 10 ops/s and 1000 B/s, 100 ms buckets: 1 op, 100 bytes (chunk 50).
	h := newHarness(t, 1000, 10, 100*time.Millisecond)
	ctx := context.Background()
	h.submit(ctx, "a", true, 10)  // op + 10 bytes at 0
	h.submit(ctx, "b", true, 10)  // waits 100 ms for an op token
	h.submit(ctx, "c", true, 200) // op at 200 ms; bytes: 80 left at 100 ms...
	h.submit(ctx, "trim", true, 0)
	h.run()
	// a: t=0 (ops 0, bytes 90). While requests wait the byte bucket may
	// save up to 1 s (1000 bytes). b: op at 100 ms (bytes 190, then
	// 180). c: op and a 50-byte chunk at 200 ms (bytes 230), then trim,
	// which fits in a chunk, goes first: op at 300 ms; c takes its last
	// 150 bytes from the 330 saved at once.
	h.check([]string{"a", "b", "trim", "c"}, map[string]time.Duration{
		"a": 0, "b": 100 * time.Millisecond, "trim": 300 * time.Millisecond,
		"c": 300 * time.Millisecond,
	})
}

// A stall (here: the clock jumps while the head sleeps) costs no tokens
// while requests wait, but idle time saves no more than the burst.
func TestLaneStallKeepsTokensIdleDoesNot(t *testing.T) {
	h := newHarness(t, 1000, 0, 100*time.Millisecond) // bucket 100, chunk 50
	ctx := context.Background()
	h.submit(ctx, "drain", false, 100)
	h.submit(ctx, "r1", false, 50) // due at 50 ms
	h.submit(ctx, "r2", false, 400)
	h.eventually("the head to sleep", func() bool { return len(h.clk.pending()) == 1 })
	// The process "stalls" for 500 ms past r1's deadline: 500 tokens
	// accrue although the burst is 100, and both go at once.
	h.clk.advanceTo(h.start.Add(500 * time.Millisecond))
	h.run()
	h.check([]string{"drain", "r1", "r2"}, map[string]time.Duration{
		"r1": 500 * time.Millisecond, "r2": 500 * time.Millisecond,
	})
	// Idle: the bucket is back to 100 tokens however long nothing waits.
	if got := h.l.bytes.TokensAt(h.start.Add(time.Hour)); got != 100 {
		t.Errorf("%v tokens after idle, want the burst, 100", got)
	}
}

func TestLaneUnlimitedOpsLeaveZeroByteRequestsFree(t *testing.T) {
	h := newHarness(t, 1000, 0, time.Second)
	ctx := context.Background()
	h.submit(ctx, "drain", true, 1000)
	h.submit(ctx, "write", true, 500)
	h.submit(ctx, "trim", true, 0) // no byte cost, but waits its turn
	h.run()
	h.check([]string{"drain", "write", "trim"}, map[string]time.Duration{
		"write": 500 * time.Millisecond, "trim": 500 * time.Millisecond,
	})
}

func TestLaneLiveRaiseReleasesWaitersInOrder(t *testing.T) {
	h := newHarness(t, 10, 0, time.Second) // 10 B/s: each 5-byte chunk waits 0.5 s
	ctx := context.Background()
	h.submit(ctx, "drain", false, 10)
	for _, n := range []string{"r1", "r2", "r3", "r4"} {
		h.submit(ctx, n, false, 5)
	}
	h.set(1_000_000, 0, time.Second) // 5 bytes now take 5 µs
	h.run()
	h.check([]string{"drain", "r1", "r2", "r3", "r4"}, map[string]time.Duration{
		"r4": 20 * time.Microsecond,
	})
}

func TestLaneLiftedLimitReleasesEveryoneWithoutTime(t *testing.T) {
	h := newHarness(t, 0, 1, time.Second) // 1 op/s
	ctx := context.Background()
	names := []string{"o1", "o2", "o3", "o4", "o5"}
	for _, n := range names {
		h.submit(ctx, n, true, 4096)
	}
	h.set(0, 0, time.Second)
	h.run()
	h.check(names, map[string]time.Duration{"o5": 0})
	// A new request after the queue drained takes the fast path.
	if h.l.active.Load() {
		t.Error("lane still active with no limits and no queue")
	}
}

func TestLaneLoweredLimitSlowsTheHead(t *testing.T) {
	h := newHarness(t, 100, 0, time.Second) // 100 tokens, chunks of 50
	ctx := context.Background()
	h.submit(ctx, "drain", false, 100)
	h.submit(ctx, "r", false, 50) // due at 0.5 s
	h.set(10, 0, time.Second)     // now 50 tokens take 5 s (chunk is 5)
	h.run()
	// Ten chunks of 5 bytes at 10 B/s.
	h.check([]string{"drain", "r"}, map[string]time.Duration{"r": 5 * time.Second})
}

func TestLaneCancelledWaitersLeaveTheQueue(t *testing.T) {
	h := newHarness(t, 0, 1, time.Second)
	ctx := context.Background()
	headCtx, cancelHead := context.WithCancel(ctx)
	midCtx, cancelMid := context.WithCancel(ctx)
	h.submit(ctx, "drain", true, 0)
	h.submit(headCtx, "head", true, 0)
	h.submit(midCtx, "mid", true, 0)
	h.submit(ctx, "last", true, 0)
	cancelMid()
	h.eventually("mid to leave", func() bool { return h.queued() == 2 })
	cancelHead()
	h.eventually("head to leave", func() bool { return h.queued() == 1 })
	h.run()
	h.check([]string{"drain", "last"}, map[string]time.Duration{"last": time.Second})
	for _, n := range []string{"head", "mid"} {
		if err := h.errs[n]; !errors.Is(err, context.Canceled) {
			t.Errorf("%s: err %v, want context.Canceled", n, err)
		}
	}
	if err := h.errs["last"]; err != nil {
		t.Errorf("last: %v", err)
	}
}

func TestLaneCloseFailsWaiters(t *testing.T) {
	h := newHarness(t, 0, 1, time.Second)
	ctx := context.Background()
	h.submit(ctx, "drain", true, 0)
	h.submit(ctx, "a", true, 0)
	h.submit(ctx, "b", true, 0)
	h.l.close()
	h.wg.Wait()
	for _, n := range []string{"a", "b"} {
		if !errors.Is(h.errs[n], errClosed) {
			t.Errorf("%s: err %v, want errClosed", n, h.errs[n])
		}
	}
	if _, err := h.l.wait(ctx, true, 0); !errors.Is(err, errClosed) {
		t.Errorf("wait after close: %v", err)
	}
}

func TestBucketSize(t *testing.T) {
	for _, c := range []struct {
		perSec int64
		burst  time.Duration
		want   int
	}{
		{10 << 20, 100 * time.Millisecond, 1048576},
		{3, 100 * time.Millisecond, 1},
		{1000, time.Second, 1000},
		{MaxBytesPerSec, MaxBurst, 1<<31 - 1},
	} {
		if got := bucketSize(c.perSec, c.burst); got != c.want {
			t.Errorf("bucketSize(%d, %v) = %d, want %d", c.perSec, c.burst, got, c.want)
		}
	}
}
