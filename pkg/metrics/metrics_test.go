package metrics

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/cache"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
	"github.com/csi-nbd/csi-nbd/pkg/backends/rate"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
)

var vol = VolumeLabels{Volume: "size=1Mi;memory:pvc-1", PV: "pvc-1", PVCNamespace: "apps", PVC: "data"}

// scrape GETs /metrics from h and parses it.
func scrape(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// find returns the metric of family name whose labels include want, or nil.
func find(fams map[string]*dto.MetricFamily, name string, want map[string]string) *dto.Metric {
	f := fams[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		return m
	}
	return nil
}

func volLabels(extra ...string) map[string]string {
	m := map[string]string{"volume": vol.Volume, "pv": vol.PV, "pvc_namespace": vol.PVCNamespace, "pvc": vol.PVC}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i]] = extra[i+1]
	}
	return m
}

func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	t.Helper()
	m := find(fams, name, labels)
	if m == nil {
		t.Fatalf("no %s%v in the scrape", name, labels)
	}
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	t.Fatalf("%s: unexpected type", name)
	return 0
}

type fakeThrottle struct{ r, w time.Duration }

func (f fakeThrottle) Throttled() (time.Duration, time.Duration) { return f.r, f.w }

func TestScrapeAfterKnownIO(t *testing.T) {
	ctx := context.Background()
	m := New()
	inner := memory.New(1 << 20)
	dev := m.Wrap(inner, vol)

	buf := make([]byte, 8192)
	for i := range 3 {
		if err := dev.WriteAt(ctx, buf[:4096], uint64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 {
		if err := dev.ReadAt(ctx, buf, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.ReadAt(ctx, buf, 1<<20); err == nil { // past the end
		t.Fatal("read past the end succeeded")
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(dev.Trim(ctx, 65536, 65536, false))
	must(dev.Zero(ctx, 0, 8192, 0))
	must(dev.Zero(ctx, 8192, 8192, backends.ZeroNoHole))
	must(dev.Flush(ctx))
	must(dev.Cache(ctx, 0, 4096))
	must(dev.Extents(ctx, 0, 1<<20, func(backends.Extent) {}))

	m.SetLimits(vol, limits.Limits{ReadBytesPerSec: 10 << 20, WriteIOPS: 100, Burst: 250 * time.Millisecond})
	m.SetThrottleStats(vol, fakeThrottle{1500 * time.Millisecond, 250 * time.Millisecond})
	m.SetAttachState(vol, "attached")
	m.SetAttachState(vol, "dead")
	m.IncReconnects(vol)
	m.IncReconnects(vol)

	fams := scrape(t, m.Handler(HandlerOptions{}))
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"csi_nbd_volume_bytes_total", []string{"op", "write"}, 3 * 4096},
		{"csi_nbd_volume_bytes_total", []string{"op", "read"}, 2 * 8192},
		{"csi_nbd_volume_bytes_total", []string{"op", "trim"}, 65536},
		{"csi_nbd_volume_bytes_total", []string{"op", "zero"}, 16384},
		{"csi_nbd_volume_requests_total", []string{"op", "write"}, 3},
		{"csi_nbd_volume_requests_total", []string{"op", "read"}, 2},
		{"csi_nbd_volume_requests_total", []string{"op", "trim"}, 1},
		{"csi_nbd_volume_requests_total", []string{"op", "zero"}, 2},
		{"csi_nbd_volume_requests_total", []string{"op", "flush"}, 1},
		{"csi_nbd_volume_requests_total", []string{"op", "cache"}, 1},
		{"csi_nbd_volume_requests_total", []string{"op", "extents"}, 1},
		{"csi_nbd_volume_errors_total", []string{"op", "read"}, 1},
		{"csi_nbd_volume_errors_total", []string{"op", "write"}, 0},
		// Histograms count failed requests too.
		{"csi_nbd_volume_request_duration_seconds", []string{"op", "read"}, 3},
		{"csi_nbd_volume_request_duration_seconds", []string{"op", "write"}, 3},
		{"csi_nbd_volume_requests_in_flight", nil, 0},
		{"csi_nbd_volume_limit", []string{"limit", "read_bytes_per_second"}, 10 << 20},
		{"csi_nbd_volume_limit", []string{"limit", "write_bytes_per_second"}, 0},
		{"csi_nbd_volume_limit", []string{"limit", "read_iops"}, 0},
		{"csi_nbd_volume_limit", []string{"limit", "write_iops"}, 100},
		{"csi_nbd_volume_limit", []string{"limit", "burst_seconds"}, 0.25},
		{"csi_nbd_volume_throttled_seconds_total", []string{"direction", "read"}, 1.5},
		{"csi_nbd_volume_throttled_seconds_total", []string{"direction", "write"}, 0.25},
		{"csi_nbd_volume_attach_state", []string{"state", "dead"}, 1},
		{"csi_nbd_volume_reconnects_total", nil, 2},
	} {
		if got := value(t, fams, c.name, volLabels(c.labels...)); got != c.want {
			t.Errorf("%s%v = %v; want %v", c.name, c.labels, got, c.want)
		}
	}
	if find(fams, "csi_nbd_volume_attach_state", volLabels("state", "attached")) != nil {
		t.Error("the previous attach state is still exported")
	}
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if fams[name] == nil {
			t.Errorf("%s missing: the Go and process collectors are not registered", name)
		}
	}

	// Resize goes through; Unwrap finds the inner device.
	must(backends.Resize(ctx, dev, 2<<20))
	if dev.Size() != 2<<20 || inner.Size() != 2<<20 {
		t.Errorf("after Resize: wrapper %d, inner %d bytes; want %d", dev.Size(), inner.Size(), 2<<20)
	}
	if u, ok := dev.(interface{ Unwrap() backends.Device }); !ok || u.Unwrap() != inner {
		t.Error("Unwrap does not return the inner device")
	}
}

func TestSeriesGoneWithLastWrapper(t *testing.T) {
	m := New()
	a := m.Wrap(memory.New(4096), vol)
	b := m.Wrap(memory.New(4096), vol)
	other := VolumeLabels{Volume: "size=4Ki;memory:other"}
	c := m.Wrap(memory.New(4096), other)
	m.SetLimits(vol, limits.Limits{ReadIOPS: 5})
	m.SetThrottleStats(vol, fakeThrottle{})
	m.SetAttachState(vol, "attached")
	if err := a.ReadAt(context.Background(), make([]byte, 512), 0); err != nil {
		t.Fatal(err)
	}
	count := func(volume string) int {
		n := 0
		for _, f := range scrape(t, m.Handler(HandlerOptions{})) {
			for _, mt := range f.GetMetric() {
				for _, l := range mt.GetLabel() {
					if l.GetName() == "volume" && l.GetValue() == volume {
						n++
					}
				}
			}
		}
		return n
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil { // a second Close must not drop b's series
		t.Logf("second Close: %v", err)
	}
	if n := count(vol.Volume); n == 0 {
		t.Fatal("series gone while a wrapper of the volume is still open")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if n := count(vol.Volume); n != 0 {
		t.Errorf("%d series of a closed volume remain", n)
	}
	if n := count(other.Volume); n == 0 {
		t.Error("another volume's series went too")
	}
	_ = c.Close()
}

// blocking holds ReadAt until release is closed.
type blocking struct {
	backends.Device
	entered chan struct{}
	release chan struct{}
}

func (b *blocking) ReadAt(ctx context.Context, p []byte, off uint64) error {
	b.entered <- struct{}{}
	<-b.release
	return b.Device.ReadAt(ctx, p, off)
}

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	body, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(body)
}

func TestProbes(t *testing.T) {
	m := New()
	hang := make(chan struct{})
	defer close(hang)
	failing := errors.New("backend unreachable")
	var fail atomic.Bool // read by the check's goroutine
	h := m.Handler(HandlerOptions{
		Timeout: 100 * time.Millisecond,
		Ready: []Check{
			{"csi", func(context.Context) error { return nil }},
			{"s3", func(context.Context) error {
				if fail.Load() {
					return failing
				}
				return nil
			}},
		},
	})
	if code, body := get(t, h, "/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz: %d %q", code, body)
	}
	if code, body := get(t, h, "/readyz?verbose"); code != 200 || !strings.Contains(body, "[+] s3 ok") {
		t.Errorf("/readyz: %d %q", code, body)
	}
	fail.Store(true)
	if code, body := get(t, h, "/readyz"); code != 503 || !strings.Contains(body, "[-] s3: backend unreachable") || strings.Contains(body, "csi") {
		t.Errorf("/readyz with a failing check: %d %q", code, body)
	}

	// A check that ignores its context and never returns fails the
	// probe at the timeout instead of hanging it.
	h = m.Handler(HandlerOptions{Timeout: 50 * time.Millisecond, Live: []Check{
		{"stuck", func(context.Context) error { <-hang; return nil }},
	}})
	if code, body := get(t, h, "/healthz"); code != 503 || !strings.Contains(body, "stuck: no answer in time") {
		t.Errorf("/healthz with a hung check: %d %q", code, body)
	}
}

func TestStalled(t *testing.T) {
	ctx := context.Background()
	m := New()
	b := &blocking{Device: memory.New(4096), entered: make(chan struct{}), release: make(chan struct{})}
	dev := m.Wrap(b, vol)
	defer dev.Close()
	stalled, patient := m.Stalled(time.Millisecond), m.Stalled(time.Hour)
	if err := stalled(ctx); err != nil {
		t.Errorf("idle volume: %v", err)
	}
	done := make(chan error)
	go func() { done <- dev.ReadAt(ctx, make([]byte, 512), 0) }()
	<-b.entered
	// No answer for longer than maxAge: poll until the check sees it
	// (it must, within the test's timeout).
	for stalled(ctx) == nil {
		time.Sleep(time.Millisecond)
	}
	if err := stalled(ctx); !strings.Contains(err.Error(), vol.Volume) {
		t.Errorf("stalled check names no volume: %v", err)
	}
	if err := patient(ctx); err != nil {
		t.Errorf("check with a long max age: %v", err)
	}
	close(b.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := stalled(ctx); err != nil {
		t.Errorf("after the request finished: %v", err)
	}
}

// A stack with the rate filter exports its limits and throttled time
// without being told.
func TestRateFilterFound(t *testing.T) {
	ctx := context.Background()
	m := New()
	r, err := rate.New(memory.New(1<<20), rate.Limits{ReadBytesPerSec: 1 << 20, WriteIOPS: 3})
	if err != nil {
		t.Fatal(err)
	}
	dev := m.Wrap(r, vol)
	defer dev.Close()
	// 1.5 MiB of reads with a 1 MiB/s limit and a 100 ms bucket: the
	// reads wait for tokens, so the throttled time cannot stay zero.
	buf := make([]byte, 512<<10)
	for range 3 {
		if err := dev.ReadAt(ctx, buf, 0); err != nil {
			t.Fatal(err)
		}
	}
	fams := scrape(t, m.Handler(HandlerOptions{}))
	if got := value(t, fams, "csi_nbd_volume_limit", volLabels("limit", "read_bytes_per_second")); got != 1<<20 {
		t.Errorf("read limit %v; want %d", got, 1<<20)
	}
	if got := value(t, fams, "csi_nbd_volume_limit", volLabels("limit", "write_iops")); got != 3 {
		t.Errorf("write IOPS limit %v; want 3", got)
	}
	if got := value(t, fams, "csi_nbd_volume_limit", volLabels("limit", "burst_seconds")); got != rate.DefaultBurst.Seconds() {
		t.Errorf("burst %v; want the default %v", got, rate.DefaultBurst.Seconds())
	}
	if got := value(t, fams, "csi_nbd_volume_throttled_seconds_total", volLabels("direction", "read")); got <= 0 {
		t.Errorf("read throttled %v s; want > 0", got)
	}
}

// A stack with the cache filter exports its hits, misses, evictions and
// dirty bytes, read at scrape time.
func TestCacheFilterFound(t *testing.T) {
	ctx := context.Background()
	m := New()
	const block = 64 << 10
	c, err := cache.Open(ctx, memory.New(1<<20), cache.Config{Mode: "writeback", Size: 4 * block, Block: block, OnRead: true, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	dev := m.Wrap(c, vol)
	defer dev.Close()
	buf := make([]byte, block)
	for range 2 { // a miss, then a hit
		if err := dev.ReadAt(ctx, buf, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := dev.WriteAt(ctx, buf, block, false); err != nil {
		t.Fatal(err)
	}
	fams := scrape(t, m.Handler(HandlerOptions{}))
	for kind, want := range map[string]float64{"hit": block, "miss": block, "evicted": 0} {
		if got := value(t, fams, "csi_nbd_cache_bytes_total", volLabels("kind", kind)); got != want {
			t.Errorf("cache %s bytes %v; want %v", kind, got, want)
		}
	}
	if got := value(t, fams, "csi_nbd_cache_dirty_bytes", volLabels()); got != block {
		t.Errorf("dirty bytes %v; want %d", got, block)
	}
	// Reading past the cap reclaims clean blocks.
	for off := uint64(2 * block); off < 1<<20; off += block {
		if err := dev.ReadAt(ctx, buf, off); err != nil {
			t.Fatal(err)
		}
	}
	fams = scrape(t, m.Handler(HandlerOptions{}))
	if got := value(t, fams, "csi_nbd_cache_bytes_total", volLabels("kind", "evicted")); got <= 0 {
		t.Errorf("evicted bytes %v after reading 4× the cap", got)
	}
}
