package attach

import (
	"context"
	"errors"
	"time"

	"k8s.io/klog/v2"
)

// The watcher keeps nbd volumes healthy. A connection that ends without
// NBD_CMD_DISC broke (a request timed out and the kernel shut the socket,
// or an error on our side): it gets a fresh socket through RECONFIGURE.
// Connections that end with NBD_CMD_DISC mean the device is being
// disconnected (csi-nbd detach, nbd-client -d): once all have, the volume
// is forgotten. The kernel's LINK_DEAD notifications and polling STATUS
// every few seconds are backstops; STATUS also shows devices torn down
// underneath us.

// pollInterval is how often the watcher looks at every volume.
var pollInterval = 5 * time.Second

// settle is how long after a connection broke the watcher waits before
// replacing it, so the kernel has marked its end dead (RECONFIGURE only
// replaces dead sockets).
const settle = 100 * time.Millisecond

// maxBackoff bounds the wait between repairs that keep failing.
const maxBackoff = 5 * time.Second

func (m *Manager) startWatch() {
	m.watchMu.Lock()
	defer m.watchMu.Unlock()
	if m.watch != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	m.watch = cancel
	go m.watchLoop(ctx)
}

func (m *Manager) stopWatch() {
	m.watchMu.Lock()
	defer m.watchMu.Unlock()
	if m.watch != nil {
		m.watch()
		m.watch = nil
	}
}

// connEnded is called when serving one connection of v ended; disc says
// whether the kernel sent NBD_CMD_DISC last.
func (m *Manager) connEnded(v *volume, disc bool) {
	if v.detaching.Load() {
		return
	}
	if disc {
		v.mu.Lock()
		v.discSeen = true
		v.mu.Unlock()
	}
	m.kickAfter(settle)
}

func (m *Manager) kickAfter(d time.Duration) {
	time.AfterFunc(d, func() {
		select {
		case m.kick <- struct{}{}:
		default:
		}
	})
}

func (m *Manager) watchLoop(ctx context.Context) {
	k, err := m.kernel(ctx)
	if err != nil {
		klog.ErrorS(err, "attach: watcher cannot reach the kernel")
		return
	}
	dead, err := k.WatchLinkDead(ctx)
	if err != nil {
		klog.InfoS("attach: no LINK_DEAD notifications; polling only", "err", err)
	}
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case idx, ok := <-dead:
			if !ok {
				dead = nil
				continue
			}
			klog.V(2).InfoS("attach: kernel reports a dead connection", "device", nbdPath(int(idx)))
			// Our end of it may not have noticed yet.
			m.kickAfter(settle)
		case <-m.kick:
			for _, v := range m.nbdVolumes() {
				m.check(ctx, k, v)
			}
		case <-t.C:
			for _, v := range m.nbdVolumes() {
				m.check(ctx, k, v)
			}
		}
	}
}

func (m *Manager) nbdVolumes() []*volume {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*volume
	for _, v := range m.vols {
		if v.rec.Kind == KindNBD {
			out = append(out, v)
		}
	}
	return out
}

// check looks at one volume and repairs or forgets it.
func (m *Manager) check(ctx context.Context, k kernel, v *volume) {
	if v.detaching.Load() {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	sts, err := k.Status(cctx, v.rec.Index)
	if err != nil {
		v.setErr(err)
		return
	}
	if len(sts) == 0 || !sts[0].Connected {
		m.forget(v, "the kernel no longer has the device configured")
		return
	}
	want := int32(v.rec.Options.Connections)
	live := v.live.Load()
	v.mu.Lock()
	disc, repaired, failures := v.discSeen, v.repairedAt, v.failures
	if live >= want {
		v.failures = 0
		v.err = nil
	}
	v.mu.Unlock()
	if live >= want {
		return
	}
	if disc {
		if live == 0 {
			m.forget(v, "disconnected (the kernel sent NBD_CMD_DISC)")
		}
		return // the other connections are being told too
	}
	if wait := min(settle<<failures, maxBackoff); time.Since(repaired) < wait {
		m.kickAfter(wait - time.Since(repaired))
		return
	}
	klog.InfoS("attach: replacing broken connections", "volume", v.rec.ID, "device", v.rec.Path, "alive", live, "want", want)
	err = m.reconnect(cctx, k, v, int(want-live))
	v.mu.Lock()
	v.failures = min(failures+1, 16)
	v.mu.Unlock()
	if err != nil {
		v.setErr(errors.Join(errors.New("replacing broken connections failed"), err))
		klog.ErrorS(err, "attach: replacing broken connections", "volume", v.rec.ID)
		return
	}
	// Confirmed (failures reset) once a later check sees them all alive.
	m.kickAfter(settle)
}
