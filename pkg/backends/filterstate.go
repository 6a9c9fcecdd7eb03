package backends

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Block sizes accepted by the filters that keep blocks on local disk (cache,
// cow). The upper bound caps the read-modify-write cost of a small write to
// an absent block and one miss's latency.
const (
	MinFilterBlock = 4 << 10
	MaxFilterBlock = 16 << 20
)

// FilterBlock reads the block-size option key of s: a power of two from
// MinFilterBlock to MaxFilterBlock.
func FilterBlock(s Spec, key string) (uint64, error) {
	b, ok := s.Size(key)
	if !ok {
		return 0, fmt.Errorf("option %q: invalid size", key)
	}
	if b < MinFilterBlock || b > MaxFilterBlock || bits.OnesCount64(b) != 1 {
		return 0, fmt.Errorf("option %q: %s is not a power of two from %s to %s", key,
			FormatSize(b), FormatSize(MinFilterBlock), FormatSize(MaxFilterBlock))
	}
	return b, nil
}

// FilterDirOption reads the directory option key of s: "" when unset, else
// a cleaned absolute path.
func FilterDirOption(s Spec, key string) (string, error) {
	d, set := s.Options[key]
	if !set {
		return "", nil
	}
	if d == "" || !filepath.IsAbs(d) {
		return "", fmt.Errorf("option %q: %q is not an absolute path", key, d)
	}
	return filepath.Clean(d), nil
}

// Forget calls every enabled filter's Forget for volume s: its local state
// goes once the volume has been closed cleanly (see Filter.Forget).
func Forget(env Env, s Spec) error {
	var errs []error
	for _, f := range filters() {
		if f.Forget != nil && f.On(s) {
			if err := f.Forget(env, s); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", f.Name, err))
			}
		}
	}
	return errors.Join(errs...)
}

// RemoveFilterDir removes the default state directory of the filter named
// name for s (what FilterDir makes when no directory option is set); a
// directory the spec names is the operator's and stays.
func RemoveFilterDir(env Env, s Spec, name, key string) error {
	if _, set := s.Options[key]; set {
		return nil
	}
	return os.RemoveAll(env.dirPath(name, BackendSpec(s)))
}

// FilterDir is dir, or when dir is "" the default state directory of the
// filter named name: one keyed by BackendSpec(s), so retuning filters finds
// it again. key is the filter's directory option, for errors.
func FilterDir(env Env, s Spec, name, key, dir string) (string, error) {
	if dir != "" {
		return dir, nil
	}
	dir, err := env.Dir(name, BackendSpec(s))
	if err != nil {
		return "", fmt.Errorf("option %q: %w", key, err)
	}
	return dir, nil
}

// LockFilterDir creates dir and takes an exclusive flock on its file "lock",
// so one process at a time uses the state a filter keeps there; closing the
// returned file releases it. key is the filter's directory option and what
// names the directory, both for errors.
func LockFilterDir(dir, key, what string) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("option %q: %w", key, err)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("option %q: %w", key, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("option %q: %s directory %s is in use by another process: %w", key, what, dir, err)
	}
	return f, nil
}

// GrowFilter does the part of a Resize from old to size that the filters
// keeping a local file laid out like the volume (cache, cow) share: it
// refuses a shrink, grows inner and then f. It reports false, and does
// nothing, when size is old. name prefixes the shrink error and file
// names f in errors.
func GrowFilter(ctx context.Context, inner Device, f *os.File, old, size uint64, name, file string) (bool, error) {
	if size == old {
		return false, nil
	}
	if size < old {
		return false, fmt.Errorf("%s: shrinking from %d to %d: %w", name, old, size, ErrInvalid)
	}
	if err := Resize(ctx, inner, size); err != nil {
		return false, err
	}
	if err := f.Truncate(int64(size)); err != nil {
		return false, fmt.Errorf("%s: %w", file, err)
	}
	return true, nil
}
