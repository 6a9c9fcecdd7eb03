package nbdremote

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// Device is a volume on a remote NBD server, over one or more connections
// that are re-established when they drop. It is safe for concurrent use;
// each connection carries any number of requests at once.
type Device struct {
	uri     string
	cfg     nbd.ClientConfig
	timeout time.Duration
	size    uint64
	flags   uint16
	extents bool
	caps    backends.Caps

	slots   []*slot
	next    atomic.Uint32
	closed  atomic.Bool
	closeCh chan struct{}
}

// slot is one connection, replaced when it breaks. At most one dial runs
// per slot; requests wanting the slot meanwhile wait for it.
type slot struct {
	id      int
	mu      sync.Mutex
	c       *nbd.Client   // nil while disconnected
	dialing chan struct{} // closed when the running dial ends
	err     error         // why the last dial failed
	retry   backoff
	nextTry time.Time // no new dial before this, after a failure
}

var _ backends.Device = (*Device)(nil)

// errClosed is returned by requests on a closed device.
var errClosed = fmt.Errorf("nbd: device closed: %w", syscall.EIO)

func (d *Device) Size() uint64        { return d.size }
func (d *Device) Caps() backends.Caps { return d.caps }

// client returns s's connection, dialling (once, for all waiters) if it
// has none. On ctx's end it returns the last dial error, if any.
func (d *Device) client(ctx context.Context, s *slot) (*nbd.Client, error) {
	for {
		s.mu.Lock()
		if d.closed.Load() {
			s.mu.Unlock()
			return nil, errClosed
		}
		if s.c != nil {
			c := s.c
			s.mu.Unlock()
			return c, nil
		}
		if s.dialing == nil {
			if wait := time.Until(s.nextTry); wait > 0 {
				last := s.err
				s.mu.Unlock()
				if !backends.Sleep(ctx, wait) {
					return nil, waitErr(ctx, last)
				}
				continue
			}
			s.dialing = make(chan struct{})
			go d.redial(s, s.dialing)
		}
		ch, last := s.dialing, s.err
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, waitErr(ctx, last)
		}
	}
}

func waitErr(ctx context.Context, last error) error {
	if last != nil {
		return last
	}
	return ctx.Err()
}

