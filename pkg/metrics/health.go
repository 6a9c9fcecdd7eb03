package metrics

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/klog/v2"
)

// Checker reports whether one part of the process works; it must honour
// ctx, but Handler does not rely on it: a checker still running at the
// timeout counts as failed.
type Checker func(ctx context.Context) error

// Check is a named Checker.
type Check struct {
	Name  string
	Check Checker
}

// HandlerOptions configure Handler.
type HandlerOptions struct {
	// Ready must all pass for /readyz to answer 200: the CSI socket
	// served, volumes re-served after a restart, every volume's link
	// alive, no volume stalled (Stalled).
	Ready []Check
	// Live must all pass for /healthz to answer 200. A failing liveness
	// probe restarts the container, so only put here what a restart
	// cures; an empty list means "the process answers HTTP".
	Live []Check
	// Timeout bounds each probe as a whole (default 5 s), so a checker
	// stuck on a hung backend fails the probe instead of hanging it.
	Timeout time.Duration
}

// Handler serves /metrics (m's registry), /healthz and /readyz.
func (m *Metrics) Handler(o HandlerOptions) http.Handler {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Second
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.InstrumentMetricHandler(m.reg,
		promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, ErrorHandling: promhttp.ContinueOnError})))
	mux.Handle("/healthz", probe("liveness", o.Live, o.Timeout))
	mux.Handle("/readyz", probe("readiness", o.Ready, o.Timeout))
	return mux
}

// Handler serves Default's metrics and the probes.
func Handler(o HandlerOptions) http.Handler { return Default.Handler(o) }

// probe runs every check at once and answers 200 "ok" if all pass in time,
// else 503 with one line per failure. ?verbose lists the passing ones too.
func probe(what string, checks []Check, timeout time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		errs := RunChecks(ctx, checks)
		names := make([]string, 0, len(checks))
		for _, c := range checks {
			names = append(names, c.Name)
		}
		sort.Strings(names)
		var b strings.Builder
		failed := 0
		for _, n := range names {
			if err := errs[n]; err != nil {
				failed++
				fmt.Fprintf(&b, "[-] %s: %v\n", n, err)
			} else if r.URL.Query().Has("verbose") {
				fmt.Fprintf(&b, "[+] %s ok\n", n)
			}
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		if failed > 0 {
			klog.V(2).InfoS("Probe failed", "probe", what, "failed", failed, "detail", b.String())
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(&b, "%s check failed\n", what)
			_, _ = w.Write([]byte(b.String()))
			return
		}
		b.WriteString("ok\n")
		_, _ = w.Write([]byte(b.String()))
	})
}

// errTimedOut is a check that had not returned when the probe's time ran
// out.
var errTimedOut = errors.New("no answer in time")

// RunChecks runs checks concurrently until ctx ends and returns the
// failures by name; a check still running when ctx ends fails with a
// timeout (its goroutine is left to finish on its own).
func RunChecks(ctx context.Context, checks []Check) map[string]error {
	var mu sync.Mutex
	results := map[string]error{}
	pending := make(map[string]bool, len(checks))
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range checks {
		pending[c.Name] = true
	}
	for _, c := range checks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := c.Check(ctx)
			mu.Lock()
			defer mu.Unlock()
			delete(pending, c.Name)
			if err != nil {
				results[c.Name] = err
			}
		}()
	}
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	mu.Lock()
	defer mu.Unlock()
	out := make(map[string]error, len(results)+len(pending))
	for n, err := range results {
		out[n] = err
	}
	for n := range pending {
		out[n] = fmt.Errorf("%w (%v)", errTimedOut, context.Cause(ctx))
	}
	return out
}

// Stalled is a readiness check failing while any volume measured by m has
// requests in flight but has finished none for longer than maxAge: a hung
// backend, a lost connection. A volume that is merely slow (rate-limited,
// a busy remote) keeps finishing requests and passes.
func (m *Metrics) Stalled(maxAge time.Duration) Checker {
	return func(context.Context) error {
		now := time.Now().UnixNano()
		m.mu.Lock()
		defer m.mu.Unlock()
		var stuck []string
		for d := range m.devices {
			if d.pending.Load() > 0 {
				if idle := time.Duration(now - d.progress.Load()); idle > maxAge {
					stuck = append(stuck, fmt.Sprintf("%s (%d requests in flight, none finished for %v)",
						d.labels.Volume, d.pending.Load(), idle.Round(time.Millisecond)))
				}
			}
		}
		if len(stuck) > 0 {
			sort.Strings(stuck)
			return fmt.Errorf("volumes stalled: %s", strings.Join(stuck, "; "))
		}
		return nil
	}
}
