// Package httpdev is the http: and https: backend: a read-only volume
// whose bytes are one object on a web server, read with Range requests, as
// nbdkit's curl plugin does. The spec's URL is the origin URL itself, kept
// verbatim (a presigned URL's query string included):
//
//	https://download.example/f29.iso
//	timeout=10s,header-secret=token;https://host/disk.img
//
// Opening follows redirects once and pins the final URL, learns the size
// and pins the object by its validator (a strong ETag, else Last-Modified):
// every read is a conditional range GET, so an origin that changes under a
// running volume gives EIO, never a block mixing old and new data.
// Credentials come from a secret named by header-secret, never the spec;
// the URL's query is left out of errors and logs because on a presigned URL
// it is itself a credential.
package httpdev

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// Option keys.
const (
	optSize        = "size"
	optHeader      = "header-secret"
	optCA          = "ca"
	optTimeout     = "timeout"
	optConnections = "connections"
	optRetries     = "retries"
	optHTTP2       = "http2"
)

var options = []backends.Option{
	{Key: optSize, Kind: backends.OptSize,
		Doc: "Volume size, for origins that report none; when the origin reports one they must agree."},
	{Key: optHeader, Kind: backends.OptString,
		Doc: `Name of the secret holding credentials: an Authorization value ("Bearer TOKEN", "Basic ...") or "Header: value" lines. Sent only to the spec URL's host.`},
	{Key: optCA, Kind: backends.OptString,
		Doc: "PEM file of CA certificates to trust for https on top of the system's."},
	{Key: optTimeout, Kind: backends.OptDuration, Default: "30s",
		Doc: "Time limit of one request to the origin, from connecting to the last byte of its body."},
	{Key: optConnections, Kind: backends.OptInt, Default: "16",
		Doc: "Most requests in flight to the origin at once (and connections kept open to it)."},
	{Key: optRetries, Kind: backends.OptInt, Default: "5",
		Doc: "Retries of a failed read, with exponential backoff, on 5xx, 408, 429, timeouts and broken connections (opening retries only 5xx, 408 and 429)."},
	{Key: optHTTP2, Kind: backends.OptBool, Default: "true",
		Doc: "Offer HTTP/2 to https origins (one multiplexed connection); false keeps to HTTP/1.1 over up to connections connections."},
}

func init() {
	for _, scheme := range []string{"http", "https"} {
		backends.Register(backends.Backend{
			Scheme:   scheme,
			Options:  options,
			Doc:      "Read-only volume of one object on an " + scheme + " origin, read with Range requests (the spec's URL is the origin URL).",
			Validate: func(s backends.Spec) error { _, err := parseConfig(s); return err },
			Open:     open,
		})
	}
}

// config is a spec's settings, checked.
type config struct {
	url         *url.URL
	size        uint64 // 0: not given
	headerName  string
	ca          string
	timeout     time.Duration
	connections int
	retries     int
	http2       bool
}

// parseConfig checks what can be checked without the network, secrets or
// the node's files.
func parseConfig(s backends.Spec) (config, error) {
	var c config
	shown := Redact(s.URL)
	u, err := url.Parse(s.URL)
	if err != nil {
		// url.Parse's error repeats the whole URL, query included.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return c, fmt.Errorf("invalid URL %s: %v", shown, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return c, fmt.Errorf("URL %s: scheme must be http or https", shown)
	}
	if u.Host == "" || u.Hostname() == "" {
		return c, fmt.Errorf("URL %s has no host", shown)
	}
	if u.User != nil {
		return c, fmt.Errorf("URL %s holds a user name or password: put credentials in a secret and name it with option %q", shown, optHeader)
	}
	c.url = u
	if n, ok := s.Size(optSize); ok {
		if n == 0 {
			return c, fmt.Errorf("option %q: must be more than 0", optSize)
		}
		c.size = n
	}
	if v, ok := s.Options[optHeader]; ok {
		if strings.TrimSpace(v) == "" {
			return c, fmt.Errorf("option %q: empty secret name", optHeader)
		}
		c.headerName = v
	}
	if v, ok := s.Options[optCA]; ok {
		if v == "" {
			return c, fmt.Errorf("option %q: empty path", optCA)
		}
		if u.Scheme != "https" {
			return c, fmt.Errorf("option %q is for https URLs only", optCA)
		}
		c.ca = v
	}
	c.timeout, _ = s.Duration(optTimeout)
	if c.timeout <= 0 {
		return c, fmt.Errorf("option %q: must be more than 0", optTimeout)
	}
	n, _ := s.Int(optConnections)
	if n < 1 || n > 1024 {
		return c, fmt.Errorf("option %q: %d is not in 1..1024", optConnections, n)
	}
	c.connections = int(n)
	n, _ = s.Int(optRetries)
	if n < 0 || n > 100 {
		return c, fmt.Errorf("option %q: %d is not in 0..100", optRetries, n)
	}
	c.retries = int(n)
	c.http2, _ = s.Bool(optHTTP2)
	return c, nil
}

// Redact returns raw without its user info, query and fragment (a
// presigned URL's query is a credential), for errors and logs.
func Redact(raw string) string {
	s, hadQuery := raw, false
	if i := strings.IndexAny(s, "?#"); i >= 0 {
		hadQuery = s[i] == '?'
		s = s[:i]
	}
	if i := strings.Index(s, "://"); i >= 0 {
		rest := s[i+3:]
		end := strings.IndexByte(rest, '/')
		if end < 0 {
			end = len(rest)
		}
		if at := strings.LastIndexByte(rest[:end], '@'); at >= 0 {
			s = s[:i+3] + rest[at+1:]
		}
	}
	if hadQuery {
		s += "?…"
	}
	return s
}

func open(ctx context.Context, s backends.Spec, env backends.Env) (backends.Device, error) {
	c, err := parseConfig(s)
	if err != nil {
		return nil, err
	}
	var headers [][2]string
	if c.headerName != "" {
		v, ok := env.Secret(c.headerName)
		if !ok {
			return nil, fmt.Errorf("option %q: no secret %q (serve: a file of that name in --secrets-dir)", optHeader, c.headerName)
		}
		if headers, err = parseHeaderSecret(c.headerName, v); err != nil {
			return nil, fmt.Errorf("option %q: %w", optHeader, err)
		}
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.ca != "" {
		pool, err := backends.SystemCertPoolWith(c.ca)
		if err != nil {
			return nil, fmt.Errorf("option %q: %w", optCA, err)
		}
		tlsCfg.RootCAs = pool
	}
	dialer := &net.Dialer{Timeout: c.timeout, KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           dialer.DialContext,
		TLSClientConfig:       tlsCfg,
		TLSHandshakeTimeout:   c.timeout,
		ForceAttemptHTTP2:     c.http2,
		MaxIdleConns:          c.connections,
		MaxIdleConnsPerHost:   c.connections,
		MaxConnsPerHost:       c.connections,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: c.timeout,
		// Go would otherwise ask for gzip, and a compressed body's
		// ranges are not the object's.
		DisableCompression: true,
	}
	d := &Device{
		client: &http.Client{
			Transport: tr,
			// Redirects are followed by open alone, which pins the
			// result; a read that is redirected is an error.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		origin:    c.url,
		originRaw: s.URL,
		timeout:   c.timeout,
		retries:   c.retries,
		sem:       make(chan struct{}, c.connections),
		headers:   headers,
	}
	if err := d.probe(ctx, c.size); err != nil {
		tr.CloseIdleConnections()
		return nil, err
	}
	return d, nil
}