// redial connects s again; it runs detached from any one request (its
// waiters may give up, the next ones want the connection) but ends with
// Close.
func (d *Device) redial(s *slot, done chan struct{}) {
	ctx, cancel := context.WithTimeout(context.Background(), d.timeout)
	defer cancel()
	go func() {
		select {
		case <-d.closeCh:
			cancel()
		case <-ctx.Done():
		}
	}()
	c, err := d.dial(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dialing = nil
	close(done)
	if err != nil {
		s.err = err
		wait := s.retry.next()
		s.nextTry = time.Now().Add(wait)
		klog.V(1).InfoS("nbd: reconnect failed", "uri", d.uri, "connection", s.id, "retryIn", wait, "err", err)
		return
	}
	if d.closed.Load() {
		c.Close()
		return
	}
	klog.InfoS("nbd: reconnected", "uri", d.uri, "connection", s.id)
	s.c, s.err, s.retry, s.nextTry = c, nil, backoff{}, time.Time{}
}

// drop forgets c as s's connection (if it still is) and closes it, failing
// its other requests, which then retry on the next connection.
func (d *Device) drop(s *slot, c *nbd.Client, why error) {
	s.mu.Lock()
	mine := s.c == c
	if mine {
		s.c = nil
	}
	s.mu.Unlock()
	if mine {
		klog.InfoS("nbd: connection lost, reconnecting", "uri", d.uri, "connection", s.id, "err", why)
		go c.Close()
	}
}

// retriable reports whether a request that failed with err should be sent
// again on a new connection: the connection broke (as opposed to the
// server answering with an error), or the server is shutting down.
func retriable(err error) bool {
	var ne *nbd.Error
	if errors.As(err, &ne) {
		return ne.Errno == nbd.ESHUTDOWN
	}
	// Anything else is the connection failing: EOF, a reset, a protocol
	// violation, a stall, or ErrClientClosed because another request
	// already dropped it.
	return true
}

// do runs op on a connection, retrying on fresh ones after connection
// failures until d.timeout has passed since the request began. A
// request still unanswered at the timeout fails with EIO, and its
// connection is treated as dead (like the kernel's nbd timeout).
//
// Repeating a write is safe when its first copy died with the server or
// the connection. When a server was merely slow (a timed-out request
// whose connection we dropped), it may still carry out the old copy
// later, after newer writes to the same blocks: the kernel's nbd driver,
// which requeues timed-out requests, has the same hazard, and a timeout
// well above the server's worst latency avoids it.
func (d *Device) do(ctx context.Context, what string, op func(context.Context, *nbd.Client) error) error {
	if d.closed.Load() {
		return errClosed
	}
	s := d.slots[int(d.next.Add(1)-1)%len(d.slots)]
	actx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	var last error
	for tries := 1; ; tries++ {
		c, err := d.client(actx, s)
		if err == nil {
			err = op(actx, c)
			if err == nil {
				return nil
			}
			if ctx.Err() == nil && actx.Err() != nil {
				d.drop(s, c, fmt.Errorf("%s not answered within %v", what, d.timeout))
			} else if ctx.Err() == nil && retriable(err) {
				d.drop(s, c, err)
			}
		}
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, errClosed):
			return err
		case actx.Err() != nil:
			if last == nil || !errors.Is(err, context.DeadlineExceeded) {
				last = err
			}
			return fmt.Errorf("nbd: %s on %s: no answer within %v (attempts: %d, last error: %v): %w",
				what, d.uri, d.timeout, tries, last, syscall.EIO)
		case !retriable(err):
			return err
		}
		last = err
		klog.V(2).InfoS("nbd: retrying request", "uri", d.uri, "op", what, "attempt", tries, "err", err)
	}
}

func (d *Device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	return d.do(ctx, "read", func(ctx context.Context, c *nbd.Client) error {
		return c.ReadAt(ctx, p, off)
	})
}

func (d *Device) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if d.caps.ReadOnly {
		return backends.ErrReadOnly
	}
	flags := d.fuaFlag(fua)
	err := d.do(ctx, "write", func(ctx context.Context, c *nbd.Client) error {
		return c.WriteAt(ctx, p, off, flags)
	})
	if err == nil && fua && !d.caps.FUA {
		err = d.Flush(ctx)
	}
	return err
}

func (d *Device) Flush(ctx context.Context) error {
	if !d.caps.Flush || d.caps.ReadOnly {
		return nil
	}
	return d.do(ctx, "flush", func(ctx context.Context, c *nbd.Client) error {
		return c.Flush(ctx)
	})
}

// Trim forwards the hint if the server takes it; otherwise it is a no-op.
func (d *Device) Trim(ctx context.Context, off, length uint64, fua bool) error {
	if d.caps.ReadOnly {
		return backends.ErrReadOnly
	}
	if !d.caps.Trim {
		return d.fuaFlush(ctx, fua)
	}
	flags := d.fuaFlag(fua)
	err := d.do(ctx, "trim", func(ctx context.Context, c *nbd.Client) error {
		return c.Trim(ctx, off, length, flags)
	})
	if err == nil && fua && !d.caps.FUA {
		err = d.Flush(ctx)
	}
	return err
}

// Zero sends NBD_CMD_WRITE_ZEROES, or writes zeros if the server lacks it.
func (d *Device) Zero(ctx context.Context, off, length uint64, zf backends.ZeroFlags) error {
	if d.caps.ReadOnly {
		return backends.ErrReadOnly
	}
	fua := zf&backends.ZeroFUA != 0
	if zf&backends.ZeroFast != 0 && !d.caps.FastZero {
		return fmt.Errorf("nbd: %s cannot zero fast: %w", d.uri, backends.ErrNotSupported)
	}
	if !d.caps.Zero {
		return d.writeZeros(ctx, off, length, fua)
	}
	flags := d.fuaFlag(fua)
	if zf&backends.ZeroNoHole != 0 {
		flags |= nbd.CmdFlagNoHole
	}
	if zf&backends.ZeroFast != 0 {
		flags |= nbd.CmdFlagFastZero
	}
	err := d.do(ctx, "zero", func(ctx context.Context, c *nbd.Client) error {
		return c.Zero(ctx, off, length, flags)
	})
	if err == nil && fua && !d.caps.FUA {
		err = d.Flush(ctx)
	}
	return err
}

