package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/attach"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/rate"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
	"github.com/csi-nbd/csi-nbd/pkg/metrics"
)

// volumeTracker follows a staged volume's PV for live rate limits
// (kube.Watcher); nil when not in a cluster.
type volumeTracker interface {
	Track(volumeID string, volumeContext map[string]string)
	Untrack(volumeID string)
}

// nodeAttacher adapts attach.Manager to the driver's Attacher: the node
// plugin's volumes are attached exactly as `csi-nbd attach` attaches them,
// with their state under STATE-DIR/attach so a restart re-serves them.
// Every stack is wrapped for metrics, and rate limits reach its rate
// filter live.
type nodeAttacher struct {
	m       *attach.Manager
	o       attach.Options
	ctxDir  string // volume contexts by attach ID, for metrics labels after a restart
	tracker volumeTracker

	mu       sync.Mutex
	contexts map[string]map[string]string
}

func newNodeAttacher(stateDir, nodeID string, f attachFlags) (*nodeAttacher, error) {
	if err := f.check(); err != nil {
		return nil, err
	}
	m, err := attach.NewManager(filepath.Join(stateDir, "attach"), backends.Env{
		StateDir: filepath.Join(stateDir, "volumes"),
		Owner:    "csi-nbd-node@" + nodeID,
	})
	if err != nil {
		return nil, err
	}
	m.FDStore = f.fdStore
	a := &nodeAttacher{m: m, o: attach.Options{
		Connections: f.connections, Timeout: f.timeout, DeadConnTimeout: f.deadConnTimeout, Fallback: f.fallback,
	}, ctxDir: filepath.Join(stateDir, "contexts"), contexts: map[string]map[string]string{}}
	if err := os.MkdirAll(a.ctxDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	m.WrapDevice = func(id string, dev backends.Device) backends.Device { return metrics.Wrap(dev, a.labels(id)) }
	return a, nil
}

func (a *nodeAttacher) labels(id string) metrics.VolumeLabels {
	a.mu.Lock()
	c := a.contexts[id]
	a.mu.Unlock()
	return metrics.VolumeLabels{Volume: id, PV: c["pvName"], PVCNamespace: c["pvcNamespace"], PVC: c["pvcName"]}
}

func (a *nodeAttacher) saveContext(id string, c map[string]string) error {
	a.mu.Lock()
	a.contexts[id] = c
	a.mu.Unlock()
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(a.ctxDir, id+".json"), b, 0o600)
}

func (a *nodeAttacher) loadContext(id string) map[string]string {
	var c map[string]string
	if b, err := os.ReadFile(filepath.Join(a.ctxDir, id+".json")); err == nil {
		_ = json.Unmarshal(b, &c)
	}
	a.mu.Lock()
	a.contexts[id] = c
	a.mu.Unlock()
	return c
}

func (a *nodeAttacher) Attach(ctx context.Context, id, spec string, secrets, volumeContext map[string]string, readOnly bool) (string, error) {
	if err := a.saveContext(id, volumeContext); err != nil {
		return "", fmt.Errorf("volume context: %w", err)
	}
	o := a.o
	o.ReadOnly = readOnly
	p, err := a.m.Attach(ctx, id, spec, secrets, o)
	if err != nil {
		return "", err
	}
	metrics.SetAttachState(a.labels(id), "attached")
	if a.tracker != nil {
		a.tracker.Track(spec, volumeContext)
	}
	return p, nil
}

func (a *nodeAttacher) Detach(ctx context.Context, id string) error {
	spec := ""
	for _, v := range a.m.List() {
		if v.ID == id {
			spec = v.Spec
		}
	}
	if err := a.m.Detach(ctx, id); err != nil {
		return err
	}
	if a.tracker != nil && spec != "" {
		a.tracker.Untrack(spec)
	}
	metrics.Forget(id)
	a.mu.Lock()
	delete(a.contexts, id)
	a.mu.Unlock()
	if err := os.Remove(filepath.Join(a.ctxDir, id+".json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		klog.ErrorS(err, "Removing a volume context", "volume", id)
	}
	return nil
}

func (a *nodeAttacher) DevicePath(id string) (string, bool) {
	for _, v := range a.m.List() {
		if v.ID == id {
			return v.Path, true
		}
	}
	return "", false
}

func (a *nodeAttacher) Resize(ctx context.Context, id string, size uint64) error {
	return a.m.Resize(ctx, id, size)
}

func (a *nodeAttacher) Health(id string) error { return a.m.Health(id) }

// Resume re-serves the volumes attached before a restart, with their
// labels, and follows their PVs again.
func (a *nodeAttacher) Resume(ctx context.Context) error {
	ents, _ := os.ReadDir(a.ctxDir)
	for _, e := range ents {
		if id, ok := strings.CutSuffix(e.Name(), ".json"); ok && id != "" {
			a.loadContext(id)
		}
	}
	vols, err := a.m.Resume(ctx)
	for _, v := range vols {
		metrics.SetAttachState(a.labels(v.ID), "attached")
		if a.tracker != nil {
			a.mu.Lock()
			c := a.contexts[v.ID]
			a.mu.Unlock()
			a.tracker.Track(v.Spec, c)
		}
	}
	return err
}

// Healthy reports the first attached volume whose link is dead.
func (a *nodeAttacher) Healthy(context.Context) error {
	for _, v := range a.m.List() {
		if err := a.m.Health(v.ID); err != nil {
			return fmt.Errorf("volume %s (%s): %w", v.ID, v.Path, err)
		}
	}
	return nil
}

// SetLimits applies rate limits to a staged volume's rate filter, live
// (kube.LimitSetter). volumeID is the CSI volume ID, the volume's spec.
func (a *nodeAttacher) SetLimits(volumeID string, l limits.Limits) error {
	spec, err := backends.Parse(volumeID)
	if err != nil {
		return err
	}
	id := backends.VolumeKey(spec)
	dev, ok := a.m.Device(id)
	if !ok {
		return fmt.Errorf("volume %s is not attached here", id)
	}
	rd, ok := rate.Find(dev)
	if !ok {
		return errors.New("the volume has no rate filter (created without rate limits and without --rate-always)")
	}
	if err := rd.SetLimits(l); err != nil {
		return err
	}
	metrics.SetLimits(a.labels(id), l)
	return nil
}

func (a *nodeAttacher) Close() error { return a.m.Close() }
