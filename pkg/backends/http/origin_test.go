package httpdev_test

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// serveObject answers like a good origin: ranges, ETag, If-Match.
func serveObject(w http.ResponseWriter, r *http.Request, data []byte, etag string) {
	w.Header().Set("ETag", etag)
	http.ServeContent(w, r, "", mtime, bytes.NewReader(data))
}

func startOrigin(t *testing.T, h http.HandlerFunc) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return s
}

func TestHeaderSecret(t *testing.T) {
	data := devtest.RandBytes(1 << 20)
	var mu sync.Mutex
	var seen []http.Header
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Clone())
		mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer s3cr3t-token" && r.Header.Get("X-Api-Key") != "k3y-value" {
			http.Error(w, "who are you", http.StatusUnauthorized)
			return
		}
		serveObject(w, r, data, `"v1"`)
	})
	spec := "header-secret=origin-token;" + s.URL + "/disk.img"

	// No such secret: the error names the option and the secret.
	_, err := devtest.TryOpen(spec, backends.Env{})
	if err == nil || !strings.Contains(err.Error(), `"header-secret"`) || !strings.Contains(err.Error(), "origin-token") {
		t.Fatalf("open without the secret: %v", err)
	}
	// A wrong one: 401, and the error does not show it.
	_, err = devtest.TryOpen(spec, backends.Env{Secrets: map[string]string{"origin-token": "Bearer wrong-token"}})
	if err == nil || !strings.Contains(err.Error(), "401") || strings.Contains(err.Error(), "wrong-token") {
		t.Fatalf("open with a wrong secret: %v", err)
	}

	for _, secret := range []string{"Bearer s3cr3t-token\n", "X-Api-Key: k3y-value\nX-Other: 1\n"} {
		mu.Lock()
		seen = nil
		mu.Unlock()
		dev := devtest.Open(t, spec, backends.Env{Secrets: map[string]string{"origin-token": secret}})
		devtest.CheckRead(t, "read", dev, 0, data)
		mu.Lock()
		if len(seen) < 2 {
			t.Fatalf("%d requests, want the probe and a read", len(seen))
		}
		for _, h := range seen {
			if strings.HasPrefix(secret, "Bearer") && h.Get("Authorization") != "Bearer s3cr3t-token" ||
				strings.HasPrefix(secret, "X-") && (h.Get("X-Api-Key") != "k3y-value" || h.Get("X-Other") != "1") {
				t.Errorf("request without the secret's headers: %v", h)
			}
		}
		mu.Unlock()
	}
	_, err = devtest.TryOpen(spec, backends.Env{Secrets: map[string]string{"origin-token": "X-Api-Key: k3y-value\nnot a header line"}})
	if err == nil || !strings.Contains(err.Error(), "line 2") || strings.Contains(err.Error(), "k3y") {
		t.Fatalf("open with a malformed secret: %v", err)
	}
}

// A presigned URL's query string is a credential: errors leave it out.
func TestQueryRedactedInErrors(t *testing.T) {
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "expired", http.StatusForbidden)
	})
	_, err := devtest.TryOpen(s.URL+"/obj?X-Amz-Signature=SIGSIGSIG", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "403") || !strings.Contains(err.Error(), s.URL+"/obj?…") {
		t.Fatalf("open of a forbidden object: %v", err)
	}
	// backends.Open names the spec itself; the backend's own part of the
	// message must not repeat the query.
	if strings.Count(err.Error(), "SIGSIGSIG") > 1 {
		t.Fatalf("query repeated by the backend: %v", err)
	}
	unreachable := fmt.Sprintf("http://127.0.0.1:%d/obj?X-Amz-Signature=SIGSIGSIG", testserver.FreePort(t))
	_, err = devtest.TryOpen("timeout=5s;"+unreachable, backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "refused") || strings.Count(err.Error(), "SIGSIGSIG") > 1 {
		t.Fatalf("open of an unreachable origin: %v", err)
	}
}

