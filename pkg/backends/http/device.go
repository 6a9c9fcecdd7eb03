package httpdev

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

const (
	// chunkSize splits large reads into range GETs fetched in parallel:
	// one slow stream then holds up less, and a retry re-fetches less.
	chunkSize = 2 << 20
	// maxRedirects bounds the redirects open follows.
	maxRedirects = 10
	// maxBackoff caps the wait between retries (and a Retry-After).
	maxBackoff = 5 * time.Second
)

// errChanged is matched by the errors of reads that found the origin's
// object changed (or gone) since open; they are permanent.
var errChanged = errors.New("origin object changed since the volume was opened")

// Device reads one pinned object. It is safe for concurrent use.
type Device struct {
	client    *http.Client
	origin    *url.URL // the spec's URL, parsed
	originRaw string   // and as written
	timeout   time.Duration
	retries   int
	sem       chan struct{} // bounds requests in flight
	headers   [][2]string   // from header-secret

	// Set by probe, constant afterwards.
	url         string // the pinned (final) URL
	shown       string // url redacted, for errors and logs
	sendHeaders bool   // url is on the spec URL's host, so credentials go there
	size        uint64
	sizeKnown   bool   // the origin reported size; responses must agree
	etag        string // pinned strong ETag (If-Match), or ""
	weakETag    string // a weak ETag only compared, or ""
	lastMod     string // pinned Last-Modified (If-Unmodified-Since without a strong ETag), or ""

	failed atomic.Pointer[error] // sticky errChanged: never serve a mix
}

var _ backends.Device = (*Device)(nil)

// probe follows redirects from the spec URL, pins the final URL and the
// object's validators, checks the origin serves ranges, and learns the
// size. A ranged GET answers all of that at once (and works for presigned
// URLs signed for GET only); HEAD is asked only when the range reply
// leaves the size unknown ("bytes 0-0/*").
func (d *Device) probe(ctx context.Context, sizeOpt uint64) error {
	cur, raw := d.origin, d.originRaw // the first request goes to the spec's URL verbatim
	var resp *http.Response
	for hops := 0; ; hops++ {
		d.url, d.shown = raw, Redact(raw)
		d.sendHeaders = cur.Host == d.origin.Host && (cur.Scheme == d.origin.Scheme || cur.Scheme == "https")
		var err error
		if resp, err = d.probeGet(ctx); err != nil {
			return fmt.Errorf("GET %s: %w", d.shown, err)
		}
		if !isRedirect(resp.StatusCode) {
			break
		}
		discard(resp)
		loc := resp.Header.Get("Location")
		if loc == "" {
			return fmt.Errorf("GET %s: %s without a Location", d.shown, resp.Status)
		}
		if hops == maxRedirects {
			return fmt.Errorf("GET %s: more than %d redirects", Redact(d.origin.String()), maxRedirects)
		}
		next, err := cur.Parse(loc)
		if err != nil {
			return fmt.Errorf("GET %s: %s to an invalid Location", d.shown, resp.Status)
		}
		if next.Scheme != "http" && next.Scheme != "https" {
			return fmt.Errorf("GET %s: redirected to a %q URL", d.shown, next.Scheme)
		}
		if cur.Scheme == "https" && next.Scheme == "http" {
			return fmt.Errorf("GET %s: refusing a redirect from https to http (%s)", d.shown, Redact(next.String()))
		}
		klog.V(2).InfoS("Origin redirects", "from", d.shown, "to", Redact(next.String()), "status", resp.StatusCode)
		cur, raw = next, next.String()
	}
	defer discard(resp)

	var originSize int64 = -1
	switch resp.StatusCode {
	case http.StatusPartialContent:
		if ce := resp.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
			return fmt.Errorf("GET %s: origin sent a %q-encoded range, not the object's bytes", d.shown, ce)
		}
		cr, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return fmt.Errorf("GET %s: %w", d.shown, err)
		}
		if cr.first != 0 || cr.last != 0 {
			return fmt.Errorf("GET %s: asked for bytes 0-0, got Content-Range %q", d.shown, resp.Header.Get("Content-Range"))
		}
		originSize = cr.total
	case http.StatusRequestedRangeNotSatisfiable:
		// The one object byte 0 is outside of: an empty one.
		cr, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || cr.total != 0 {
			return fmt.Errorf("GET %s: %s to \"Range: bytes=0-0\"", d.shown, resp.Status)
		}
		originSize = 0
	case http.StatusOK:
		if resp.ContentLength == 0 {
			// An empty object: nginx, for one, skips ranges for it, and
			// an empty volume has nothing to ask a range of anyway.
			originSize = 0
			break
		}
		hint := ""
		if strings.EqualFold(resp.Header.Get("Accept-Ranges"), "none") {
			hint = ", and says Accept-Ranges: none"
		}
		return fmt.Errorf("origin %s does not serve range requests (it answered 200 with the whole object to \"Range: bytes=0-0\"%s); an http volume needs them", d.shown, hint)
	case http.StatusUnauthorized, http.StatusForbidden:
		hint := ""
		if len(d.headers) == 0 {
			hint = fmt.Sprintf(" (credentials go in a secret named by option %q)", optHeader)
		} else if !d.sendHeaders {
			hint = " (credentials are not sent to a host the spec URL redirected to)"
		}
		return fmt.Errorf("GET %s: %s%s", d.shown, resp.Status, hint)
	default:
		return fmt.Errorf("GET %s: %s", d.shown, resp.Status)
	}
	d.pin(resp.Header)

	if originSize < 0 {
		h, err := d.do(ctx, http.MethodHead, "", true)
		if err != nil {
			return fmt.Errorf("HEAD %s: %w", d.shown, d.timedOut(ctx, err))
		}
		discard(h)
		if h.StatusCode == http.StatusOK && h.ContentLength >= 0 && h.Header.Get("Content-Length") != "" {
			originSize = h.ContentLength
		}
	}
	switch {
	case originSize >= 0 && sizeOpt != 0 && uint64(originSize) != sizeOpt:
		return fmt.Errorf("option %q is %s (%d bytes) but origin %s holds %d bytes", optSize,
			backends.FormatSize(sizeOpt), sizeOpt, d.shown, originSize)
	case originSize >= 0:
		d.size, d.sizeKnown = uint64(originSize), true
	case sizeOpt != 0:
		d.size = sizeOpt
	default:
		return fmt.Errorf("origin %s reports no size (Content-Range total \"*\", no Content-Length): give option %q", d.shown, optSize)
	}
	if d.etag == "" && d.lastMod == "" {
		klog.InfoS("Origin sends neither a strong ETag nor Last-Modified: a change that keeps the object's size cannot be detected",
			"url", d.shown)
	}
	klog.V(1).InfoS("Opened http origin", "url", d.shown, "size", d.size, "etag", d.etag, "lastModified", d.lastMod)
	return nil
}

