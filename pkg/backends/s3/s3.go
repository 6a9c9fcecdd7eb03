// Package s3 is the s3: backend, a read-write volume stored as fixed-size
// chunk objects in an S3 bucket (like s3backer):
//
//	size=10Gi,chunk=4Mi,endpoint=http://127.0.0.1:9000,path-style=true;s3://bucket/prefix
//
// Layout under the prefix (see README "S3 volumes"):
//
//	PREFIX/meta.json          format version, size, chunk size, creation time
//	PREFIX/lease              the writer's lease: owner and expiry (JSON)
//	PREFIX/chunks/%016x       chunk N's bytes; absent means all zeros
//
// A chunk that is all zeros is never stored: writing zeros, Zero and Trim
// delete its object, and a missing object reads as zeros, so an empty
// volume costs one small object whatever its size.
//
// Writes go to an in-memory write-back buffer of whole chunks (option
// writeback, default 64Mi; 0 makes every write synchronous). A chunk is
// uploaded as soon as it has been written over completely, after at most
// a second otherwise, and always before FLUSH, a FUA write or Close
// returns, so FLUSH and FUA mean "in the bucket". Uploads that fail stay
// buffered and are retried; FLUSH reports the failure.
//
// aws-sdk-go-v2 is the S3 client: it is AWS's own, speaks to S3-compatible
// servers (custom endpoint, path-style addressing) and brings the standard
// credential chain (environment, shared config, IMDS, web identity) for
// when no secrets are given.
package s3

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"net/url"
	"strings"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// Chunk size bounds: below 64 KiB the per-object overhead dominates; above
// 64 MiB a small write's read-modify-write moves too much.
const (
	minChunk = 64 << 10
	maxChunk = 64 << 20
)

// Options is the option table (exported for the CSI controller's docs).
var Options = []backends.Option{
	{Key: "size", Kind: backends.OptSize,
		Doc: "Volume size; required to create a volume, optional when opening one (the metadata's size wins; a larger size is an error)."},
	{Key: "chunk", Kind: backends.OptSize,
		Doc: "Chunk object size, a power of two from 64Ki to 64Mi, fixed at creation (default 4Mi); when given, opening checks it against the volume's."},
	{Key: "endpoint", Kind: backends.OptString,
		Doc: "S3 endpoint URL (http:// or https://); default: AWS for the region."},
	{Key: "ca", Kind: backends.OptString,
		Doc: "PEM file of CA certificates trusted for an https endpoint besides the system's."},
	{Key: "region", Kind: backends.OptString, Default: "us-east-1",
		Doc: "Region used for request signing."},
	{Key: "path-style", Kind: backends.OptBool, Default: "false",
		Doc: "Path-style addressing (endpoint/bucket/key), needed by most S3-compatible servers."},
	{Key: "readonly", Kind: backends.OptBool, Default: "false",
		Doc: "Open read-only: no lease is taken, writes fail with EPERM."},
	{Key: "lease-ttl", Kind: backends.OptDuration, Default: "1m0s",
		Doc: "How long a writer's lease lasts without renewal (renewed every third of it); 0 disables the lease (unsafe with two writers)."},
	{Key: "writeback", Kind: backends.OptSize, Default: "64Mi",
		Doc: "Memory for written chunks not yet uploaded; FLUSH and FUA still wait for the bucket. 0 uploads every write before acknowledging it."},
	{Key: "parallel", Kind: backends.OptInt, Default: "16",
		Doc: "Requests to the bucket in flight at once (1 to 256)."},
	{Key: "timeout", Kind: backends.OptDuration, Default: "30s",
		Doc: "Time limit for each S3 operation, retries included."},
}

func init() {
	backends.Register(backends.Backend{
		Scheme:  "s3",
		Doc:     "Read-write volume stored as chunk objects in an S3 bucket: s3://BUCKET/PREFIX. Credentials: secrets access-key-id, secret-access-key, session-token, else the AWS environment/credential chain.",
		Options: Options,
		Validate: func(s backends.Spec) error {
			_, err := parseConfig(s)
			return err
		},
		Open: func(ctx context.Context, s backends.Spec, env backends.Env) (backends.Device, error) {
			d, err := Open(ctx, s, env)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			return d, nil
		},
	})
}

// config is a spec's settings, checked.
type config struct {
	loc       Location
	size      uint64 // 0: not given
	chunk     uint64 // 0: not given (an existing volume's, or defaultChunk)
	endpoint  string
	ca        string // CA bundle path
	region    string
	pathStyle bool
	readOnly  bool
	leaseTTL  time.Duration
	writeback uint64
	parallel  int
	timeout   time.Duration
}

