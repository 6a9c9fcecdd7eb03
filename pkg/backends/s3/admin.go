package s3

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// The volume lifecycle for the CSI controller (issue #6). Each call is
// idempotent, so a retried CreateVolume, DeleteVolume, expansion or
// snapshot converges. Errors match ErrExists, ErrNotFound, ErrLeased or
// ErrNoBucket (errors.Is) where those apply.

// Create writes the volume's metadata if there is none (option size is
// required). An existing volume with the same size and chunk size is
// success; one with any other is ErrExists.
func Create(ctx context.Context, spec backends.Spec, env backends.Env) error {
	c, b, err := admin(ctx, spec, env)
	if err != nil {
		return err
	}
	m, _, err := b.createMeta(ctx, c)
	if err != nil {
		return err
	}
	if m.ChunkSize != c.newChunk() || m.Size != c.size {
		return fmt.Errorf("%w: %s has size %s and chunk %s, not size %s and chunk %s",
			ErrExists, c.loc, backends.FormatSize(m.Size), backends.FormatSize(m.ChunkSize),
			backends.FormatSize(c.size), backends.FormatSize(c.newChunk()))
	}
	return nil
}

// Delete removes every object of the volume (chunks, metadata, lease).
// A volume that is already gone, or whose bucket is, is success. It
// refuses (ErrLeased) while another owner than env.Owner holds an
// unexpired lease: the volume is still in use somewhere.
func Delete(ctx context.Context, spec backends.Spec, env backends.Env) error {
	c, b, err := admin(ctx, spec, env)
	if err != nil {
		return err
	}
	if err := checkNotLeased(ctx, b, env.Owner); err != nil {
		if errors.Is(err, ErrNoBucket) {
			return nil
		}
		return err
	}
	var keys []string
	err = b.list(ctx, c.loc.key(chunkDir), func(k string) error {
		keys = append(keys, k)
		return nil
	})
	if errors.Is(err, ErrNoBucket) {
		return nil
	}
	if err != nil {
		return err
	}
	// Chunks first, metadata last: a half-done delete still looks
	// like a volume, and the retry finishes it.
	if err := deleteAll(ctx, b, c.parallel, keys); err != nil {
		return err
	}
	if err := b.del(ctx, c.loc.key(metaName), cond{}); err != nil {
		return err
	}
	return b.del(ctx, c.loc.key(leaseName), cond{})
}

// checkNotLeased fails with ErrLeased if someone other than owner holds
// an unexpired lease on b's volume.
func checkNotLeased(ctx context.Context, b *bucket, owner string) error {
	body, _, err := b.getSmall(ctx, b.loc.key(leaseName))
	if errors.Is(err, errNoObject) {
		return nil
	}
	if err != nil {
		return err
	}
	var h leaseBody
	if json.Unmarshal(body, &h) == nil && h.Owner != owner && time.Now().Before(h.Expires) {
		return fmt.Errorf("%w: %s is in use by %q (lease until %s): %w",
			ErrLeased, b.loc, h.Owner, h.Expires.Format(time.RFC3339), syscall.EBUSY)
	}
	return nil
}

func deleteAll(ctx context.Context, b *bucket, parallel int, keys []string) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(parallel)
	for _, k := range keys {
		g.Go(func() error { return b.del(gctx, k, cond{}) })
	}
	return g.Wait()
}

// Exists reports whether the volume's metadata object is there (a missing
// bucket means no volume).
func Exists(ctx context.Context, spec backends.Spec, env backends.Env) (bool, error) {
	_, b, err := admin(ctx, spec, env)
	if err != nil {
		return false, err
	}
	_, _, err = b.readMeta(ctx)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrNoBucket):
		return false, nil
	}
	return false, err
}

// Expand grows the volume's metadata to newSize. A volume already that
// large is success; shrinking is refused (EINVAL). Devices open on it
// take the new size through backends.Resize.
func Expand(ctx context.Context, spec backends.Spec, env backends.Env, newSize uint64) error {
	c, b, err := admin(ctx, spec, env)
	if err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		m, etag, err := b.readMeta(ctx)
		if err != nil {
			return err
		}
		if newSize < m.Size {
			return fmt.Errorf("s3: expand %s to %d bytes: it has %d already and cannot shrink: %w", c.loc, newSize, m.Size, backends.ErrInvalid)
		}
		if newSize == m.Size {
			return nil
		}
		if newSize > maxVolume(m.ChunkSize) {
			return fmt.Errorf("s3: expand %s to %d bytes: larger than the maximum %d: %w", c.loc, newSize, maxVolume(m.ChunkSize), backends.ErrInvalid)
		}
		m.Size = newSize
		_, err = b.put(ctx, b.loc.key(metaName), m.encode(), cond{ifMatch: etag})
		if errors.Is(err, errPrecondition) && attempt < 3 {
			continue
		}
		return err
	}
}

