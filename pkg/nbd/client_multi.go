package nbd

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

var errClientNoMultiConn = errors.New("nbd: server does not advertise multi-conn (NBD_FLAG_CAN_MULTI_CONN)")

// MultiClient spreads requests round-robin over several connections to
// the same export. It requires the server to advertise FlagCanMultiConn
// (for more than one connection), which guarantees that a flush on any
// connection covers writes completed on all of them.
type MultiClient struct {
	conns []*Client
	next  atomic.Uint32
}

// DialMulti opens n connections to uri (see Dial). n > 1 requires the
// server to advertise FlagCanMultiConn.
func DialMulti(ctx context.Context, uri string, cfg ClientConfig, n int) (*MultiClient, error) {
	if n < 1 {
		return nil, fmt.Errorf("nbd: DialMulti: need at least one connection, got %d", n)
	}
	first, err := Dial(ctx, uri, cfg)
	if err != nil {
		return nil, err
	}
	if n > 1 && first.Flags()&FlagCanMultiConn == 0 {
		first.Close()
		return nil, errClientNoMultiConn
	}
	m := &MultiClient{conns: make([]*Client, n)}
	m.conns[0] = first
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 1; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := Dial(ctx, uri, cfg)
			if err == nil && (c.Size() != first.Size() || c.Flags() != first.Flags() ||
				!slices.Equal(c.metaNames, first.metaNames) || !slices.Equal(c.metaIDs, first.metaIDs)) {
				c.Close()
				err = fmt.Errorf("nbd: DialMulti: connection %d differs from connection 0 (size %d/%d, flags %#x/%#x, meta contexts %v=%v / %v=%v)",
					i, c.Size(), first.Size(), c.Flags(), first.Flags(), c.metaNames, c.metaIDs, first.metaNames, first.metaIDs)
			}
			m.conns[i], errs[i] = c, err
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

func (m *MultiClient) pick() *Client {
	return m.conns[(m.next.Add(1)-1)%uint32(len(m.conns))]
}

// Conns returns the underlying connections.
func (m *MultiClient) Conns() []*Client { return m.conns }

// Size is the export size.
func (m *MultiClient) Size() uint64 { return m.conns[0].Size() }

// Flags are the transmission flags.
func (m *MultiClient) Flags() uint16 { return m.conns[0].Flags() }

// BlockSize returns the server's size constraints.
func (m *MultiClient) BlockSize() (min, preferred, max uint32) { return m.conns[0].BlockSize() }

// Description is the export description.
func (m *MultiClient) Description() string { return m.conns[0].Description() }

// StructuredReplies reports whether structured replies were negotiated.
func (m *MultiClient) StructuredReplies() bool { return m.conns[0].StructuredReplies() }

// MetaContext returns the id of a negotiated meta context (DialMulti
// checks that every connection got the same ids).
func (m *MultiClient) MetaContext(name string) (uint32, bool) { return m.conns[0].MetaContext(name) }

// ReadAt reads len(p) bytes at off on the next connection.
func (m *MultiClient) ReadAt(ctx context.Context, p []byte, off uint64) error {
	return m.pick().ReadAt(ctx, p, off)
}

// WriteAt writes p at off on the next connection.
func (m *MultiClient) WriteAt(ctx context.Context, p []byte, off uint64, flags uint16) error {
	return m.pick().WriteAt(ctx, p, off, flags)
}

// Flush flushes through one connection; with multi-conn this covers every
// write that has completed on any connection.
func (m *MultiClient) Flush(ctx context.Context) error { return m.pick().Flush(ctx) }

// Trim discards a range on the next connection.
func (m *MultiClient) Trim(ctx context.Context, off, length uint64, flags uint16) error {
	return m.pick().Trim(ctx, off, length, flags)
}

// Zero zeroes a range on the next connection.
func (m *MultiClient) Zero(ctx context.Context, off, length uint64, flags uint16) error {
	return m.pick().Zero(ctx, off, length, flags)
}

// Cache prefetches a range on the next connection.
func (m *MultiClient) Cache(ctx context.Context, off, length uint64) error {
	return m.pick().Cache(ctx, off, length)
}

// BlockStatus queries block status on the next connection.
func (m *MultiClient) BlockStatus(ctx context.Context, off, length uint64, flags uint16, fn func(contextID uint32, length uint64, status uint32)) error {
	return m.pick().BlockStatus(ctx, off, length, flags, fn)
}

// Do sends a raw request on the next connection.
func (m *MultiClient) Do(ctx context.Context, cmd uint16, flags uint16, off uint64, length uint32, payload []byte, readBuf []byte) error {
	return m.pick().Do(ctx, cmd, flags, off, length, payload, readBuf)
}

// Close closes every connection.
func (m *MultiClient) Close() error {
	var wg sync.WaitGroup
	errs := make([]error, len(m.conns))
	for i, c := range m.conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.Close()
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}
