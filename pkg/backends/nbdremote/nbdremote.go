// Package nbdremote is the backend for volumes on another NBD server,
// named by NBD URIs (the NBD project's doc/uri.md):
//
//	nbd://host[:port]/export           TCP (port 10809 by default)
//	nbds://host[:port]/export          TCP with TLS
//	nbd+unix:///export?socket=/path    a unix socket
//	nbds+unix:///export?socket=/path   a unix socket with TLS
//
// Options: connections=N (multi-conn, when the server advertises
// NBD_FLAG_CAN_MULTI_CONN), timeout= (connecting, and how long a request
// may keep retrying), tls-certificates=DIR (libnbd's layout: ca-cert.pem,
// client-cert.pem, client-key.pem; without it the system's CAs).
//
// A dropped connection is re-established with backoff, and the requests
// that failed with it are sent again on the new one: every NBD command
// (read, write, flush, trim, zero, cache, block status) can be repeated
// without changing its outcome. A request gives up with EIO when the
// timeout has passed without an answer, or returns at once when its
// context is cancelled. Errors the server answers with are returned as
// they are, except ESHUTDOWN (the server is going away: retried).
package nbdremote

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// maxConnections bounds connections= (each is a socket and a goroutine on
// both ends; beyond a handful they stop helping).
const maxConnections = 16

// Secret keys read from Env (a Kubernetes TLS Secret's layout), used when
// tls-certificates is not set.
const (
	secretCA   = "ca.crt"
	secretCert = "tls.crt"
	secretKey  = "tls.key"
)

var schemes = []string{"nbd", "nbds", "nbd+unix", "nbds+unix"}

func init() {
	for _, scheme := range schemes {
		backends.Register(backends.Backend{
			Scheme: scheme,
			Doc:    "An export of another NBD server: " + scheme + "://... (NBD URI; reconnects and retries on a dropped connection).",
			Options: []backends.Option{
				{Key: "connections", Kind: backends.OptInt, Default: "1",
					Doc: "Connections to the server (multi-conn); more than 1 only if it advertises NBD_FLAG_CAN_MULTI_CONN."},
				{Key: "timeout", Kind: backends.OptDuration, Default: "30s",
					Doc: "How long connecting may take, and how long a request keeps retrying over reconnects before failing with EIO."},
				{Key: "tls-certificates", Kind: backends.OptString,
					Doc: "nbds: directory with ca-cert.pem and optionally client-cert.pem and client-key.pem (default: system CAs, or the ca.crt/tls.crt/tls.key secrets)."},
			},
			Validate: func(s backends.Spec) error {
				_, err := parseOptions(s)
				return err
			},
			Open: func(ctx context.Context, s backends.Spec, env backends.Env) (backends.Device, error) {
				o, err := parseOptions(s)
				if err != nil {
					return nil, err
				}
				o.TLS, err = tlsConfig(o, env)
				if err != nil {
					return nil, err
				}
				return Open(ctx, o)
			},
		})
	}
}

// Options configure Open.
type Options struct {
	URI         string
	Connections int
	Timeout     time.Duration
	// CertDir is the tls-certificates directory; TLS is the configuration
	// built from it (or from secrets) for nbds URIs.
	CertDir string
	TLS     *tls.Config
	tls     bool // the URI asks for TLS
}

func parseOptions(s backends.Spec) (Options, error) {
	network, addr, _, useTLS, err := nbd.ParseURI(s.URL)
	if err != nil {
		return Options{}, err
	}
	if network == "unix" && !filepath.IsAbs(addr) {
		// Relative to whichever directory the server happens to run in.
		return Options{}, fmt.Errorf("nbd: bad URI %q: socket= must be an absolute path, not %q", s.URL, addr)
	}
	o := Options{URI: s.URL, tls: useTLS}
	n, _ := s.Int("connections")
	if n < 1 || n > maxConnections {
		return Options{}, fmt.Errorf("nbd: option %q: %d is not between 1 and %d", "connections", n, maxConnections)
	}
	o.Connections = int(n)
	o.Timeout, _ = s.Duration("timeout")
	if o.Timeout <= 0 {
		return Options{}, fmt.Errorf("nbd: option %q: must be more than 0", "timeout")
	}
	if dir, ok := s.Value("tls-certificates"); ok {
		if !useTLS {
			return Options{}, fmt.Errorf("nbd: option %q needs a TLS URI (nbds:// or nbds+unix://), not %s", "tls-certificates", s.Scheme())
		}
		if !filepath.IsAbs(dir) {
			return Options{}, fmt.Errorf("nbd: option %q: %q is not an absolute path", "tls-certificates", dir)
		}
		o.CertDir = dir
	}
	return o, nil
}

