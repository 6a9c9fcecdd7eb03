package rate

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	xrate "golang.org/x/time/rate"
)

// clock is the time source of a lane; tests substitute a fake one so the
// limiter's logic can be checked without timing anything.
type clock interface {
	Now() time.Time
	// After returns a channel that receives once d has passed, and a
	// function releasing the timer early.
	After(d time.Duration) (<-chan time.Time, func())
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) After(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTimer(d)
	return t.C, func() { t.Stop() }
}

// errClosed is returned to requests still waiting when the device closes.
var errClosed = errors.New("rate: device closed")

// lane meters one direction (reads or writes) with two token buckets, one
// counted in bytes and one in operations, and admits requests strictly in
// arrival order. Only the request at the head of the queue waits for
// tokens; the others wait for their turn. A request larger than a chunk
// (half the byte bucket) is admitted one chunk at a time, and between its
// chunks the first queued request that fits in one chunk (a small read,
// a trim) goes ahead of it: a 32 MiB write cannot hold back the 4 KiB
// requests behind it for seconds, and large requests still finish in
// arrival order (round-robin among them would make each one as slow as
// all of them together).
//
// The buckets never go into debt (no reservations): the head takes tokens
// only when they are there. That is what lets a limit change apply at
// once: SetLimits wakes the head, which recomputes its wait under the new
// limits, and the queue keeps its order.
type lane struct {
	clk clock

	mu    sync.Mutex
	bytes *xrate.Limiter // nil: bytes unlimited
	ops   *xrate.Limiter // nil: operations unlimited
	chunk int64          // most bytes admitted at once (half the burst)

	bytesPerSec, opsPerSec int64
	burst                  time.Duration
	queue                  []*waiter     // queue[0] is the head
	changed                chan struct{} // closed (and replaced) when the limits change
	closed                 bool

	// onAdmit, if set (by tests), is called as each request is admitted,
	// with l.mu held: it sees the true admission order.
	onAdmit func(ctx context.Context)

	// active is set while limits are set or requests queue, so an
	// unlimited lane costs one atomic load per request and a request
	// never overtakes those queued before a limit was lifted.
	active atomic.Bool
}

type waiter struct {
	bytes int64 // bytes still to be admitted
	op    bool  // the operation token is still to be taken
	wake  chan struct{}
}

func newLane(clk clock) *lane {
	return &lane{clk: clk, changed: make(chan struct{})}
}

// set installs new limits (0 = unlimited) with a bucket of burst's worth
// of traffic, and makes the head re-evaluate. Tokens accrued at the old
// rate up to now are kept (up to the new bucket size); a bucket created
// because a direction was unlimited starts full.
func (l *lane) set(bytesPerSec, opsPerSec int64, burst time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.clk.Now()
	l.bytes = retune(l.bytes, now, bytesPerSec, burst)
	l.ops = retune(l.ops, now, opsPerSec, burst)
	l.bytesPerSec, l.opsPerSec, l.burst = bytesPerSec, opsPerSec, burst
	l.chunk = 0
	if l.bytes != nil {
		l.chunk = max(1, int64(l.bytes.Burst())/2)
	}
	if len(l.queue) > 0 {
		l.widen(now, true)
	}
	close(l.changed)
	l.changed = make(chan struct{})
	l.updateActive()
}

// bucketSize is how many tokens burst's worth of traffic at perSec is,
// at least one.
func bucketSize(perSec int64, burst time.Duration) int {
	n := math.Ceil(float64(perSec) * burst.Seconds())
	return int(min(max(n, 1), math.MaxInt32))
}

func retune(lim *xrate.Limiter, now time.Time, perSec int64, burst time.Duration) *xrate.Limiter {
	if perSec <= 0 {
		return nil
	}
	b := bucketSize(perSec, burst)
	if lim == nil {
		return xrate.NewLimiter(xrate.Limit(perSec), b)
	}
	lim.SetLimitAt(now, xrate.Limit(perSec))
	lim.SetBurstAt(now, b)
	return lim
}

// catchUp is how much traffic, as time at the limit, the buckets may
// save up while requests are waiting. Normally the head takes tokens the
// moment they are there, so this changes nothing; but when the process
// stalls (CPU starvation, a GC pause, a slow reply path) longer than the
// burst while requests wait, a bucket capped at the burst would throw the
// tokens of the stall away, and the volume would fall short of its limit
// for good. Saved tokens are let through when it runs again. A bucket
// goes back to the burst as soon as no request waits, so after idle at
// most rate-burst's worth passes at once.
const catchUp = time.Second

// widen sets the buckets' size for a queue with waiters (on) or without;
// l.mu is held.
func (l *lane) widen(now time.Time, on bool) {
	size := func(perSec int64) int {
		b := bucketSize(perSec, l.burst)
		if on {
			b = max(b, bucketSize(perSec, catchUp))
		}
		return b
	}
	if l.bytes != nil {
		l.bytes.SetBurstAt(now, size(l.bytesPerSec))
	}
	if l.ops != nil {
		l.ops.SetBurstAt(now, size(l.opsPerSec))
	}
}

// updateActive recomputes active; l.mu is held.
func (l *lane) updateActive() {
	l.active.Store(l.closed || l.bytes != nil || l.ops != nil || len(l.queue) > 0)
}

