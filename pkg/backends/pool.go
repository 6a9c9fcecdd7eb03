package backends

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// ErrPoolClosed is returned by Acquire once the pool is closed.
var ErrPoolClosed = errors.New("device pool is closed")

// Pool shares one open Device among all NBD connections to one export, so
// they see one backend instance (one cache, one memory volume, one
// multi-conn consistency domain).
//
// Devices stay open after their last release until Close: opening can be
// expensive, and a memory: volume thereby keeps its data across
// connections for the life of the server.
type Pool struct {
	mu      sync.Mutex
	closed  bool
	devices map[string]*poolEntry // by canonical spec
	env     Env
}

type poolEntry struct {
	ready chan struct{} // closed once dev or err is set
	dev   Device
	err   error
	refs  int // Acquires not yet released; informational
}

// NewPool returns an empty pool whose devices are opened with env.
func NewPool(env Env) *Pool {
	return &Pool{devices: map[string]*poolEntry{}, env: env}
}

// Acquire returns the device for s, opening it on first use. It is keyed
// by the canonical s.String(), so equivalent spellings share a device.
// Concurrent Acquires of one spec open it once: the others wait for that
// open (or their ctx), and if it fails they all get its error and the next
// Acquire tries again. release drops the reference; calling it more than
// once is harmless.
func (p *Pool) Acquire(ctx context.Context, s Spec) (dev Device, release func(), err error) {
	key := s.String()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, nil, ErrPoolClosed
	}
	e, ok := p.devices[key]
	if !ok {
		e = &poolEntry{ready: make(chan struct{})}
		p.devices[key] = e
		p.mu.Unlock()
		return p.open(ctx, key, e, s)
	}
	p.mu.Unlock()

	select {
	case <-e.ready:
	case <-ctx.Done():
		return nil, nil, ctx.Err()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if e.err != nil {
		return nil, nil, e.err
	}
	if p.closed {
		return nil, nil, ErrPoolClosed
	}
	e.refs++
	return e.dev, p.releaser(e), nil
}

// open opens the device for e, which Acquire has just put in the map.
func (p *Pool) open(ctx context.Context, key string, e *poolEntry, s Spec) (Device, func(), error) {
	dev, err := Open(ctx, s, p.env)
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil && p.closed {
		// Close ran while we were opening and could not see dev.
		err = errors.Join(ErrPoolClosed, dev.Close())
		dev = nil
	}
	e.dev, e.err = dev, err
	close(e.ready)
	if err != nil {
		if p.devices[key] == e {
			delete(p.devices, key) // let the next Acquire retry
		}
		return nil, nil, err
	}
	e.refs++
	return dev, p.releaser(e), nil
}

func (p *Pool) releaser(e *poolEntry) func() {
	var done atomic.Bool
	return func() {
		if done.Swap(true) {
			return
		}
		p.mu.Lock()
		e.refs--
		p.mu.Unlock()
	}
}

// refs returns the unreleased references to s's device (for tests).
func (p *Pool) refs(s Spec) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := p.devices[s.String()]; ok {
		return e.refs
	}
	return 0
}

// Close flushes and closes every open device and makes later Acquires
// fail. It does not wait for references to be released: callers stop
// their connections first. Devices still being opened are closed when
// their open completes. It returns every flush and close error, joined.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	var open []*poolEntry
	var keys []string
	for k, e := range p.devices {
		if e.dev != nil {
			open = append(open, e)
			keys = append(keys, k)
		}
	}
	p.devices = nil
	p.mu.Unlock()

	var errs []error
	for i, e := range open {
		if err := e.dev.Flush(context.Background()); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", quote(keys[i]), err))
		}
		if err := e.dev.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close %s: %w", quote(keys[i]), err))
		}
	}
	return errors.Join(errs...)
}
