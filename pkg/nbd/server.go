package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// ErrUnknownExport and ErrNotAllowed are what an ExportSource wraps to tell
// the client why an export name cannot be opened.
var (
	ErrUnknownExport = errors.New("unknown export")
	ErrNotAllowed    = errors.New("export not allowed by server policy")
)

// ExportSource resolves export names. It is how the server stays ignorant
// of specs, pools and policy: `csi-nbd serve` and the node plugin each
// provide one.
type ExportSource interface {
	// Open returns the device behind name ("" is the default export) and
	// a function the server calls once it no longer uses the device.
	Open(ctx context.Context, name string) (*Export, func(), error)
	// List returns what NBD_OPT_LIST advertises.
	List(ctx context.Context) []ExportInfo
}

// Export is an opened export.
type Export struct {
	Device      backends.Device
	Description string
	ReadOnly    bool // serve read-only even if the device is writable
}

// ExportInfo describes one export for NBD_OPT_LIST.
type ExportInfo struct {
	Name        string
	Description string
}

// TLSMode says whether STARTTLS is offered and whether it is mandatory,
// like nbdkit's --tls=off|on|require.
type TLSMode int

const (
	TLSOff TLSMode = iota
	TLSOn
	TLSRequire
)

// ParseTLSMode parses "off", "on" or "require".
func ParseTLSMode(s string) (TLSMode, error) {
	switch s {
	case "off", "":
		return TLSOff, nil
	case "on":
		return TLSOn, nil
	case "require":
		return TLSRequire, nil
	}
	return TLSOff, fmt.Errorf("invalid TLS mode %q (want off, on or require)", s)
}

// ServerConfig configures a Server.
type ServerConfig struct {
	Exports ExportSource
	TLSMode TLSMode
	TLS     *tls.Config // required unless TLSMode is TLSOff
	// MaxInFlight bounds the requests one connection may have in flight
	// (default 128); MaxBufferedBytes bounds the payload bytes they hold
	// (default 128 MiB). Together they bound a connection's memory.
	MaxInFlight      int
	MaxBufferedBytes int64
	// HandshakeTimeout bounds option negotiation (default 30 s) so an idle
	// client cannot hold a connection slot before choosing an export.
	HandshakeTimeout time.Duration
}

// Server serves NBD over any number of listeners and connections.
type Server struct {
	cfg ServerConfig

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	closing   bool
	wg        sync.WaitGroup
}

// NewServer checks cfg and returns a Server.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Exports == nil {
		return nil, errors.New("nbd: ServerConfig.Exports is required")
	}
	if cfg.TLSMode != TLSOff && cfg.TLS == nil {
		return nil, errors.New("nbd: TLS is enabled but no TLS configuration was given")
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 128
	}
	if cfg.MaxBufferedBytes <= 0 {
		cfg.MaxBufferedBytes = 128 << 20
	}
	if cfg.MaxBufferedBytes < DefaultMaxPayload {
		cfg.MaxBufferedBytes = DefaultMaxPayload
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 30 * time.Second
	}
	return &Server{
		cfg:       cfg,
		listeners: map[net.Listener]struct{}{},
		conns:     map[*serverConn]struct{}{},
	}, nil
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Serve accepts connections on ln until Shutdown or an accept error.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()

	inherited := tuneListener(ln)
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Out of file descriptors and the like: back off, as
				// net/http does, instead of spinning.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept on %s: %w", ln.Addr(), err)
		}
		backoff = 0
		if tc, ok := conn.(*net.TCPConn); ok {
			tuneTCP(tc, inherited)
		}
		if !s.ServeConn(ctx, conn) {
			return ErrServerClosed
		}
	}
}

// ServeConn serves one already accepted connection (TCP, unix, a
// socketpair) in a new goroutine, starting with the handshake. It returns
// false, closing conn, if the server is shutting down.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn) bool {
	c := newServerConn(s, conn)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		conn.Close()
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer func() {
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
		c.serve(ctx)
	}()
	return true
}

// Shutdown stops accepting, lets every connection finish the requests it
// has in flight, closes them, and waits (until ctx is done) for all of it.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			c.closeNow()
		}
		s.mu.Unlock()
		return ctx.Err()
	}
}

func logConn(c *serverConn) klog.Logger {
	return klog.Background().WithValues("remote", c.remote)
}