// Snapshot copies volume src, server-side, to a new volume at dstPrefix in
// the same bucket: every chunk object, then the metadata (last, so a
// half-made snapshot is not a volume). It holds what is in the bucket: a
// writer's unflushed data is not in it (freeze or flush first for a
// consistent file system). An existing snapshot with the same size and
// chunk size is success (a retry); another is ErrExists.
func Snapshot(ctx context.Context, src backends.Spec, dstPrefix string, env backends.Env) error {
	loc, err := ParseURL(src.URL)
	if err != nil {
		return err
	}
	dstLoc, err := ParseURL(Location{Bucket: loc.Bucket, Prefix: strings.Trim(dstPrefix, "/")}.String())
	if err != nil {
		return err
	}
	if dstLoc.Prefix == loc.Prefix {
		return fmt.Errorf("s3: snapshot of %s onto itself: %w", loc, backends.ErrInvalid)
	}
	dst := backends.Spec{Options: maps.Clone(src.Options), URL: dstLoc.String()}
	delete(dst.Options, "size")
	delete(dst.Options, "readonly")
	return CopyFrom(ctx, dst, src, env)
}

// CopyFrom makes volume dst a server-side copy of volume src (a snapshot
// or another volume): chunks first, metadata last. Both must be on one
// endpoint and have one chunk size; dst's size, if given, must be at
// least src's and becomes the new volume's size. An existing dst with the
// expected size and chunk size is success (a retry); another is
// ErrExists.
func CopyFrom(ctx context.Context, dst, src backends.Spec, env backends.Env) error {
	dc, db, err := admin(ctx, dst, env)
	if err != nil {
		return err
	}
	sc, sb, err := admin(ctx, src, env)
	if err != nil {
		return err
	}
	if dc.endpoint != sc.endpoint || dc.region != sc.region {
		return fmt.Errorf("s3: copy %s to %s: server-side copy needs one endpoint and region (options %q, %q): %w",
			sc.loc, dc.loc, "endpoint", "region", backends.ErrInvalid)
	}
	if dc.loc == sc.loc {
		return fmt.Errorf("s3: copy of %s onto itself: %w", sc.loc, backends.ErrInvalid)
	}
	sm, _, err := sb.readMeta(ctx)
	if err != nil {
		return fmt.Errorf("s3: copy source: %w", err)
	}
	if dc.chunk != 0 && dc.chunk != sm.ChunkSize {
		return fmt.Errorf("s3: copy %s to %s: option %q is %s, the source has %s (chunks are copied as they are)",
			sc.loc, dc.loc, "chunk", backends.FormatSize(dc.chunk), backends.FormatSize(sm.ChunkSize))
	}
	want := meta{Format: formatVersion, Size: max(dc.size, sm.Size), ChunkSize: sm.ChunkSize}
	if dc.size != 0 && dc.size < sm.Size {
		return fmt.Errorf("s3: copy %s to %s: option %q is %s, smaller than the source's %s",
			sc.loc, dc.loc, "size", backends.FormatSize(dc.size), backends.FormatSize(sm.Size))
	}
	dm, _, err := db.readMeta(ctx)
	switch {
	case err == nil && dm.Size == want.Size && dm.ChunkSize == want.ChunkSize:
		return nil // done by an earlier call
	case err == nil:
		return fmt.Errorf("%w: %s has size %s and chunk %s", ErrExists, dc.loc,
			backends.FormatSize(dm.Size), backends.FormatSize(dm.ChunkSize))
	case !errors.Is(err, ErrNotFound):
		return err
	}

	srcKeys := map[string]bool{}
	sprefix, dprefix := sc.loc.key(chunkDir), dc.loc.key(chunkDir)
	err = sb.list(ctx, sprefix, func(k string) error {
		if _, ok := parseChunkKey(strings.TrimPrefix(k, sprefix)); ok {
			srcKeys[strings.TrimPrefix(k, sprefix)] = true
		}
		return nil
	})
	if err != nil {
		return err
	}
	// Chunks a failed earlier attempt left that the source no longer has.
	var stale []string
	err = db.list(ctx, dprefix, func(k string) error {
		if !srcKeys[strings.TrimPrefix(k, dprefix)] {
			stale = append(stale, k)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := deleteAll(ctx, db, dc.parallel, stale); err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(dc.parallel)
	for name := range srcKeys {
		g.Go(func() error { return db.copyObject(gctx, sc.loc.Bucket, sprefix+name, dprefix+name) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	want.Created = time.Now().UTC().Truncate(time.Second)
	_, err = db.put(ctx, dc.loc.key(metaName), want.encode(), cond{ifNoneMatch: true})
	if errors.Is(err, errPrecondition) {
		return fmt.Errorf("%w: %s was created while copying into it", ErrExists, dc.loc)
	}
	return err
}

// admin checks spec and builds its client.
func admin(ctx context.Context, spec backends.Spec, env backends.Env) (*config, *bucket, error) {
	c, err := parseConfig(spec)
	if err != nil {
		return nil, nil, err
	}
	b, err := newBucket(ctx, c, env)
	if err != nil {
		return nil, nil, err
	}
	return c, b, nil
}