func TestRetriesOn5xx(t *testing.T) {
	data := devtest.RandBytes(256 << 10)
	var ranged, failFirst atomic.Int32
	failFirst.Store(2)
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "bytes=0-0" {
			ranged.Add(1)
			if failFirst.Add(-1) >= 0 {
				w.Header().Set("Retry-After", "0")
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return
			}
		}
		serveObject(w, r, data, `"v1"`)
	})
	dev := devtest.Open(t, "retries=3;"+s.URL+"/disk.img", backends.Env{})

	// Opening retries a busy origin too.
	var probes atomic.Int32
	busy := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if probes.Add(1) <= 2 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		serveObject(w, r, data, `"v1"`)
	})
	if d := devtest.Open(t, "retries=3;"+busy.URL+"/disk.img", backends.Env{}); d.Size() != uint64(len(data)) || probes.Load() != 3 {
		t.Fatalf("open through two 503s: size %d after %d requests", d.Size(), probes.Load())
	}
	devtest.CheckRead(t, "read through two 503s", dev, 8192, data[8192:8192+4096])
	if n := ranged.Load(); n != 3 {
		t.Fatalf("%d requests, want 3 (two 503s, one success)", n)
	}
	// A lasting failure gives up after the retries, with EIO.
	got := make([]byte, 4096)
	ranged.Store(0)
	failFirst.Store(100)
	if err := dev.ReadAt(context.Background(), got, 0); !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "503") {
		t.Fatalf("read through lasting 503s: %v; want EIO naming the status", err)
	}
	if n := ranged.Load(); n != 4 {
		t.Fatalf("%d requests, want 4 (one and three retries)", n)
	}
	// A 403 (say, an expired presigned URL) is not retried.
	ranged.Store(0)
	failFirst.Store(0)
	s.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ranged.Add(1)
		http.Error(w, "expired", http.StatusForbidden)
	})
	if err := dev.ReadAt(context.Background(), got, 0); !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "403") {
		t.Fatalf("read answered 403: %v", err)
	}
	if n := ranged.Load(); n != 1 {
		t.Fatalf("%d requests for a 403, want 1", n)
	}
}

// A stalled origin: each attempt ends at the timeout, the read fails with
// EIO after the retries, and a caller's cancellation ends it at once.
func TestTimeouts(t *testing.T) {
	data := devtest.RandBytes(64 << 10)
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	var stall atomic.Bool
	var stalled atomic.Int32
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if stall.Load() {
			stalled.Add(1)
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return
		}
		serveObject(w, r, data, `"v1"`)
	})
	dev := devtest.Open(t, "timeout=100ms,retries=2;"+s.URL+"/disk.img", backends.Env{})
	stall.Store(true)
	p := make([]byte, 4096)
	err := dev.ReadAt(context.Background(), p, 0)
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "within 100ms") {
		t.Fatalf("read from a stalled origin: %v; want EIO after timeouts", err)
	}
	if n := stalled.Load(); n != 3 {
		t.Fatalf("%d attempts, want 3", n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := dev.ReadAt(ctx, p, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled read: %v", err)
	}
	// Opening a stalled origin fails too, naming it.
	_, err = devtest.TryOpen("timeout=100ms;"+s.URL+"/other.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), s.URL+"/other.img") {
		t.Fatalf("open of a stalled origin: %v", err)
	}
}

// Redirects are followed once, at open; reads go to the final URL, and
// credentials are not sent to another host.
func TestRedirectFollowedOnceAndPinned(t *testing.T) {
	data := devtest.RandBytes(1 << 20)
	var finalAuth atomic.Value
	final := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		finalAuth.Store(r.Header.Get("Authorization"))
		serveObject(w, r, data, `"v1"`)
	})
	var redirects atomic.Int32
	front := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/latest.img":
			redirects.Add(1)
			http.Redirect(w, r, "/v1.img", http.StatusFound)
		case "/elsewhere.img":
			redirects.Add(1)
			http.Redirect(w, r, final.URL+"/v1.img?sig=abc", http.StatusTemporaryRedirect)
		case "/loop.img":
			http.Redirect(w, r, "/loop.img", http.StatusFound)
		case "/v1.img":
			if r.Header.Get("Authorization") != "Bearer t" {
				http.Error(w, "no", http.StatusUnauthorized)
				return
			}
			serveObject(w, r, data, `"v1"`)
		}
	})
	env := backends.Env{Secrets: map[string]string{"tok": "Bearer t"}}
	for _, path := range []string{"/latest.img", "/elsewhere.img"} {
		redirects.Store(0)
		finalAuth.Store("")
		dev := devtest.Open(t, "header-secret=tok;"+front.URL+path, env)
		for off := 0; off < len(data); off += 128 << 10 {
			p := make([]byte, 128<<10)
			if err := dev.ReadAt(context.Background(), p, uint64(off)); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, data[off:off+len(p)]) {
				t.Fatalf("%s: read at %d differs", path, off)
			}
		}
		if n := redirects.Load(); n != 1 {
			t.Fatalf("%s: redirected %d times, want once", path, n)
		}
		if a := finalAuth.Load().(string); a != "" {
			t.Fatalf("%s: credentials sent to another host: %q", path, a)
		}
	}
	_, err := devtest.TryOpen(front.URL+"/loop.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "redirects") {
		t.Fatalf("open of a redirect loop: %v", err)
	}
}

