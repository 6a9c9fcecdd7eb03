//go:build ignore

// The FUSE+loop fallback, adapted to the Manager. Excluded (the "ignore"
// constraint, which go mod tidy honours too) until package fuseloop is
// merged: then delete the build line above. Until then, without it, there
// is no fallback: Options.Fallback "always" fails and "auto" needs nbd.
// (It was compiled and run against the fuseloop branch on 2026-11-25.)

package attach

import (
	"context"

	"github.com/csi-nbd/csi-nbd/pkg/attach/fuseloop"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func init() { defaultLoopFallback = fuseloopAdapter{} }

type fuseloopAdapter struct{}

func (fuseloopAdapter) Available() error { return fuseloop.Available() }

func (fuseloopAdapter) Attach(ctx context.Context, dev backends.Device, cfg LoopConfig) (loopAttachment, error) {
	a, err := fuseloop.Attach(ctx, dev, fuseloop.Config{
		Name: cfg.Name, Dir: cfg.Dir, ReadOnly: cfg.ReadOnly, BlockSize: cfg.BlockSize,
	})
	if err != nil {
		return nil, err
	}
	return a, nil
}

func (fuseloopAdapter) CleanupStale(dir string) error { return fuseloop.CleanupStale(dir) }
