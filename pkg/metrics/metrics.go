// Package metrics exports per-volume Prometheus metrics and the HTTP
// endpoints a pod's probes and a Prometheus scrape use (/metrics,
// /healthz, /readyz).
//
// A volume's I/O is measured by a Device wrapper (Wrap) put outermost on
// the volume's stack, so latencies include time spent waiting for the rate
// filter: what the client sees. Everything else is pushed in by the parts
// that know it (effective limits, attach state, reconnects) or pulled at
// scrape time from a volume's throttle statistics.
//
// Every per-volume series carries the labels volume (the volume ID), pv,
// pvc_namespace and pvc, and disappears when the volume's last wrapper is
// closed.
package metrics

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/csi-nbd/csi-nbd/pkg/limits"
)

// Namespace prefixes every metric name.
const Namespace = "csi_nbd"

// VolumeLabels name a volume in every series about it. PV and PVC names
// come from the volume context (empty outside Kubernetes).
type VolumeLabels struct {
	Volume       string // volume ID
	PV           string
	PVCNamespace string
	PVC          string
}

var volumeLabelNames = []string{"volume", "pv", "pvc_namespace", "pvc"}

func (l VolumeLabels) values(extra ...string) []string {
	return append([]string{l.Volume, l.PV, l.PVCNamespace, l.PVC}, extra...)
}

// ThrottleStats is what a rate-limited volume reports: the total time
// requests have waited for tokens, per direction (requests waiting
// together each count).
type ThrottleStats interface {
	Throttled() (read, write time.Duration)
}

// Operations, as the op label spells them.
const (
	OpRead    = "read"
	OpWrite   = "write"
	OpTrim    = "trim"
	OpZero    = "zero"
	OpFlush   = "flush"
	OpCache   = "cache"
	OpExtents = "extents"
)

// op indexes a device's per-operation series, so a request finds its
// series without hashing the op name.
type op int

const (
	opRead op = iota
	opWrite
	opTrim
	opZero
	opFlush
	opCache
	opExtents
	numOps
)

var allOps = [numOps]string{opRead: OpRead, opWrite: OpWrite, opTrim: OpTrim, opZero: OpZero,
	opFlush: OpFlush, opCache: OpCache, opExtents: OpExtents}

// Metrics is one registry of volume metrics with the Go and process
// collectors. Most programs use Default through the package functions.
type Metrics struct {
	reg *prometheus.Registry

	bytes      *prometheus.CounterVec
	ops        *prometheus.CounterVec
	errors     *prometheus.CounterVec
	latency    *prometheus.HistogramVec
	inFlight   *prometheus.GaugeVec
	limit      *prometheus.GaugeVec
	attach     *prometheus.GaugeVec
	reconnects *prometheus.CounterVec
	throttle   *throttleCollector
	cache      *cacheCollector

	mu      sync.Mutex
	refs    map[string]int       // open wrappers by volume ID
	devices map[*device]struct{} // open wrappers, for Stalled
	states  map[string]string    // attach state by volume ID
}