// tlsConfig builds the client TLS configuration for an nbds URI: trust and
// client certificate from o.CertDir if set, else from env's secrets if
// present, else the system's CAs and no client certificate.
func tlsConfig(o Options, env backends.Env) (*tls.Config, error) {
	if !o.tls {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	var ca, cert, key []byte
	if o.CertDir != "" {
		read := func(name string) ([]byte, error) {
			b, err := os.ReadFile(filepath.Join(o.CertDir, name))
			if errors.Is(err, os.ErrNotExist) {
				return nil, nil
			}
			if err != nil {
				return nil, fmt.Errorf("nbd: option %q: %w", "tls-certificates", err)
			}
			return b, nil
		}
		var err error
		if ca, err = read("ca-cert.pem"); err != nil {
			return nil, err
		}
		if cert, err = read("client-cert.pem"); err != nil {
			return nil, err
		}
		if key, err = read("client-key.pem"); err != nil {
			return nil, err
		}
		if ca == nil && cert == nil {
			return nil, fmt.Errorf("nbd: option %q: %s holds neither ca-cert.pem nor client-cert.pem", "tls-certificates", o.CertDir)
		}
	} else {
		if v, ok := env.Secret(secretCA); ok {
			ca = []byte(v)
		}
		if v, ok := env.Secret(secretCert); ok {
			cert = []byte(v)
		}
		if v, ok := env.Secret(secretKey); ok {
			key = []byte(v)
		}
	}
	if ca != nil {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(ca) {
			return nil, fmt.Errorf("nbd: TLS: no PEM certificate in the CA file")
		}
		cfg.RootCAs = pool
	}
	if (cert == nil) != (key == nil) {
		return nil, fmt.Errorf("nbd: TLS: a client certificate needs both its certificate and its key")
	}
	if cert != nil {
		pair, err := tls.X509KeyPair(cert, key)
		if err != nil {
			// The error text never includes key material.
			return nil, fmt.Errorf("nbd: TLS: client certificate: %v", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// Open connects to o.URI (retrying errors that look transient, such as
// a refused connection, until o.Timeout) and returns the device.
func Open(ctx context.Context, o Options) (*Device, error) {
	if o.Connections < 1 {
		o.Connections = 1
	}
	if o.Timeout <= 0 {
		o.Timeout = 30 * time.Second
	}
	d := &Device{
		uri:     o.URI,
		cfg:     nbd.ClientConfig{TLS: o.TLS},
		timeout: o.Timeout,
		closeCh: make(chan struct{}),
	}
	octx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	first, err := d.dialRetry(octx)
	if err != nil {
		return nil, err
	}
	d.size, d.flags = first.Size(), first.Flags()
	_, d.extents = first.MetaContext("base:allocation")
	n := o.Connections
	if n > 1 && d.flags&nbd.FlagCanMultiConn == 0 {
		klog.InfoS("nbd: server does not advertise multi-conn: using one connection", "uri", d.uri, "connections", n)
		n = 1
	}
	d.slots = make([]*slot, n)
	for i := range d.slots {
		d.slots[i] = &slot{id: i}
	}
	d.slots[0].c = first
	for i := 1; i < n; i++ {
		c, err := d.dial(octx)
		if err != nil {
			d.closeAll()
			return nil, fmt.Errorf("nbd: connection %d of %d to %s: %w", i+1, n, d.uri, err)
		}
		d.slots[i].c = c
	}
	d.caps = capsOf(first, n)
	return d, nil
}

// capsOf mirrors the server's transmission flags.
func capsOf(c *nbd.Client, conns int) backends.Caps {
	f := c.Flags()
	has := func(flag uint16) bool { return f&flag != 0 }
	_, ext := c.MetaContext("base:allocation")
	minBS, prefBS, maxBS := c.BlockSize()
	return backends.Caps{
		ReadOnly: has(nbd.FlagReadOnly),
		Flush:    has(nbd.FlagSendFlush),
		FUA:      has(nbd.FlagSendFUA),
		Trim:     has(nbd.FlagSendTrim),
		Zero:     has(nbd.FlagSendWriteZeroes),
		FastZero: has(nbd.FlagSendWriteZeroes) && has(nbd.FlagSendFastZero),
		Extents:  ext,
		Cache:    has(nbd.FlagSendCache),
		// One connection carries every write our clients make, so a
		// flush on it covers them all, multi-conn server or not.
		MultiConn:  conns == 1 || has(nbd.FlagCanMultiConn),
		Rotational: has(nbd.FlagRotational),
		MinBlock:   minBS, PrefBlock: prefBS, MaxBlock: maxBS,
	}
}

// dialRetry dials until it succeeds, fails for a reason waiting will not
// fix, or ctx ends (then with the last error, naming the URI).
func (d *Device) dialRetry(ctx context.Context) (*nbd.Client, error) {
	b := backoff{}
	for {
		c, err := d.dial(ctx)
		if err == nil {
			return c, nil
		}
		if !transient(err, d.cfg.TLS != nil) {
			return nil, err
		}
		if !backends.Sleep(ctx, b.next()) || ctx.Err() != nil {
			return nil, fmt.Errorf("nbd: cannot connect to %s within %v: %w", d.uri, d.timeout, err)
		}
	}
}

// dial opens one connection. Later connections must show the export as
// the first one did: a server that changed it underneath is not the
// volume any more.
func (d *Device) dial(ctx context.Context) (*nbd.Client, error) {
	c, err := nbd.Dial(ctx, d.uri, d.cfg)
	if err != nil {
		var ne net.Error
		if ctx.Err() != nil || errors.As(err, &ne) && ne.Timeout() {
			err = fmt.Errorf("%w (no answer within %v)", err, d.timeout)
		}
		return nil, err
	}
	if d.size != 0 {
		if c.Size() != d.size || c.Flags() != d.flags {
			c.Close()
			return nil, fmt.Errorf("nbd: %s changed: size %d, flags %#x; was size %d, flags %#x",
				d.uri, c.Size(), c.Flags(), d.size, d.flags)
		}
	}
	return c, nil
}

// transient reports whether a failure to connect may go away by itself
// (the server is restarting), as opposed to a wrong export, a TLS or
// protocol failure, or a name that does not resolve. Over TLS, a
// connection cut during the handshake is how a server turns down our
// certificate (TLS 1.3 reports it only at the first read), so it counts
// as final.
func transient(err error, overTLS bool) bool {
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return dnsErr.IsTemporary || dnsErr.IsTimeout
	}
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
		return true // nobody listening (yet)
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return !overTLS
	}
	var oe *nbd.OptionError
	if errors.As(err, &oe) {
		return oe.Reply == repErrShutdown
	}
	var ne *net.OpError
	return errors.As(err, &ne) && ne.Op == "dial"
}

// repErrShutdown is NBD_REP_ERR_SHUTDOWN: the server is going away.
const repErrShutdown = 1<<31 | 11

// backoff yields 50ms, 100ms, ... up to 2s.
type backoff struct{ d time.Duration }

func (b *backoff) next() time.Duration {
	switch {
	case b.d == 0:
		b.d = 50 * time.Millisecond
	case b.d < 2*time.Second:
		b.d = min(2*b.d, 2*time.Second)
	}
	return b.d
}