// An origin that ignores If-Match still cannot slip a new version in: the
// ETag of its answer gives it away.
func TestOriginIgnoringIfMatch(t *testing.T) {
	data := devtest.RandBytes(64 << 10)
	var etag atomic.Value
	etag.Store(`"v1"`)
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		r.Header.Del("If-Match")
		serveObject(w, r, data, etag.Load().(string))
	})
	dev := devtest.Open(t, s.URL+"/disk.img", backends.Env{})
	p := make([]byte, 4096)
	if err := dev.ReadAt(context.Background(), p, 0); err != nil {
		t.Fatal(err)
	}
	etag.Store(`"v2"`)
	if err := dev.ReadAt(context.Background(), p, 0); !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), `"v2"`) {
		t.Fatalf("read of a new version: %v; want EIO naming the new ETag", err)
	}
}

// An origin that reports no size needs option size; one that does must
// agree with it.
func TestSizeOption(t *testing.T) {
	data := devtest.RandBytes(10000)
	var headLength atomic.Bool
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		var first, last int
		if r.Method != http.MethodGet {
			if headLength.Load() {
				w.Header().Set("Content-Length", fmt.Sprint(len(data)))
			}
			w.WriteHeader(http.StatusOK)
			return
		}
		if _, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &first, &last); err != nil {
			http.Error(w, "ranges only", http.StatusBadRequest)
			return
		}
		w.Header().Set("ETag", `"x"`)
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/*", first, last))
		w.WriteHeader(http.StatusPartialContent)
		w.Write(data[first : last+1])
	})
	_, err := devtest.TryOpen(s.URL+"/stream", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), `"size"`) {
		t.Fatalf("open of a sizeless origin: %v; want a request for option size", err)
	}
	dev := devtest.Open(t, "size=10000;"+s.URL+"/stream", backends.Env{})
	devtest.CheckRead(t, "read of a sizeless origin", dev, 0, data)

	// HEAD fills in what the range reply left out.
	headLength.Store(true)
	if dev := devtest.Open(t, s.URL+"/stream2", backends.Env{}); dev.Size() != 10000 {
		t.Fatalf("size from HEAD: %d, want 10000", dev.Size())
	}

	good := startOrigin(t, func(w http.ResponseWriter, r *http.Request) { serveObject(w, r, data, `"x"`) })
	_, err = devtest.TryOpen("size=8Ki;"+good.URL+"/disk.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), `"size"`) || !strings.Contains(err.Error(), "10000") {
		t.Fatalf("open with a size the origin contradicts: %v", err)
	}
	if dev := devtest.Open(t, "size=10000;"+good.URL+"/disk.img", backends.Env{}); dev.Size() != 10000 {
		t.Fatalf("size %d", dev.Size())
	}
}

func TestBadSpecs(t *testing.T) {
	for spec, want := range map[string]string{
		"timeout=0s;http://127.0.0.1/x":        `"timeout"`,
		"timeout=soon;http://127.0.0.1/x":      `"timeout"`,
		"connections=0;http://127.0.0.1/x":     `"connections"`,
		"connections=many;http://127.0.0.1/x":  `"connections"`,
		"retries=-1;http://127.0.0.1/x":        `"retries"`,
		"size=0;http://127.0.0.1/x":            `"size"`,
		"size=lots;http://127.0.0.1/x":         `"size"`,
		"ca=/etc/ssl/x.pem;http://127.0.0.1/x": `"ca"`,
		"header-secret=;http://127.0.0.1/x":    `"header-secret"`,
		"bogus=1;http://127.0.0.1/x":           `"bogus"`,
		"http:///x":                            "no host",
		"https://user:hunter2@127.0.0.1/x":     `"header-secret"`,
		"http://127.0.0.1/x%zz?sig=abc":        "invalid URL",
	} {
		_, err := backends.Parse(spec)
		if err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, backends.ErrInvalidSpec) {
			t.Errorf("Parse(%q) = %v; want an invalid spec naming %s", spec, err, want)
		}
		if err != nil && (strings.Contains(err.Error(), "hunter2") || strings.Contains(err.Error(), "sig=abc")) {
			t.Errorf("Parse(%q): error shows a credential: %v", spec, err)
		}
	}
	// The URL is kept verbatim, query and all; defaults drop out.
	const u = "https://h.example/a%20b/f.iso?X-Sig=a,b;c&y=1"
	s, err := backends.Parse("timeout=30s,connections=8;" + u)
	if err != nil {
		t.Fatal(err)
	}
	if s.URL != u || s.String() != "connections=8;"+u {
		t.Fatalf("parsed %q as %q", u, s.String())
	}
}

// Every read is conditional on the validator pinned at open: a strong ETag
// (If-Match), else Last-Modified (If-Unmodified-Since).
func TestConditionalReads(t *testing.T) {
	data := devtest.RandBytes(64 << 10)
	lastMod := mtime.Format(http.TimeFormat)
	for _, tc := range []struct{ etag, header, want string }{
		{`"strong"`, "If-Match", `"strong"`},
		{`W/"weak"`, "If-Unmodified-Since", lastMod},
		{"", "If-Unmodified-Since", lastMod},
	} {
		var mu sync.Mutex
		var reads []http.Header
		s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") != "bytes=0-0" {
				mu.Lock()
				reads = append(reads, r.Header.Clone())
				mu.Unlock()
			}
			if tc.etag != "" {
				w.Header().Set("ETag", tc.etag)
			}
			http.ServeContent(w, r, "", mtime, bytes.NewReader(data))
		})
		dev := devtest.Open(t, s.URL+"/disk.img", backends.Env{})
		for off := 0; off < len(data); off += 16 << 10 {
			if err := dev.ReadAt(context.Background(), make([]byte, 16<<10), uint64(off)); err != nil {
				t.Fatal(err)
			}
		}
		mu.Lock()
		if len(reads) != 4 {
			t.Fatalf("etag %s: %d reads, want 4", tc.etag, len(reads))
		}
		for _, h := range reads {
			if got := h.Get(tc.header); got != tc.want || len(h.Values("If-Match"))+len(h.Values("If-Unmodified-Since")) != 1 {
				t.Errorf("etag %s: read with %s %q (headers %v), want %q", tc.etag, tc.header, got, h, tc.want)
			}
		}
		mu.Unlock()
	}
}

// A large read is fetched as parallel range requests, never more at once
// than option connections allows.
func TestParallelChunksCapped(t *testing.T) {
	data := devtest.RandBytes(16 << 20)
	for _, conns := range []int{2, 8} {
		var mu sync.Mutex
		inFlight, most, seen := 0, 0, 0
		const chunks = 8 // 16 MiB in 2 MiB range requests
		s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Range") != "bytes=0-0" {
				mu.Lock()
				inFlight++
				seen++
				most = max(most, inFlight)
				n, all := inFlight, seen == chunks
				mu.Unlock()
				// Hold each request until as many as allowed are in
				// flight or no more will come (or a while has passed,
				// so a broken cap fails the test instead of hanging it).
				for deadline := time.Now().Add(2 * time.Second); n < conns && !all && time.Now().Before(deadline); {
					time.Sleep(time.Millisecond)
					mu.Lock()
					n, all = inFlight, seen == chunks
					mu.Unlock()
				}
				defer func() { mu.Lock(); inFlight--; mu.Unlock() }()
			}
			serveObject(w, r, data, `"v1"`)
		})
		dev := devtest.Open(t, fmt.Sprintf("connections=%d;%s/disk.img", conns, s.URL), backends.Env{})
		devtest.CheckRead(t, "read", dev, 0, data)
		mu.Lock()
		if most != conns {
			t.Errorf("connections=%d: at most %d requests were in flight, want exactly %d", conns, most, conns)
		}
		mu.Unlock()
	}
}

// A redirect from https to http would send the rest in clear: refused.
func TestRedirectDowngradeRefused(t *testing.T) {
	plain := startOrigin(t, func(w http.ResponseWriter, r *http.Request) { serveObject(w, r, []byte("x"), `"x"`) })
	s := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, plain.URL+"/disk.img", http.StatusFound)
	}))
	t.Cleanup(s.Close)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: s.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := devtest.TryOpen("ca="+caFile+";"+s.URL+"/disk.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "https to http") {
		t.Fatalf("open through a downgrading redirect: %v", err)
	}
}

// A connection that breaks in the middle of a body is retried.
func TestRetryBrokenBody(t *testing.T) {
	data := devtest.RandBytes(1 << 20)
	var broken atomic.Int32
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "bytes=0-0" && broken.Add(1) == 1 {
			w.Header().Set("ETag", `"v1"`)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", len(data)-1, len(data)))
			w.Header().Set("Content-Length", fmt.Sprint(len(data)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(data[:1000])
			panic(http.ErrAbortHandler) // drops the connection
		}
		serveObject(w, r, data, `"v1"`)
	})
	dev := devtest.Open(t, s.URL+"/disk.img", backends.Env{})
	devtest.CheckRead(t, "read through a broken connection", dev, 0, data)
	if n := broken.Load(); n != 2 {
		t.Fatalf("%d range requests, want 2", n)
	}
}

// Nothing the backend logs, even at -v=2, shows a presigned URL's query or
// a secret's value.
func TestLogsKeepCredentialsOut(t *testing.T) {
	var logs bytes.Buffer
	fs := flag.NewFlagSet("klog", flag.ContinueOnError)
	klog.InitFlags(fs)
	fs.Set("logtostderr", "false")
	fs.Set("alsologtostderr", "false")
	fs.Set("v", "2")
	klog.SetOutput(&logs)
	t.Cleanup(func() {
		fs.Set("v", "0")
		fs.Set("logtostderr", "true")
		klog.SetOutput(os.Stderr)
	})

	data := devtest.RandBytes(64 << 10)
	var etag atomic.Value
	etag.Store(`"v1"`)
	var fails atomic.Int32
	final := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "bytes=0-0" && fails.Add(1) <= 1 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		r.Header.Del("If-Match")
		serveObject(w, r, data, etag.Load().(string))
	})
	front := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, final.URL+"/obj?X-Amz-Signature=SIGNATURE2", http.StatusFound)
	})
	env := backends.Env{Secrets: map[string]string{"tok": "Bearer TOKENVALUE"}}
	dev := devtest.Open(t, "header-secret=tok;"+front.URL+"/obj?X-Amz-Signature=SIGNATURE1", env)
	p := make([]byte, 4096)
	if err := dev.ReadAt(context.Background(), p, 0); err != nil { // one 503, one retry
		t.Fatal(err)
	}
	etag.Store(`"v2"`)
	if err := dev.ReadAt(context.Background(), p, 0); err == nil {
		t.Fatal("read of a changed object succeeded")
	} else if strings.Contains(err.Error(), "SIGNATURE") || strings.Contains(err.Error(), "TOKENVALUE") {
		t.Fatalf("error shows a credential: %v", err)
	}
	klog.Flush()
	out := logs.String()
	for _, want := range []string{"Origin redirects", "Retrying origin read", "Origin changed"} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in the logs:\n%s", want, out)
		}
	}
	for _, secret := range []string{"SIGNATURE", "TOKENVALUE"} {
		if strings.Contains(out, secret) {
			t.Errorf("logs show %s:\n%s", secret, out)
		}
	}
}

// A range of a compressed representation is not the object's bytes.
func TestEncodedRangeRefused(t *testing.T) {
	s := startOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Encoding", "gzip")
		serveObject(w, r, devtest.RandBytes(4096), `"v1"`)
	})
	_, err := devtest.TryOpen(s.URL+"/disk.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), `"gzip"-encoded`) {
		t.Fatalf("open of a gzip-encoding origin: %v", err)
	}
}