var zeroBuf = make([]byte, 1<<20) // never written

func (d *Device) writeZeros(ctx context.Context, off, length uint64, fua bool) error {
	for length > 0 {
		n := min(length, uint64(len(zeroBuf)))
		if err := d.WriteAt(ctx, zeroBuf[:n], off, false); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return d.fuaFlush(ctx, fua)
}

func (d *Device) fuaFlag(fua bool) uint16 {
	if fua && d.caps.FUA {
		return nbd.CmdFlagFUA
	}
	return 0
}

func (d *Device) fuaFlush(ctx context.Context, fua bool) error {
	if fua {
		return d.Flush(ctx)
	}
	return nil
}

// Extents asks the server for base:allocation; without it, all is data.
func (d *Device) Extents(ctx context.Context, off, length uint64, add func(backends.Extent)) error {
	if !d.extents || length == 0 {
		add(backends.Extent{Length: length})
		return nil
	}
	var exts []backends.Extent
	err := d.do(ctx, "block status", func(ctx context.Context, c *nbd.Client) error {
		exts = exts[:0]
		// Context ids are per connection: look it up on this one.
		id, ok := c.MetaContext("base:allocation")
		if !ok {
			return fmt.Errorf("nbd: %s no longer offers base:allocation: %w", d.uri, syscall.EIO)
		}
		return c.BlockStatus(ctx, off, length, 0, func(ctxID uint32, n uint64, status uint32) {
			if ctxID == id {
				exts = append(exts, backends.Extent{Length: n, Flags: backends.ExtentFlags(status) & (backends.ExtentHole | backends.ExtentZero)})
			}
		})
	})
	if err != nil {
		return err
	}
	if len(exts) == 0 {
		return fmt.Errorf("nbd: %s: block status with no extents: %w", d.uri, syscall.EIO)
	}
	for _, e := range exts {
		add(e)
	}
	return nil
}

// Cache forwards the prefetch hint if the server takes it.
func (d *Device) Cache(ctx context.Context, off, length uint64) error {
	if !d.caps.Cache {
		return nil
	}
	return d.do(ctx, "cache", func(ctx context.Context, c *nbd.Client) error {
		return c.Cache(ctx, off, length)
	})
}

// closeFlushWait bounds the flush Close makes, whatever the timeout.
const closeFlushWait = 30 * time.Second

// Close flushes and closes every connection. The flush is skipped when no
// connection is up (a server that is gone cannot be made to persist
// anything), and bounded by the timeout and closeFlushWait.
func (d *Device) Close() error {
	if d.closed.Load() {
		return nil
	}
	var err error
	if d.connected() {
		ctx, cancel := context.WithTimeout(context.Background(), min(d.timeout, closeFlushWait))
		err = d.Flush(ctx)
		cancel()
	}
	d.closeAll()
	return err
}

func (d *Device) connected() bool {
	for _, s := range d.slots {
		s.mu.Lock()
		up := s.c != nil
		s.mu.Unlock()
		if up {
			return true
		}
	}
	return false
}

func (d *Device) closeAll() {
	if d.closed.Swap(true) {
		return
	}
	close(d.closeCh)
	var wg sync.WaitGroup
	for _, s := range d.slots {
		if s == nil {
			continue
		}
		s.mu.Lock()
		c := s.c
		s.c = nil
		s.mu.Unlock()
		if c != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.Close()
			}()
		}
	}
	wg.Wait()
}
