package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/attach/fuseloop"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/fdstore"
)

// keepTimeout bounds one exchange with the fd store.
const keepTimeout = 10 * time.Second

// Names of a FUSE+loop volume's descriptors in the fd store.
func fuseFDName(id string) string { return fileKey(id) + ".fuse" }
func loopFDName(id string) string { return fileKey(id) + ".loop" }

func (m *Manager) fdStore() *fdstore.Client { return &fdstore.Client{Socket: m.FDStore} }

// keep puts a FUSE+loop attachment's /dev/fuse and loop descriptors in the
// fd store, so that they outlive this process. It reports whether the
// store holds them; without a store, or when it cannot, the attachment
// works but does not survive its server (Close then detaches it).
func (m *Manager) keep(ctx context.Context, id string, a loopAttachment) bool {
	if m.FDStore == "" {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, keepTimeout)
	defer cancel()
	err := func() error {
		ff, err := a.FuseFD()
		if err != nil {
			return err
		}
		defer ff.Close()
		lf, err := a.LoopFD()
		if err != nil {
			return err
		}
		defer lf.Close()
		s := m.fdStore()
		// The loop first: a store holding /dev/fuse is what Resume
		// goes by.
		if err := s.Put(ctx, loopFDName(id), lf); err != nil {
			return err
		}
		return s.Put(ctx, fuseFDName(id), ff)
	}()
	if err != nil {
		klog.ErrorS(err, "attach: the fd store cannot keep the FUSE connection: the volume will not survive a restart of this process",
			"volume", id, "fdStore", m.FDStore)
		m.unkeep(ctx, id)
		return false
	}
	return true
}

// unkeep removes a volume's descriptors from the fd store, if any.
func (m *Manager) unkeep(ctx context.Context, id string) {
	if m.FDStore == "" {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, keepTimeout)
	defer cancel()
	s := m.fdStore()
	for _, n := range []string{fuseFDName(id), loopFDName(id)} {
		if err := s.Delete(ctx, n); err != nil && !errors.Is(err, fdstore.ErrNotFound) {
			klog.ErrorS(err, "attach: removing a descriptor from the fd store", "volume", id, "name", n)
		}
	}
}

// unkeepLoop removes only the loop descriptor from the fd store.
func (m *Manager) unkeepLoop(ctx context.Context, id string) {
	ctx, cancel := context.WithTimeout(ctx, keepTimeout)
	defer cancel()
	if err := m.fdStore().Delete(ctx, loopFDName(id)); err != nil && !errors.Is(err, fdstore.ErrNotFound) {
		klog.ErrorS(err, "attach: removing the loop descriptor from the fd store", "volume", id)
	}
}

// rekeepLoop puts the loop descriptor back after a failed Detach.
func (m *Manager) rekeepLoop(ctx context.Context, id string, a loopAttachment) {
	ctx, cancel := context.WithTimeout(ctx, keepTimeout)
	defer cancel()
	lf, err := a.LoopFD()
	if err == nil {
		err = m.fdStore().Put(ctx, loopFDName(id), lf)
		lf.Close()
	}
	if err != nil {
		klog.ErrorS(err, "attach: the fd store no longer keeps the loop device: it detaches if this process dies while nobody uses it",
			"volume", id)
	}
}

// errNotKept is resumeLoop's error when the fd store has no descriptor
// of the volume's FUSE connection.
var errNotKept = errors.New("the fd store holds no /dev/fuse descriptor for it")

// loopConfig is the fuseloop.Config of volume id over dev.
func (m *Manager) loopConfig(id string, dev backends.Device, o Options) (fuseloop.Config, error) {
	bs, err := blockSize(dev.Caps())
	if err != nil {
		return fuseloop.Config{}, err
	}
	return fuseloop.Config{Name: "volume", Dir: m.fuseDir(id), ReadOnly: o.ReadOnly, BlockSize: uint32(bs)}, nil
}

// resumeLoop serves a FUSE+loop volume of a dead process again, in place,
// with the descriptors the fd store kept.
func (m *Manager) resumeLoop(ctx context.Context, r record) (Volume, error) {
	if m.FDStore == "" || m.loop == nil {
		return Volume{}, errNotKept
	}
	sctx, cancel := context.WithTimeout(ctx, keepTimeout)
	defer cancel()
	s := m.fdStore()
	ff, err := s.Get(sctx, fuseFDName(r.ID))
	if err != nil {
		if errors.Is(err, fdstore.ErrNotFound) {
			return Volume{}, errNotKept
		}
		return Volume{}, fmt.Errorf("%w: %w", errNotKept, err)
	}
	defer ff.Close()
	var lf *os.File
	if lf, err = s.Get(sctx, loopFDName(r.ID)); err != nil {
		klog.InfoS("attach: the fd store has no loop descriptor; opening the device", "volume", r.ID, "device", r.Path, "err", err)
		lf = nil
	} else {
		defer lf.Close()
	}
	dev, secrets, err := m.reopen(ctx, r)
	if err != nil {
		return Volume{}, err
	}
	cfg, err := m.loopConfig(r.ID, dev, r.Options)
	if err != nil {
		dev.Close()
		return Volume{}, err
	}
	a, err := m.loop.Resume(ctx, dev, cfg, fuseloop.ResumeState{FUSE: ff, Loop: lf, LoopPath: r.Path, Init: r.FuseInit})
	if err != nil {
		dev.Close()
		return Volume{}, err
	}
	r.PID = os.Getpid()
	v := m.newVolume(r, dev)
	v.loop = a
	v.kept = true
	if err := m.st.save(v.rec, secrets); err != nil {
		klog.ErrorS(err, "attach: recording the resumed volume", "volume", r.ID)
	}
	m.watchAttachment(v, a)
	m.mu.Lock()
	m.vols[r.ID] = v
	m.mu.Unlock()
	klog.InfoS("attach: FUSE+loop volume re-served in place", "volume", r.ID, "device", r.Path)
	return v.info(), nil
}

// watchAttachment marks the volume unhealthy when its attachment ends by itself.
func (m *Manager) watchAttachment(v *volume, a loopAttachment) {
	go func() {
		select {
		case <-a.Done():
			if !v.detaching.Load() {
				klog.InfoS("attach: loop device went away underneath us", "volume", v.rec.ID, "device", v.rec.Path)
				v.setErr(errors.New("the loop device or its FUSE file went away"))
			}
		case <-v.gone:
		}
	}()
}
