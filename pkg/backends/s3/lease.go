package s3

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// leaseBody is the lease object, PREFIX/lease. Expires is the holder's
// wall clock: hosts sharing volumes need roughly synchronised clocks (a
// skew eats into the TTL, nothing worse, as long as it is well below it).
type leaseBody struct {
	Owner   string    `json:"owner"`
	Expires time.Time `json:"expires"`
}

// lease is a writer's hold on a volume. Every change of the lease object
// is conditional on the ETag last seen (If-Match) or on its absence
// (If-None-Match: *), so of two writers racing for it exactly one wins.
type lease struct {
	b     *bucket
	owner string
	ttl   time.Duration

	mu         sync.Mutex
	etag       string
	validUntil time.Time // local clock; uploads stop after it
	lastErr    error     // why the last renewal failed
	lost       error     // set for good when another owner took over

	stop chan struct{}
	done chan struct{}
}

// acquireLease takes the lease for owner, or fails with ErrLeased naming
// the holder if another owner holds an unexpired one. The same owner
// takes its own lease back (a restarted server or node).
func acquireLease(ctx context.Context, b *bucket, owner string, ttl time.Duration) (*lease, error) {
	l := &lease{b: b, owner: owner, ttl: ttl, stop: make(chan struct{}), done: make(chan struct{})}
	key := b.loc.key(leaseName)
	for attempt := 0; ; attempt++ {
		body, etag, err := b.getSmall(ctx, key)
		c := cond{ifNoneMatch: true}
		switch {
		case errors.Is(err, errNoObject):
		case err != nil:
			return nil, err
		default:
			var h leaseBody
			if err := json.Unmarshal(body, &h); err != nil {
				return nil, fmt.Errorf("s3: malformed lease object %s/%s: %w (delete it if no writer is running)", b.loc, leaseName, err)
			}
			if h.Owner != owner && time.Now().Before(h.Expires) {
				return nil, fmt.Errorf("%w: %s is held by %q until %s; it can be taken over once released or expired: %w",
					ErrLeased, b.loc, h.Owner, h.Expires.Format(time.RFC3339), syscall.EBUSY)
			}
			c = cond{ifMatch: etag}
		}
		err = l.write(ctx, c)
		if errors.Is(err, errPrecondition) && attempt < 3 {
			continue // someone else moved first: look again
		}
		if errors.Is(err, errPrecondition) {
			return nil, fmt.Errorf("%w: %s: the lease keeps changing under us", ErrLeased, b.loc)
		}
		if err != nil {
			return nil, err
		}
		go l.renewLoop()
		return l, nil
	}
}

// write puts a fresh lease body under precondition c.
func (l *lease) write(ctx context.Context, c cond) error {
	start := time.Now()
	body, _ := json.Marshal(leaseBody{Owner: l.owner, Expires: start.Add(l.ttl).UTC()})
	etag, err := l.b.put(ctx, l.b.loc.key(leaseName), body, c)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.etag, l.validUntil, l.lastErr = etag, start.Add(l.ttl), nil
	l.mu.Unlock()
	return nil
}

// renewLoop renews the lease every third of its TTL (every sixth after a
// failure) until release.
func (l *lease) renewLoop() {
	defer close(l.done)
	every := l.ttl / 3
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		err := l.renew()
		next := every
		if err != nil {
			next = l.ttl / 6
			l.mu.Lock()
			l.lastErr = err
			l.mu.Unlock()
			klog.Background().Error(err, "s3 lease renewal failed", "volume", l.b.loc.String())
		}
		if errors.Is(l.check(), ErrLeased) {
			return // taken over: nothing left to renew
		}
		t.Reset(next)
	}
}

func (l *lease) renew() error {
	ctx, cancel := context.WithTimeout(context.Background(), l.ttl/3)
	defer cancel()
	l.mu.Lock()
	etag := l.etag
	l.mu.Unlock()
	err := l.write(ctx, cond{ifMatch: etag})
	if !errors.Is(err, errPrecondition) {
		return err
	}
	// The object changed: if it is still ours (an earlier renewal went
	// through but its answer was lost), carry on with its ETag; if not,
	// another writer took over after our lease lapsed.
	body, etag, err := l.b.getSmall(ctx, l.b.loc.key(leaseName))
	if err != nil && !errors.Is(err, errNoObject) {
		return err
	}
	var h leaseBody
	if err == nil && json.Unmarshal(body, &h) == nil && h.Owner == l.owner {
		return l.write(ctx, cond{ifMatch: etag})
	}
	l.mu.Lock()
	if h.Owner == "" {
		h.Owner = "(released)"
	}
	l.lost = fmt.Errorf("%w: lost the lease on %s to %q (it lapsed before renewal): %w",
		ErrLeased, l.b.loc, h.Owner, syscall.EIO)
	l.mu.Unlock()
	return l.lost
}

// check says whether this writer may still change the volume: the lease
// has been renewed within its TTL and nobody else took it over.
func (l *lease) check() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lost != nil {
		return l.lost
	}
	if time.Now().After(l.validUntil) {
		return fmt.Errorf("s3: lease on %s lapsed at %s (renewal failed: %v): %w",
			l.b.loc, l.validUntil.Format(time.RFC3339), l.lastErr, syscall.EIO)
	}
	return nil
}

// release stops renewing and deletes the lease if it is still ours.
func (l *lease) release(ctx context.Context) error {
	close(l.stop)
	<-l.done
	l.mu.Lock()
	etag, lost := l.etag, l.lost
	l.mu.Unlock()
	if lost != nil {
		return nil
	}
	err := l.b.del(ctx, l.b.loc.key(leaseName), cond{ifMatch: etag})
	if errors.Is(err, errPrecondition) {
		return nil // no longer ours: leave the new holder's alone
	}
	return err
}