// probeGet asks d.url for its first byte, retrying while the origin says
// it is busy (5xx, 408, 429). A refused connection or a timeout fails at
// once: an unreachable origin is reported within one timeout.
func (d *Device) probeGet(ctx context.Context) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		resp, err := d.do(ctx, http.MethodGet, "bytes=0-0", false)
		if err != nil {
			return nil, d.timedOut(ctx, err)
		}
		if !busy(resp.StatusCode) || attempt >= d.retries {
			return resp, nil
		}
		discard(resp)
		wait := max(retryAfter(resp.Header.Get("Retry-After")), backoff(attempt))
		klog.V(2).InfoS("Retrying origin probe", "url", d.shown, "status", resp.StatusCode, "attempt", attempt+1, "wait", wait)
		if !backends.Sleep(ctx, wait) {
			return nil, ctx.Err()
		}
	}
}

// busy reports statuses worth retrying: the origin is there but cannot
// answer now.
func busy(code int) bool {
	return code == http.StatusRequestTimeout || code == http.StatusTooManyRequests || code >= 500
}

// pin remembers the object's validators from a response to the probe.
func (d *Device) pin(h http.Header) {
	if et := h.Get("ETag"); et != "" {
		if strings.HasPrefix(et, "W/") {
			d.weakETag = et
		} else {
			d.etag = et
		}
	}
	d.lastMod = h.Get("Last-Modified")
}

// changed reports how h (a later response's headers) shows the object is
// no longer the pinned one, or "" — for origins that do not honour
// If-Match or If-Unmodified-Since.
func (d *Device) changed(h http.Header) string {
	if et := h.Get("ETag"); et != "" {
		if pinned := d.etag + d.weakETag; pinned != "" && et != pinned {
			return fmt.Sprintf("ETag is now %s, was %s", et, pinned)
		}
	}
	if lm := h.Get("Last-Modified"); lm != "" && d.lastMod != "" && lm != d.lastMod {
		return fmt.Sprintf("Last-Modified is now %q, was %q", lm, d.lastMod)
	}
	return ""
}

