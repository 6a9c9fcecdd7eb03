package attach

import (
	"context"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// LoopConfig mirrors fuseloop.Config (kept here so this package compiles
// without the fallback linked in).
type LoopConfig struct {
	Name      string // file name inside Dir
	Dir       string // private directory where the FUSE file system is mounted
	ReadOnly  bool
	BlockSize uint32
}

// loopFallback is the FUSE file + loop device fallback for kernels
// without nbd (package fuseloop, wired in by fuseloop_adapter.go).
type loopFallback interface {
	// Available is nil when /dev/fuse and /dev/loop-control are usable.
	Available() error
	Attach(ctx context.Context, dev backends.Device, cfg LoopConfig) (loopAttachment, error)
	// CleanupStale detaches loops and unmounts FUSE file systems left
	// under dir by a process that died.
	CleanupStale(dir string) error
}

type loopAttachment interface {
	Path() string
	Resize(ctx context.Context, size uint64) error
	Detach(ctx context.Context) error // does not close the device
	Done() <-chan struct{}
}

// defaultLoopFallback is set by the adapter when fuseloop is linked in.
var defaultLoopFallback loopFallback
