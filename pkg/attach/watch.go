package attach

import (
	"context"
	"errors"
	"time"

	"k8s.io/klog/v2"
)

// The watcher keeps nbd volumes healthy. The kernel announces a dead
// connection (a request timed out, the socket broke) on the LINK_DEAD
// multicast group; we then hand it a fresh socket (RECONFIGURE). Polling
// STATUS every few seconds is the backstop for lost notifications and
// notices devices torn down by someone else (DISCONNECT), which the
// kernel announces by sending NBD_CMD_DISC on every connection and no
// LINK_DEAD.

// pollInterval is how often the watcher looks at every volume.
var pollInterval = 5 * time.Second

// settle is how long after a connection ended the watcher waits for the
// kernel's LINK_DEAD before deciding it was a DISCONNECT.
var settle = time.Second

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

// connEnded is called when serving one connection of v ended.
func (m *Manager) connEnded(v *volume) {
	if v.detaching.Load() {
		return
	}
	v.mu.Lock()
	v.endedAt = time.Now()
	v.mu.Unlock()
	time.AfterFunc(settle, func() {
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
			for _, v := range m.nbdVolumes() {
				if v.rec.Index == int(idx) {
					v.mu.Lock()
					v.linkDeadAt = time.Now()
					v.mu.Unlock()
					m.check(ctx, k, v)
				}
			}
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
	if live >= want {
		v.setErr(nil)
		return
	}
	v.mu.Lock()
	ended, linkDead, repaired := v.endedAt, v.linkDeadAt, v.repairedAt
	v.mu.Unlock()
	if time.Since(ended) < settle && linkDead.Before(ended) {
		return // the LINK_DEAD may be on its way; kicked again later
	}
	if live == 0 && !linkDead.After(repaired) {
		// Every connection ended with no LINK_DEAD: the kernel sent
		// NBD_CMD_DISC, someone disconnected the device.
		m.forget(v, "disconnected by the kernel (NBD_CMD_DISC on every connection)")
		return
	}
	klog.InfoS("attach: replacing dead connections", "volume", v.rec.ID, "device", v.rec.Path, "alive", live, "want", want)
	if err := m.reconnect(cctx, k, v, int(want-live)); err != nil {
		v.setErr(errors.Join(errors.New("replacing dead connections failed"), err))
		klog.ErrorS(err, "attach: replacing dead connections", "volume", v.rec.ID)
		return
	}
	v.setErr(nil)
}
