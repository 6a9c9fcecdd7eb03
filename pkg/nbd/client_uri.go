package nbd

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// ParseURI parses an NBD URI (doc/uri.md of the NBD project):
//
//	nbd://host[:port]/export     TCP (default port 10809, default host localhost)
//	nbds://host[:port]/export    TCP with TLS
//	nbd+unix:///export?socket=/path
//	nbds+unix:///export?socket=/path
//
// The export name is the percent-decoded path without its leading '/'.
// network is "tcp" or "unix"; address is host:port or the socket path.
func ParseURI(uri string) (network, address, export string, tls bool, err error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", "", "", false, fmt.Errorf("nbd: bad URI: %w", err)
	}
	bad := func(format string, args ...any) (string, string, string, bool, error) {
		return "", "", "", false, fmt.Errorf("nbd: bad URI %q: %s", uri, fmt.Sprintf(format, args...))
	}
	switch strings.ToLower(u.Scheme) {
	case "nbd":
		network = "tcp"
	case "nbds":
		network, tls = "tcp", true
	case "nbd+unix":
		network = "unix"
	case "nbds+unix":
		network, tls = "unix", true
	case "":
		return bad("missing scheme (want nbd://, nbds://, nbd+unix:// or nbds+unix://)")
	default:
		return bad("unsupported scheme %q", u.Scheme)
	}
	if u.Opaque != "" {
		return bad("expected %s://", u.Scheme)
	}
	if u.User != nil {
		return bad("user info (TLS-PSK) is not supported")
	}
	if u.Path != "" {
		if u.Path[0] != '/' {
			return bad("path must start with '/'")
		}
		export = u.Path[1:]
	}
	q, err := url.ParseQuery(u.RawQuery)
	if err != nil {
		return bad("query: %v", err)
	}
	if network == "unix" {
		if u.Host != "" {
			return bad("%s:// URIs take no host", u.Scheme)
		}
		sock := q.Get("socket")
		if sock == "" {
			return bad("missing socket= query parameter")
		}
		return network, sock, export, tls, nil
	}
	if q.Has("socket") {
		return bad("socket= is only valid with %s+unix://", u.Scheme)
	}
	host, port := u.Hostname(), u.Port()
	if strings.ContainsAny(host, "[]") {
		return bad("bad host %q", u.Host) // net/url lets a stray bracket through
	}
	if host == "" {
		host = "localhost"
	}
	if port == "" {
		port = clientDefaultPort
	} else if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return bad("bad port %q", port)
	}
	return network, net.JoinHostPort(host, port), export, tls, nil
}

// Dial connects to the NBD URI uri and performs the handshake. The URI
// names the export (overriding cfg.ExportName). TLS is used if the scheme
// is nbds:// or nbds+unix://, or if cfg.TLS is set; an nbds URI without
// cfg.TLS uses a default tls.Config. For TCP, an empty ServerName is set
// to the URI's host, TCP_NODELAY is enabled, and a server on this host is
// reached with the loopback congestion control (see loopbackCongestion).
func Dial(ctx context.Context, uri string, cfg ClientConfig) (*Client, error) {
	network, address, export, useTLS, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	cfg.ExportName = export
	if useTLS && cfg.TLS == nil {
		cfg.TLS = &tls.Config{}
	}
	if cfg.TLS != nil && cfg.TLS.ServerName == "" && network == "tcp" {
		cfg.TLS = cfg.TLS.Clone()
		cfg.TLS.ServerName, _, _ = net.SplitHostPort(address)
	}
	d := net.Dialer{Control: loopbackDialControl}
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s: %w", uri, err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		if err := tc.SetNoDelay(true); err != nil {
			conn.Close()
			return nil, fmt.Errorf("nbd: dial %s: %w", uri, err)
		}
	}
	c, err := NewClient(ctx, conn, cfg)
	if err != nil {
		return nil, err
	}
	return c, nil
}
