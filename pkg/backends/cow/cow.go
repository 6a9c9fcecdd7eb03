// Package cow is the cow filter: a writable, block-granular, sparse local
// overlay over a read-only origin (an http ISO, a data: image...), like
// nbdkit's cow filter. Nothing is written to the origin.
//
// Keys:
//
//	cow=true            turn the overlay on
//	cow-block=64Ki      overlay granularity, a power of two >= 4Ki
//	cow-persist=false   keep the overlay when the volume is closed
//	cow-dir=/abs/dir    where the overlay lives (default: the state directory)
//
// The overlay is a sparse file laid out like the volume plus two bitmaps:
// which blocks the overlay holds, and which of those read as zeros (a
// trimmed or zeroed block, kept as a hole without reading the origin). A
// partial write to a block still in the origin copies the block up first.
// Without cow-persist the overlay is deleted on Close (and any left by a
// crash is discarded at Open); with it the bitmaps are saved at every
// FLUSH, FUA write and Close and reloaded at Open, so everything flushed
// survives a crash or restart, like a disk with a volatile write cache.
package cow

import (
	"context"
	"fmt"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

const (
	keyCow     = "cow"
	keyBlock   = "cow-block"
	keyPersist = "cow-persist"
	keyDir     = "cow-dir"
)

// Filter is the registration; exported for documentation tools.
var Filter = backends.Filter{
	Name:  "cow",
	Order: 30,
	Options: []backends.Option{
		{Key: keyCow, Kind: backends.OptBool, Default: "false",
			Doc: "Writable copy-on-write overlay over a read-only origin; the origin is never written."},
		{Key: keyBlock, Kind: backends.OptSize, Default: "64Ki",
			Doc: "Overlay block size, a power of two from 4Ki to 16Mi: a partial write copies one block up."},
		{Key: keyPersist, Kind: backends.OptBool, Default: "false",
			Doc: "Keep the overlay when the volume is closed (saved at every flush) instead of discarding it."},
		{Key: keyDir, Kind: backends.OptString,
			Doc: "Absolute directory for the overlay files (default: a directory in the state directory named after " +
				"the origin's URL and options)."},
	},
	Enabled: func(s backends.Spec) bool {
		for _, k := range []string{keyCow, keyBlock, keyPersist, keyDir} {
			if _, ok := s.Options[k]; ok {
				return true
			}
		}
		return false
	},
	Validate: Validate,
	Wrap:     wrap,
	// A volatile overlay is gone after Close; its directory (lock file)
	// goes too. A persistent overlay is the volume's data: it stays.
	Forget: func(env backends.Env, s backends.Spec) error {
		if c, _, err := parseConfig(s); err != nil || c.Persist {
			return err
		}
		return backends.RemoveFilterDir(env, s, "cow", keyDir)
	},
}

func init() { backends.RegisterFilter(Filter) }

// Config is the cow filter's configuration.
type Config struct {
	Block   uint64
	Persist bool
	Dir     string // "" means the environment's state directory
}

// Validate checks the cow options of s beyond their kinds; Wrap runs it
// too, and a parse-time hook may.
func Validate(s backends.Spec) error {
	_, _, err := parseConfig(s)
	return err
}

func parseConfig(s backends.Spec) (Config, bool, error) {
	var c Config
	on, ok := s.Bool(keyCow)
	if !ok {
		return c, false, fmt.Errorf("option %q: invalid bool", keyCow)
	}
	if !on {
		for _, k := range []string{keyBlock, keyPersist, keyDir} {
			if _, set := s.Options[k]; set {
				return c, false, fmt.Errorf("option %q needs %s=true", k, keyCow)
			}
		}
		return c, false, nil
	}
	var err error
	if c.Block, err = backends.FilterBlock(s, keyBlock); err != nil {
		return c, false, err
	}
	if c.Persist, ok = s.Bool(keyPersist); !ok {
		return c, false, fmt.Errorf("option %q: invalid bool", keyPersist)
	}
	if c.Dir, err = backends.FilterDirOption(s, keyDir); err != nil {
		return c, false, err
	}
	return c, true, nil
}

func wrap(ctx context.Context, s backends.Spec, env backends.Env, inner backends.Device) (backends.Device, error) {
	c, on, err := parseConfig(s)
	if err != nil {
		return nil, err
	}
	if !on {
		return inner, nil
	}
	if c.Dir, err = backends.FilterDir(env, s, "cow", keyDir, c.Dir); err != nil {
		return nil, err
	}
	return Open(ctx, inner, c)
}