// close fails every waiting request and every later one.
func (l *lane) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	close(l.changed)
	l.changed = make(chan struct{})
	for _, w := range l.queue {
		signal(w.wake)
	}
	l.updateActive()
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// wait admits one request of n bytes, taking an operation token if op is
// set. It returns how long the request was held back.
func (l *lane) wait(ctx context.Context, op bool, n int64) (time.Duration, error) {
	if !l.active.Load() {
		return 0, nil
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return 0, errClosed
	}
	if l.bytes == nil && l.ops == nil && len(l.queue) == 0 {
		l.mu.Unlock()
		return 0, nil
	}
	rest := waiter{bytes: n, op: op}
	if len(l.queue) == 0 && (l.bytes == nil || n <= l.chunk) {
		// Nobody ahead and one step admits it: when the buckets hold the
		// tokens, go without queueing (no waiter, no channel, no
		// widening and narrowing of the buckets).
		if l.take(l.clk.Now(), &rest) == 0 {
			if l.onAdmit != nil {
				l.onAdmit(ctx)
			}
			l.mu.Unlock()
			return 0, nil
		}
	}
	w := &waiter{bytes: rest.bytes, op: rest.op, wake: make(chan struct{}, 1)}
	l.queue = append(l.queue, w)
	if len(l.queue) == 1 {
		l.widen(l.clk.Now(), true)
	}
	l.updateActive()
	var start time.Time
	for {
		if l.closed {
			l.remove(w)
			l.mu.Unlock()
			return l.since(start), errClosed
		}
		if l.queue[0] != w {
			l.mu.Unlock()
			if start.IsZero() {
				start = l.clk.Now()
			}
			select {
			case <-w.wake:
			case <-ctx.Done():
				l.mu.Lock()
				l.remove(w)
				l.mu.Unlock()
				return l.since(start), fmt.Errorf("rate: waiting for tokens: %w", ctx.Err())
			}
			l.mu.Lock()
			continue
		}
		now := l.clk.Now()
		d := l.take(now, w)
		if d == 0 {
			if !w.op && w.bytes == 0 {
				if l.onAdmit != nil {
					l.onAdmit(ctx)
				}
				l.remove(w)
				l.mu.Unlock()
				return l.since(start), nil
			}
			if i := l.nextSmall(); i > 0 {
				// Let the first request that needs no more than a
				// chunk go before w's next chunk.
				small := l.queue[i]
				copy(l.queue[1:i+1], l.queue[:i])
				l.queue[0] = small
				signal(small.wake)
			}
			continue
		}
		if start.IsZero() {
			start = now
		}
		changed := l.changed
		l.mu.Unlock()
		tc, stop := l.clk.After(d)
		select {
		case <-tc:
		case <-changed:
		case <-w.wake: // close
		case <-ctx.Done():
			stop()
			l.mu.Lock()
			l.remove(w)
			l.mu.Unlock()
			return l.since(start), fmt.Errorf("rate: waiting for tokens: %w", ctx.Err())
		}
		stop()
		l.mu.Lock()
	}
}

func (l *lane) since(start time.Time) time.Duration {
	if start.IsZero() {
		return 0
	}
	return l.clk.Now().Sub(start)
}

// nextSmall returns the index of the first queued request after the head
// that a single chunk admits, or -1; l.mu is held.
func (l *lane) nextSmall() int {
	for i := 1; i < len(l.queue); i++ {
		if l.bytes == nil || l.queue[i].bytes <= l.chunk {
			return i
		}
	}
	return -1
}

// remove takes w out of the queue and, if it was the head, hands the turn
// to the next request; l.mu is held.
func (l *lane) remove(w *waiter) {
	i := slices.Index(l.queue, w)
	if i < 0 {
		return
	}
	l.queue = slices.Delete(l.queue, i, i+1)
	if i == 0 && len(l.queue) > 0 {
		signal(l.queue[0].wake)
	}
	if len(l.queue) == 0 {
		l.widen(l.clk.Now(), false)
	}
	l.updateActive()
}

// take gives the head w its operation token and its next chunk of bytes
// if the buckets hold them, returning 0; otherwise it takes nothing and
// returns how long until they will; l.mu is held.
func (l *lane) take(now time.Time, w *waiter) time.Duration {
	needOp := w.op && l.ops != nil
	var nb int64
	if l.bytes != nil {
		nb = min(w.bytes, l.chunk)
	}
	var d time.Duration
	if needOp {
		d = max(d, missing(l.ops, now, 1))
	}
	if nb > 0 {
		d = max(d, missing(l.bytes, now, nb))
	}
	if d > 0 {
		return d
	}
	if needOp {
		if !l.ops.AllowN(now, 1) {
			return time.Microsecond // rounding; look again very soon
		}
		w.op = false // taken: not again if the bytes are short
	}
	if nb > 0 && !l.bytes.AllowN(now, int(nb)) {
		return time.Microsecond
	}
	w.op = false
	if l.bytes == nil {
		w.bytes = 0
	} else {
		w.bytes -= nb
	}
	return 0
}

// missing is how long lim needs to hold n tokens (0 if it does now).
func missing(lim *xrate.Limiter, now time.Time, n int64) time.Duration {
	have := lim.TokensAt(now)
	if have >= float64(n) {
		return 0
	}
	secs := (float64(n) - have) / float64(lim.Limit())
	return max(time.Duration(math.Ceil(secs*float64(time.Second))), time.Microsecond)
}