// parseConfig checks every option of s, naming the bad one.
func parseConfig(s backends.Spec) (*config, error) {
	if s.Scheme() != "s3" {
		return nil, fmt.Errorf("s3: not an s3: URL: %q", s.URL)
	}
	loc, err := ParseURL(s.URL)
	if err != nil {
		return nil, err
	}
	c := &config{loc: loc}
	c.size, _ = s.Size("size")
	if _, given := s.Options["size"]; given && c.size == 0 {
		return nil, fmt.Errorf("s3: option %q: must be more than 0", "size")
	}
	c.chunk, _ = s.Size("chunk")
	if _, given := s.Options["chunk"]; given && (c.chunk < minChunk || c.chunk > maxChunk || bits.OnesCount64(c.chunk) != 1) {
		return nil, fmt.Errorf("s3: option %q: %s is not a power of two from %s to %s", "chunk",
			backends.FormatSize(c.chunk), backends.FormatSize(minChunk), backends.FormatSize(maxChunk))
	}
	if c.size > 0 && c.size > maxVolume(c.newChunk()) {
		return nil, fmt.Errorf("s3: option %q: %s is larger than the maximum %s", "size",
			backends.FormatSize(c.size), backends.FormatSize(maxVolume(c.newChunk())))
	}
	if ep, ok := s.Value("endpoint"); ok {
		u, err := url.Parse(ep)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
			return nil, fmt.Errorf("s3: option %q: %q is not an http:// or https:// URL without credentials", "endpoint", ep)
		}
		c.endpoint = ep
	}
	c.ca, _ = s.Value("ca")
	c.region, _ = s.Value("region")
	if c.region == "" || strings.ContainsAny(c.region, "/ \t\n") {
		return nil, fmt.Errorf("s3: option %q: invalid region %q", "region", c.region)
	}
	c.pathStyle, _ = s.Bool("path-style")
	c.readOnly, _ = s.Bool("readonly")
	c.leaseTTL, _ = s.Duration("lease-ttl")
	if c.leaseTTL != 0 && c.leaseTTL < time.Second {
		return nil, fmt.Errorf("s3: option %q: %s is shorter than 1s (0 disables the lease)", "lease-ttl", c.leaseTTL)
	}
	c.writeback, _ = s.Size("writeback")
	p, _ := s.Int("parallel")
	if p < 1 || p > 256 {
		return nil, fmt.Errorf("s3: option %q: %d is not from 1 to 256", "parallel", p)
	}
	c.parallel = int(p)
	c.timeout, _ = s.Duration("timeout")
	if c.timeout < 100*time.Millisecond {
		return nil, fmt.Errorf("s3: option %q: %s is shorter than 100ms", "timeout", c.timeout)
	}
	return c, nil
}

// defaultChunk is the chunk size of volumes created without option chunk.
const defaultChunk = 4 << 20

// newChunk is the chunk size a volume created from c gets.
func (c *config) newChunk() uint64 {
	if c.chunk == 0 {
		return defaultChunk
	}
	return c.chunk
}

// maxVolume keeps chunk indexes within 16 hex digits and sizes within
// NBD's signed 64 bits.
func maxVolume(chunk uint64) uint64 {
	return (1<<63 - 1) &^ (chunk - 1)
}

// Location is where a volume lives: a bucket and a key prefix.
type Location struct {
	Bucket string
	Prefix string // without leading or trailing '/'; "" is the bucket's root
}

// String is the s3:// URL of l.
func (l Location) String() string {
	if l.Prefix == "" {
		return "s3://" + l.Bucket
	}
	return "s3://" + l.Bucket + "/" + l.Prefix
}

// key returns the object key of name under l's prefix.
func (l Location) key(name string) string {
	if l.Prefix == "" {
		return name
	}
	return l.Prefix + "/" + name
}

// ParseURL parses s3://BUCKET[/PREFIX]. The prefix is kept as written
// (minus a trailing '/'), but empty, "." and ".." path segments, query
// strings, fragments and control characters are refused: they would make
// two spellings name one volume, or a key no server stores faithfully.
func ParseURL(raw string) (Location, error) {
	rest, ok := cutPrefixFold(raw, "s3://")
	if !ok {
		return Location{}, fmt.Errorf("s3: URL %q does not start with s3://", raw)
	}
	if strings.ContainsAny(rest, "?#") {
		return Location{}, fmt.Errorf("s3: URL %q: query strings and fragments are not allowed", raw)
	}
	for _, r := range rest {
		if r < 0x20 || r == 0x7f {
			return Location{}, fmt.Errorf("s3: URL %q: control character", raw)
		}
	}
	bucket, prefix, _ := strings.Cut(rest, "/")
	if err := checkBucket(bucket); err != nil {
		return Location{}, fmt.Errorf("s3: URL %q: %w", raw, err)
	}
	prefix = strings.TrimSuffix(prefix, "/")
	if prefix != "" {
		for _, seg := range strings.Split(prefix, "/") {
			if seg == "" || seg == "." || seg == ".." {
				return Location{}, fmt.Errorf("s3: URL %q: empty, \".\" or \"..\" segment in the prefix", raw)
			}
		}
	}
	if len(prefix) > 900 {
		return Location{}, fmt.Errorf("s3: URL %q: prefix longer than 900 bytes", raw)
	}
	return Location{Bucket: bucket, Prefix: prefix}, nil
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) < len(prefix) || !strings.EqualFold(s[:len(prefix)], prefix) {
		return s, false
	}
	return s[len(prefix):], true
}

// checkBucket accepts the S3 bucket naming rules' character set and
// length, plus upper case and '_' that some S3-compatible servers allow.
func checkBucket(b string) error {
	if len(b) < 3 || len(b) > 63 {
		return fmt.Errorf("bucket name %q must be 3 to 63 characters", b)
	}
	for i := 0; i < len(b); i++ {
		c := b[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case (c == '.' || c == '-' || c == '_') && i > 0 && i < len(b)-1:
		default:
			return fmt.Errorf("bucket name %q: invalid character %q", b, c)
		}
	}
	return nil
}

// Errors the CSI controller maps onto status codes (errors.Is).
var (
	// ErrExists: a volume already exists at the location with other
	// parameters (codes.AlreadyExists).
	ErrExists = errors.New("s3: a volume with other parameters exists there")
	// ErrNotFound: no volume (no metadata object) at the location.
	ErrNotFound = errors.New("s3: no volume there")
	// ErrLeased: another writer holds the volume's lease.
	ErrLeased = errors.New("s3: volume is leased to another writer")
	// ErrNoBucket: the bucket does not exist.
	ErrNoBucket = errors.New("s3: no such bucket")
)
