package attach

import (
	"context"
	"os"

	"github.com/csi-nbd/csi-nbd/pkg/attach/fuseloop"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// loopFallback is the FUSE file + loop device fallback for kernels
// without nbd (package fuseloop). It is an interface so tests can turn the
// fallback off (a nil Manager.loop).
type loopFallback interface {
	// Available is nil when /dev/fuse and /dev/loop-control are usable.
	Available() error
	Attach(ctx context.Context, dev backends.Device, cfg fuseloop.Config) (loopAttachment, error)
	// Resume serves an attachment of a dead process again (fuseloop.Resume).
	Resume(ctx context.Context, dev backends.Device, cfg fuseloop.Config, st fuseloop.ResumeState) (loopAttachment, error)
	// CleanupStale detaches loops and unmounts FUSE file systems left
	// under dir by a process that died.
	CleanupStale(dir string) error
}

// loopAttachment is what the Manager uses of a *fuseloop.Attachment.
type loopAttachment interface {
	Path() string
	Resize(ctx context.Context, size uint64) error
	Detach(ctx context.Context) error // does not close the device
	Done() <-chan struct{}
	// Stop ends serving without detaching, for a successor's Resume.
	Stop()
	FuseFD() (*os.File, error)
	LoopFD() (*os.File, error)
	InitRequest() []byte
}

var _ loopAttachment = (*fuseloop.Attachment)(nil)

// fuseloopAdapter is package fuseloop as a loopFallback.
type fuseloopAdapter struct{}

func (fuseloopAdapter) Available() error { return fuseloop.Available() }

func (fuseloopAdapter) Attach(ctx context.Context, dev backends.Device, cfg fuseloop.Config) (loopAttachment, error) {
	a, err := fuseloop.Attach(ctx, dev, cfg)
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return a, nil
}

func (fuseloopAdapter) Resume(ctx context.Context, dev backends.Device, cfg fuseloop.Config, st fuseloop.ResumeState) (loopAttachment, error) {
	a, err := fuseloop.Resume(ctx, dev, cfg, st)
	if err != nil {
		return nil, err
	}
	return a, nil
}

func (fuseloopAdapter) CleanupStale(dir string) error { return fuseloop.CleanupStale(dir) }
