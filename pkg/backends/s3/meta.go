package s3

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// formatVersion is the layout version in meta.json. A reader refuses
// versions it does not know rather than guess at their layout.
const formatVersion = 1

const (
	metaName  = "meta.json"
	leaseName = "lease"
	chunkDir  = "chunks/"
)

// meta is the volume's metadata object, PREFIX/meta.json.
type meta struct {
	Format    int       `json:"format"`
	Size      uint64    `json:"size"`
	ChunkSize uint64    `json:"chunkSize"`
	Created   time.Time `json:"created"`
}

// decodeMeta parses and checks a metadata object.
func decodeMeta(b []byte) (meta, error) {
	var m meta
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&m); err != nil {
		return meta{}, fmt.Errorf("s3: malformed %s: %w", metaName, err)
	}
	if dec.More() {
		return meta{}, fmt.Errorf("s3: malformed %s: trailing data", metaName)
	}
	if m.Format != formatVersion {
		return meta{}, fmt.Errorf("s3: %s has format version %d; this csi-nbd reads version %d", metaName, m.Format, formatVersion)
	}
	if m.ChunkSize < minChunk || m.ChunkSize > maxChunk || bits.OnesCount64(m.ChunkSize) != 1 {
		return meta{}, fmt.Errorf("s3: %s: invalid chunk size %d", metaName, m.ChunkSize)
	}
	if m.Size == 0 || m.Size > maxVolume(m.ChunkSize) {
		return meta{}, fmt.Errorf("s3: %s: invalid size %d", metaName, m.Size)
	}
	return m, nil
}

func (m meta) encode() []byte {
	b, err := json.Marshal(m)
	if err != nil {
		panic(err) // plain fields: cannot fail
	}
	return append(b, '\n')
}

// readMeta returns the volume's metadata and its ETag, or ErrNotFound.
func (b *bucket) readMeta(ctx context.Context) (meta, string, error) {
	body, etag, err := b.getSmall(ctx, b.loc.key(metaName))
	if errors.Is(err, errNoObject) {
		return meta{}, "", fmt.Errorf("%w: no %s at %s", ErrNotFound, metaName, b.loc)
	}
	if err != nil {
		return meta{}, "", err
	}
	m, err := decodeMeta(body)
	if err != nil {
		return meta{}, "", fmt.Errorf("%s: %w", b.loc, err)
	}
	return m, etag, nil
}

// createMeta writes new metadata for c unless some already exists (a
// conditional create, so two racing creators cannot both win). It returns
// the metadata now in the bucket and whether this call wrote it.
func (b *bucket) createMeta(ctx context.Context, c *config) (meta, bool, error) {
	if c.size == 0 {
		return meta{}, false, fmt.Errorf("s3: %s has no volume yet and option %q is needed to create one", c.loc, "size")
	}
	m := meta{Format: formatVersion, Size: c.size, ChunkSize: c.newChunk(), Created: time.Now().UTC().Truncate(time.Second)}
	_, err := b.put(ctx, b.loc.key(metaName), m.encode(), cond{ifNoneMatch: true})
	if errors.Is(err, errPrecondition) {
		m, _, err := b.readMeta(ctx)
		return m, false, err
	}
	if err != nil {
		return meta{}, false, err
	}
	return m, true, nil
}

// check compares existing metadata with what c asks for. A smaller or
// absent size is fine (the metadata's size wins: the volume may have been
// expanded since the spec was written); anything else that differs is
// ErrExists-wrapped, naming the option.
func (m meta) check(c *config) error {
	if c.chunk != 0 && m.ChunkSize != c.chunk {
		return fmt.Errorf("%w: %s has chunk size %s, the spec says option %q = %s (fixed at creation)",
			ErrExists, c.loc, backends.FormatSize(m.ChunkSize), "chunk", backends.FormatSize(c.chunk))
	}
	if c.size > m.Size {
		return fmt.Errorf("%w: %s has size %s, smaller than option %q = %s (expand the volume instead)",
			ErrExists, c.loc, backends.FormatSize(m.Size), "size", backends.FormatSize(c.size))
	}
	return nil
}
