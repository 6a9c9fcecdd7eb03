package kube_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/csi-nbd/csi-nbd/internal/kubetest"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/rate"
	"github.com/csi-nbd/csi-nbd/pkg/kube"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// rateSetter applies limits to the rate filter of open volumes, as the
// node plugin does, and remembers when.
type rateSetter struct {
	mu      sync.Mutex
	devs    map[string]backends.Device
	applied chan time.Time
}

func (s *rateSetter) SetLimits(id string, l limits.Limits) error {
	s.mu.Lock()
	dev := s.devs[id]
	s.mu.Unlock()
	r, ok := rate.Find(dev)
	if !ok {
		return fmt.Errorf("volume %q has no rate filter", id)
	}
	if err := r.SetLimits(rate.Limits(l)); err != nil {
		return err
	}
	s.applied <- time.Now()
	return nil
}

// sample is the bytes read by a moment.
type sample struct {
	at    time.Time
	bytes int64
}

// TestMeasureLiveLimits measures the read throughput of a volume served
// over NBD while its limit is changed through a VolumeAttributesClass and
// then annotations, against a real API server, and logs how far each
// steady rate is from the new limit and how long the change took. It is
// a measurement, not a check (no timed assertions): run it with
// CSI_NBD_MEASURE=1 (hack/measure-live-limits.sh).
func TestMeasureLiveLimits(t *testing.T) {
	if os.Getenv("CSI_NBD_MEASURE") == "" {
		t.Skip("a measurement: set CSI_NBD_MEASURE=1")
	}
	srv := kubetest.Start(t)
	cs := srv.Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	const ns, claim, pvName = "apps", "data", "pvc-measure"
	volumeID := "rate=true,size=256Mi;memory:" + pvName
	_, err := cs.StorageV1().VolumeAttributesClasses().Create(ctx, &storagev1.VolumeAttributesClass{
		ObjectMeta: metav1.ObjectMeta{Name: "r40"}, DriverName: driver,
		Parameters: map[string]string{"readBytesPerSecond": "40Mi", "burst": "100ms"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	createVolume(t, cs, ns, claim, pvName, volumeID)

	spec, err := backends.Parse(volumeID)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := backends.Open(ctx, spec, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	// Real data, so reads move bytes (a sparse volume answers with holes).
	fill := make([]byte, 1<<20)
	for i := range fill {
		fill[i] = byte(i*7 + 1)
	}
	for off := uint64(0); off < 256<<20; off += uint64(len(fill)) {
		if err := dev.WriteAt(ctx, fill, off, false); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _ = dev.Close() }) // after the server below has stopped
	sock := testserver.ServeNBD(t, dev)

	setter := &rateSetter{devs: map[string]backends.Device{volumeID: dev}, applied: make(chan time.Time, 4)}
	w := kube.New(cs, "node-1", driver, setter)
	w.Track(volumeID, nil)
	go func() { _ = w.Run(ctx) }()

	// Four readers, 1 MiB each, sequential through the volume: the rate
	// filter is the bottleneck.
	var total atomic.Int64
	rctx, rcancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for i := range 4 {
		c, err := nbd.Dial(ctx, "nbd+unix:///?socket="+sock, nbd.ClientConfig{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1<<20)
			off := uint64(i) * (64 << 20)
			for rctx.Err() == nil {
				if err := c.ReadAt(rctx, buf, off); err != nil {
					return
				}
				total.Add(int64(len(buf)))
				off = (off + uint64(len(buf))) % (256 << 20)
			}
		}()
	}
	var mu sync.Mutex
	var samples []sample
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case now := <-tick.C:
				mu.Lock()
				samples = append(samples, sample{now, total.Load()})
				mu.Unlock()
			}
		}
	}()
	// rateBetween is the throughput between two moments, from the samples.
	rateBetween := func(from, to time.Time) float64 {
		mu.Lock()
		defer mu.Unlock()
		var a, b *sample
		for i := range samples {
			s := &samples[i]
			if a == nil && !s.at.Before(from) {
				a = s
			}
			if !s.at.After(to) {
				b = s
			}
		}
		if a == nil || b == nil || !b.at.After(a.at) {
			return 0
		}
		return float64(b.bytes-a.bytes) / b.at.Sub(a.at).Seconds()
	}
	// settled is when throughput over a sliding 250 ms window first comes
	// within 5% of the limit after the change.
	settled := func(since time.Time, limit float64) time.Duration {
		for d := 0 * time.Millisecond; d < 3*time.Second; d += 20 * time.Millisecond {
			r := rateBetween(since.Add(d), since.Add(d+250*time.Millisecond))
			if r > 0 && r >= 0.95*limit && r <= 1.05*limit {
				return d
			}
		}
		return -1
	}

	time.Sleep(time.Second)
	start := time.Now()
	t.Logf("unlimited: %.1f MiB/s", rateBetween(start.Add(-800*time.Millisecond), start)/(1<<20))

	measure := func(what string, limit float64, change func()) {
		changed := time.Now()
		change()
		var applied time.Time
		select {
		case applied = <-setter.applied:
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: not applied", what)
		}
		time.Sleep(4 * time.Second)
		steady := rateBetween(applied.Add(time.Second), applied.Add(4*time.Second))
		s := settled(changed, limit)
		t.Logf("%s: applied %v after the change; within 5%% of the limit %v after the change; steady %.2f MiB/s vs limit %.2f MiB/s (%+.2f%%)",
			what, applied.Sub(changed).Round(time.Millisecond), s.Round(time.Millisecond),
			steady/(1<<20), limit/(1<<20), 100*(steady-limit)/limit)
	}
	measure("VolumeAttributesClass r40 (40Mi/s)", 40<<20, func() {
		_, err := cs.CoreV1().PersistentVolumes().Patch(ctx, pvName, types.MergePatchType,
			[]byte(`{"spec":{"volumeAttributesClassName":"r40"}}`), metav1.PatchOptions{})
		if err != nil {
			t.Fatal(err)
		}
	})
	for _, v := range []string{"20Mi", "80Mi"} {
		measure("annotation read-bytes-per-second="+v, map[string]float64{"20Mi": 20 << 20, "80Mi": 80 << 20}[v], func() {
			_, err := cs.CoreV1().PersistentVolumeClaims(ns).Patch(ctx, claim, types.MergePatchType,
				[]byte(`{"metadata":{"annotations":{"csi-nbd.io/read-bytes-per-second":"`+v+`"}}}`), metav1.PatchOptions{})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
	rcancel()
	wg.Wait()
}