func isRedirect(code int) bool {
	switch code {
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther,
		http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		return true
	}
	return false
}

// do sends one request to d.url under the per-request timeout, which also
// covers reading the body: the caller must read or discard it before the
// returned response's Body is closed (closing cancels the timeout).
func (d *Device) do(ctx context.Context, method, rng string, conditional bool) (*http.Response, error) {
	rctx, cancel := context.WithTimeout(ctx, d.timeout)
	req, err := http.NewRequestWithContext(rctx, method, d.url, nil)
	if err != nil {
		cancel()
		return nil, errors.New("cannot build request") // url came from url.Parse; unreachable
	}
	req.Header.Set("User-Agent", "csi-nbd")
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	if conditional {
		if d.etag != "" {
			req.Header.Set("If-Match", d.etag)
		} else if d.lastMod != "" {
			req.Header.Set("If-Unmodified-Since", d.lastMod)
		}
	}
	if d.sendHeaders {
		for _, h := range d.headers {
			req.Header.Add(h[0], h[1])
		}
	}
	resp, err := d.client.Do(req)
	if err != nil {
		cancel()
		return nil, scrub(err)
	}
	resp.Body = &cancelBody{resp.Body, cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// discard reads a little of an unwanted body so the connection can be
// reused, and closes it.
func discard(resp *http.Response) {
	io.CopyN(io.Discard, resp.Body, 64<<10)
	resp.Body.Close()
}

// scrub drops the URL (with its query) from net/http's errors: ours name
// the redacted URL themselves.
func scrub(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func (d *Device) Size() uint64 { return d.size }

func (d *Device) Caps() backends.Caps {
	return backends.Caps{ReadOnly: true, MultiConn: true}
}

// ReadAt fetches p with one range GET, or several in parallel for large
// reads. Every one is conditional on the pinned validator, so either all
// of p comes from the pinned object or the read fails.
func (d *Device) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if off > d.size || uint64(len(p)) > d.size-off {
		return fmt.Errorf("http: read %d+%d beyond size %d: %w", off, len(p), d.size, backends.ErrInvalid)
	}
	if len(p) == 0 {
		return nil
	}
	if len(p) <= chunkSize {
		return d.read(ctx, p, off)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	for i := 0; i < len(p); i += chunkSize {
		wg.Add(1)
		go func(q []byte, off uint64) {
			defer wg.Done()
			if err := d.read(ctx, q, off); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		}(p[i:min(i+chunkSize, len(p))], off+uint64(i))
	}
	wg.Wait()
	return first
}

// read fetches p with retries.
func (d *Device) read(ctx context.Context, p []byte, off uint64) error {
	fail := func(err error) error {
		if ctx.Err() != nil && !errors.Is(err, errChanged) {
			return fmt.Errorf("http: read %d bytes at %d from %s: %w", len(p), off, d.shown, context.Cause(ctx))
		}
		return fmt.Errorf("http: read %d bytes at %d from %s: %w (%w)", len(p), off, d.shown, err, syscall.EIO)
	}
	for attempt := 0; ; attempt++ {
		if e := d.failed.Load(); e != nil {
			return fail(*e)
		}
		wait, err := d.get(ctx, p, off)
		if err == nil {
			return nil
		}
		if wait < 0 || attempt >= d.retries || ctx.Err() != nil {
			return fail(err)
		}
		wait = max(wait, backoff(attempt))
		klog.V(2).InfoS("Retrying origin read", "url", d.shown, "offset", off, "length", len(p),
			"attempt", attempt+1, "wait", wait, "err", err)
		if !backends.Sleep(ctx, wait) {
			return fail(err)
		}
	}
}

// backoff is the wait before retry attempt+1: exponential from 100 ms,
// capped, with jitter so parallel readers do not retry in lockstep.
func backoff(attempt int) time.Duration {
	b := min(100*time.Millisecond<<min(attempt, 10), maxBackoff)
	return b/2 + rand.N(b/2+1)
}

// get makes one attempt at fetching p. On failure, wait says whether to
// retry: negative for never, else at least that long (a Retry-After).
func (d *Device) get(ctx context.Context, p []byte, off uint64) (wait time.Duration, err error) {
	select {
	case d.sem <- struct{}{}:
	case <-ctx.Done():
		return -1, ctx.Err()
	}
	defer func() { <-d.sem }()

	last := off + uint64(len(p)) - 1
	resp, err := d.do(ctx, http.MethodGet, fmt.Sprintf("bytes=%d-%d", off, last), true)
	if err != nil {
		return 0, d.timedOut(ctx, err) // connection refused or reset, timeout...: retry
	}
	defer resp.Body.Close()
	switch code := resp.StatusCode; {
	case code == http.StatusPartialContent:
		if why := d.changed(resp.Header); why != "" {
			return -1, d.fail(why)
		}
		if ce := resp.Header.Get("Content-Encoding"); ce != "" && !strings.EqualFold(ce, "identity") {
			return -1, fmt.Errorf("origin sent a %q-encoded range, not the object's bytes", ce)
		}
		cr, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil {
			return -1, err
		}
		if cr.first != int64(off) || cr.last != int64(last) {
			return -1, fmt.Errorf("asked for bytes %d-%d, got Content-Range %q", off, last, resp.Header.Get("Content-Range"))
		}
		if d.sizeKnown && cr.total >= 0 && uint64(cr.total) != d.size {
			return -1, d.fail(fmt.Sprintf("size is now %d, was %d", cr.total, d.size))
		}
		if resp.ContentLength >= 0 && resp.ContentLength != int64(len(p)) {
			return -1, fmt.Errorf("Content-Length %d for a %d-byte range", resp.ContentLength, len(p))
		}
		if _, err := io.ReadFull(resp.Body, p); err != nil {
			return 0, fmt.Errorf("reading body: %w", d.timedOut(ctx, err))
		}
		return 0, nil
	case code == http.StatusPreconditionFailed:
		return -1, d.fail(resp.Status + " to a request conditional on the pinned validator")
	case code == http.StatusRequestedRangeNotSatisfiable:
		return -1, d.fail(resp.Status + ": the object shrank")
	case code == http.StatusNotFound || code == http.StatusGone:
		return -1, d.fail(resp.Status + ": the object is gone")
	case code == http.StatusOK:
		if why := d.changed(resp.Header); why != "" {
			return -1, d.fail(why)
		}
		return -1, fmt.Errorf("origin ignored the Range header (200 OK)")
	case isRedirect(code):
		return -1, fmt.Errorf("%s: the pinned URL now redirects", resp.Status)
	case busy(code):
		discard(resp)
		return retryAfter(resp.Header.Get("Retry-After")), errors.New(resp.Status)
	default: // 401, 403 (an expired presigned URL)...
		return -1, errors.New(resp.Status)
	}
}

// timedOut words a timeout of one request (not the caller's) as such.
func (d *Device) timedOut(ctx context.Context, err error) error {
	var ne net.Error
	if ctx.Err() == nil && (errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()) {
		return fmt.Errorf("no answer within %v (option %q): %w", d.timeout, optTimeout, err)
	}
	return err
}

// fail records that the object changed; every later read fails too, so a
// volume never serves a mix of two versions.
func (d *Device) fail(why string) error {
	err := fmt.Errorf("%w: %s", errChanged, why)
	if d.failed.CompareAndSwap(nil, &err) {
		klog.ErrorS(err, "Origin changed under an open volume: every read now fails", "url", d.shown)
	}
	return *d.failed.Load()
}

// retryAfter parses a Retry-After of delay-seconds (capped); HTTP dates
// and garbage give 0, i.e. the usual backoff.
func retryAfter(v string) time.Duration {
	n, err := strconv.Atoi(strings.TrimSpace(v))
	if err != nil || n < 0 {
		return 0
	}
	return min(time.Duration(n)*time.Second, maxBackoff)
}

func (d *Device) WriteAt(context.Context, []byte, uint64, bool) error { return backends.ErrReadOnly }

func (d *Device) Flush(context.Context) error { return nil }

func (d *Device) Trim(context.Context, uint64, uint64, bool) error { return backends.ErrReadOnly }

func (d *Device) Zero(context.Context, uint64, uint64, backends.ZeroFlags) error {
	return backends.ErrReadOnly
}

// Extents reports everything as data: an origin has no holes to tell of.
func (d *Device) Extents(_ context.Context, off, length uint64, add func(backends.Extent)) error {
	add(backends.Extent{Length: length})
	return nil
}

// Cache is a no-op: there is no local copy to warm (the cache filter
// provides one).
func (d *Device) Cache(context.Context, uint64, uint64) error { return nil }

func (d *Device) Close() error {
	d.client.CloseIdleConnections()
	return nil
}
