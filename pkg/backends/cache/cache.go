// Package cache is the cache filter: a local-disk block cache in front of
// any backend (nbdkit's cache filter, made crash-safe).
//
// Keys:
//
//	cache=writeback|writethrough|unsafe|off  (default off: no filter)
//	cache-size=1Gi      cap on cached data (LRU reclaim between watermarks)
//	cache-block=64Ki    cache granularity, a power of two >= 4Ki
//	cache-on-read=true  whether read misses are kept (else only writes are)
//	cache-dir=/abs/dir  where the cache lives (default: the state directory)
//
// The cache is a sparse data file laid out like the volume (block i at
// offset i*cache-block) plus a block map (absent, clean or dirty per block)
// kept as an append-only journal that is compacted now and then. See
// journal.go for the crash-safety argument and README "cache and cow
// filters" for the user-facing summary.
package cache

import (
	"context"
	"fmt"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// Option keys.
const (
	keyMode   = "cache"
	keySize   = "cache-size"
	keyBlock  = "cache-block"
	keyOnRead = "cache-on-read"
	keyDir    = "cache-dir"
)

// Filter is the registration; exported for documentation tools.
var Filter = backends.Filter{
	Name:  "cache",
	Order: 10,
	Options: []backends.Option{
		{Key: keyMode, Kind: backends.OptEnum, Default: "off",
			Enum: []string{"off", "writeback", "writethrough", "unsafe"},
			Doc: "Local block cache: writeback (writes acknowledged once in the local cache, written back " +
				"in the background and on FLUSH/FUA), writethrough (writes acknowledged once the backend has them), " +
				"unsafe (writeback that ignores FLUSH/FUA), off."},
		{Key: keySize, Kind: backends.OptSize, Default: "1Gi",
			Doc: "Cap on cached data; least recently used clean blocks are reclaimed above 90% down to 80%."},
		{Key: keyBlock, Kind: backends.OptSize, Default: "64Ki",
			Doc: "Cache block size, a power of two from 4Ki to 16Mi: one miss fetches one block."},
		{Key: keyOnRead, Kind: backends.OptBool, Default: "true",
			Doc: "Keep blocks fetched by read misses (false: only written blocks are cached)."},
		{Key: keyDir, Kind: backends.OptString,
			Doc: "Absolute directory for the cache files (default: a directory in the state directory named after " +
				"the backend's URL and options, so retuning filters keeps it)."},
	},
	Enabled: func(s backends.Spec) bool {
		// Defaults are dropped by Parse, so any key present is a request
		// for the filter; Wrap refuses cache-* keys with cache=off.
		for _, k := range []string{keyMode, keySize, keyBlock, keyOnRead, keyDir} {
			if _, ok := s.Options[k]; ok {
				return true
			}
		}
		return false
	},
	Validate: Validate,
	Wrap:     wrap,
	// A clean close wrote every block back: the cache files are only a
	// warm start for a later attach on this node, which a deleted volume
	// never gets.
	Forget: func(env backends.Env, s backends.Spec) error {
		return backends.RemoveFilterDir(env, s, "cache", keyDir)
	},
}

func init() { backends.RegisterFilter(Filter) }

type mode int

const (
	modeOff mode = iota
	modeWriteback
	modeWritethrough
	modeUnsafe
)

func (m mode) String() string {
	return [...]string{"off", "writeback", "writethrough", "unsafe"}[m]
}

// Config is the cache filter's configuration, decoded from a spec.
type Config struct {
	Mode   string // writeback, writethrough or unsafe
	mode   mode
	Size   uint64 // cap in bytes
	Block  uint64
	OnRead bool
	Dir    string // "" means the environment's state directory
}

// Validate checks the cache options of s beyond what their kinds check
// (block size a power of two, cap at least one block, absolute dir, no
// cache-* option with cache=off). Wrap runs it too; it is exported so a
// parse-time hook can refuse bad volumes before they are attached.
func Validate(s backends.Spec) error {
	_, err := parseConfig(s)
	return err
}

func parseConfig(s backends.Spec) (Config, error) {
	var c Config
	c.Mode, _ = s.Value(keyMode)
	var err error
	if c.mode, err = parseMode(c.Mode); err != nil {
		return c, err
	}
	if c.mode == modeOff {
		for _, k := range []string{keySize, keyBlock, keyOnRead, keyDir} {
			if _, ok := s.Options[k]; ok {
				return c, fmt.Errorf("option %q needs %s=writeback, writethrough or unsafe", k, keyMode)
			}
		}
		return c, nil
	}
	if c.Block, err = backends.FilterBlock(s, keyBlock); err != nil {
		return c, err
	}
	var ok bool
	if c.Size, ok = s.Size(keySize); !ok {
		return c, fmt.Errorf("option %q: invalid size", keySize)
	}
	if c.Size < c.Block {
		return c, fmt.Errorf("option %q: %s is smaller than one %s=%s", keySize,
			backends.FormatSize(c.Size), keyBlock, backends.FormatSize(c.Block))
	}
	if c.OnRead, ok = s.Bool(keyOnRead); !ok {
		return c, fmt.Errorf("option %q: invalid bool", keyOnRead)
	}
	c.Dir, err = backends.FilterDirOption(s, keyDir)
	return c, err
}

func parseMode(v string) (mode, error) {
	switch v {
	case "off", "":
		return modeOff, nil
	case "writeback":
		return modeWriteback, nil
	case "writethrough":
		return modeWritethrough, nil
	case "unsafe":
		return modeUnsafe, nil
	}
	return modeOff, fmt.Errorf("option %q: invalid value %q", keyMode, v)
}

func wrap(ctx context.Context, s backends.Spec, env backends.Env, inner backends.Device) (backends.Device, error) {
	c, err := parseConfig(s)
	if err != nil {
		return nil, err
	}
	if c.mode == modeOff {
		return inner, nil // Enabled saw no option: nothing to do
	}
	if c.Dir, err = backends.FilterDir(env, s, "cache", keyDir, c.Dir); err != nil {
		return nil, err
	}
	return Open(ctx, inner, c)
}
