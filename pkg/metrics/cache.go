package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/cache"
)

// findCache looks through a stack's filters for the cache filter.
func findCache(dev backends.Device) (*cache.Device, bool) { return backends.Find[*cache.Device](dev) }

// cacheCollector reads cache filters' statistics at scrape time.
type cacheCollector struct {
	bytes, dirty, used *prometheus.Desc

	mu  sync.Mutex
	src map[VolumeLabels]*cache.Device
}

func newCacheCollector(labels []string) *cacheCollector {
	with := func(extra ...string) []string { return append(append([]string{}, labels...), extra...) }
	return &cacheCollector{
		bytes: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "cache", "bytes_total"),
			"Bytes the local-disk cache served (hit), fetched from the backend (miss) or reclaimed under its cap (evicted).", with("kind"), nil),
		dirty: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "cache", "dirty_bytes"),
			"Bytes written to the cache and not yet written back to the backend.", with(), nil),
		used: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "cache", "used_bytes"),
			"Bytes held in the cache file.", with(), nil),
		src: map[VolumeLabels]*cache.Device{},
	}
}

func (c *cacheCollector) set(v VolumeLabels, d *cache.Device) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if d == nil {
		delete(c.src, v)
	} else {
		c.src[v] = d
	}
}

func (c *cacheCollector) forget(volumeID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.src {
		if k.Volume == volumeID {
			delete(c.src, k)
		}
	}
}

func (c *cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.bytes
	ch <- c.dirty
	ch <- c.used
}

func (c *cacheCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for v, d := range c.src {
		s := d.Stats()
		for _, k := range []struct {
			kind string
			n    uint64
		}{{"hit", s.HitBytes}, {"miss", s.MissBytes}, {"evicted", s.EvictedBytes}} {
			ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(k.n), v.values(k.kind)...)
		}
		ch <- prometheus.MustNewConstMetric(c.dirty, prometheus.GaugeValue, float64(s.DirtyBytes), v.values()...)
		ch <- prometheus.MustNewConstMetric(c.used, prometheus.GaugeValue, float64(s.UsedBytes), v.values()...)
	}
}