// New makes a registry with the volume metrics, the Go runtime's and the
// process's.
func New() *Metrics {
	vl := volumeLabelNames
	with := func(extra ...string) []string { return append(append([]string{}, vl...), extra...) }
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "volume", Name: "bytes_total",
			Help: "Bytes moved or affected by successful requests, by operation (read, write; trim and zero count the range)."}, with("op")),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "volume", Name: "requests_total",
			Help: "Requests completed successfully, by operation."}, with("op")),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "volume", Name: "errors_total",
			Help: "Requests that failed, by operation."}, with("op")),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: Namespace, Subsystem: "volume", Name: "request_duration_seconds",
			Help: "Time from a request reaching the volume's stack to its answer, including time throttled, by operation.",
			// 10 µs (a memory hit) to ~10 s (a stuck remote, a tight limit).
			Buckets: prometheus.ExponentialBuckets(10e-6, 4, 11)}, with("op")),
		inFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "volume", Name: "requests_in_flight",
			Help: "Requests being served now."}, with()),
		limit: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "volume", Name: "limit",
			Help: "Effective rate limit, by limit: read_bytes_per_second, write_bytes_per_second, read_iops, write_iops (0: unlimited), burst_seconds (0: default)."}, with("limit")),
		attach: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: Namespace, Subsystem: "volume", Name: "attach_state",
			Help: "1 for the volume's current attach state (e.g. attached, dead, detached)."}, with("state")),
		reconnects: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Subsystem: "volume", Name: "reconnects_total",
			Help: "Times the volume's link was re-established (to the kernel or to a remote backend)."}, with()),
		throttle: &throttleCollector{
			desc: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "volume", "throttled_seconds_total"),
				"Time requests waited for the rate limit, by direction (requests waiting together each count).", with("direction"), nil),
			src: map[VolumeLabels]ThrottleStats{},
		},
		cache:   newCacheCollector(vl),
		refs:    map[string]int{},
		devices: map[*device]struct{}{},
		states:  map[string]string{},
	}
	m.reg.MustRegister(m.bytes, m.ops, m.errors, m.latency, m.inFlight, m.limit, m.attach, m.reconnects, m.throttle, m.cache,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Default is the registry the package functions use.
var Default = New()

// Registry returns the registry, to add collectors of one's own.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// SetLimits records a volume's effective limits.
func (m *Metrics) SetLimits(v VolumeLabels, l limits.Limits) {
	for _, s := range []struct {
		name string
		v    float64
	}{
		{"read_bytes_per_second", float64(l.ReadBytesPerSec)},
		{"write_bytes_per_second", float64(l.WriteBytesPerSec)},
		{"read_iops", float64(l.ReadIOPS)},
		{"write_iops", float64(l.WriteIOPS)},
		{"burst_seconds", l.Burst.Seconds()},
	} {
		m.limit.WithLabelValues(v.values(s.name)...).Set(s.v)
	}
}

// SetThrottleStats makes the volume's throttled time scraped from s (nil
// stops it).
func (m *Metrics) SetThrottleStats(v VolumeLabels, s ThrottleStats) {
	m.throttle.mu.Lock()
	defer m.throttle.mu.Unlock()
	if s == nil {
		delete(m.throttle.src, v)
	} else {
		m.throttle.src[v] = s
	}
}

// SetAttachState records the volume's attach state: the series of the
// state given is 1, the previous state's series goes away.
func (m *Metrics) SetAttachState(v VolumeLabels, state string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.states[v.Volume]; ok && old != state {
		m.attach.DeleteLabelValues(v.values(old)...)
	}
	m.states[v.Volume] = state
	m.attach.WithLabelValues(v.values(state)...).Set(1)
}

// IncReconnects counts one reconnect of the volume.
func (m *Metrics) IncReconnects(v VolumeLabels) { m.reconnects.WithLabelValues(v.values()...).Inc() }

// Forget drops every series of a volume (Close of its last wrapper does
// it too).
func (m *Metrics) Forget(volumeID string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.states, volumeID)
	m.forget(volumeID)
}

// forget runs with m.mu held.
func (m *Metrics) forget(volumeID string) {
	match := prometheus.Labels{"volume": volumeID}
	for _, v := range []interface{ DeletePartialMatch(prometheus.Labels) int }{
		m.bytes, m.ops, m.errors, m.latency, m.inFlight, m.limit, m.attach, m.reconnects,
	} {
		v.DeletePartialMatch(match)
	}
	m.throttle.mu.Lock()
	for k := range m.throttle.src {
		if k.Volume == volumeID {
			delete(m.throttle.src, k)
		}
	}
	m.throttle.mu.Unlock()
	m.cache.forget(volumeID)
}

// throttleCollector reads throttle statistics at scrape time.
type throttleCollector struct {
	desc *prometheus.Desc
	mu   sync.Mutex
	src  map[VolumeLabels]ThrottleStats
}

func (c *throttleCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *throttleCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for v, s := range c.src {
		r, w := s.Throttled()
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, r.Seconds(), v.values("read")...)
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, w.Seconds(), v.values("write")...)
	}
}

// Package functions over Default.

// SetLimits records a volume's effective limits in Default.
func SetLimits(v VolumeLabels, l limits.Limits) { Default.SetLimits(v, l) }

// SetThrottleStats scrapes a volume's throttled time from s, in Default.
func SetThrottleStats(v VolumeLabels, s ThrottleStats) { Default.SetThrottleStats(v, s) }

// SetAttachState records a volume's attach state in Default.
func SetAttachState(v VolumeLabels, state string) { Default.SetAttachState(v, state) }

// IncReconnects counts a reconnect of a volume in Default.
func IncReconnects(v VolumeLabels) { Default.IncReconnects(v) }

// Forget drops a volume's series from Default.
func Forget(volumeID string) { Default.Forget(volumeID) }
