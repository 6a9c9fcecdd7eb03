package backends

import (
	"context"
	"time"
)

// Sleep waits for d or the end of ctx, whichever comes first (a backend's
// wait between retries); it reports whether the full time passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
