package s3

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func TestParseURL(t *testing.T) {
	good := map[string]Location{
		"s3://bucket":           {Bucket: "bucket"},
		"s3://bucket/":          {Bucket: "bucket"},
		"S3://bucket/a":         {Bucket: "bucket", Prefix: "a"},
		"s3://my.bucket-1/a/b/": {Bucket: "my.bucket-1", Prefix: "a/b"},
		"s3://bkt/vol 1/ü":      {Bucket: "bkt", Prefix: "vol 1/ü"},
	}
	for in, want := range good {
		got, err := ParseURL(in)
		if err != nil || got != want {
			t.Errorf("ParseURL(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	bad := map[string]string{
		"http://bucket/x":    "does not start with s3://",
		"s3://":              "3 to 63",
		"s3://ab/x":          "3 to 63",
		"s3://-bucket/x":     "invalid character",
		"s3://buc ket/x":     "invalid character",
		"s3://bucket//x":     "segment",
		"s3://bucket/a/../b": "segment",
		"s3://bucket/a?x=1":  "query",
		"s3://bucket/a#f":    "query",
		"s3://bucket/a\x01":  "control",
	}
	for in, want := range bad {
		_, err := ParseURL(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseURL(%q) = %v; want an error containing %q", in, err, want)
		}
	}
}

// Bad specs are refused when parsed (Validate), naming the option.
func TestBadSpecsNameTheOption(t *testing.T) {
	cases := map[string]string{
		"chunk=3Mi;s3://bucket/v":                `"chunk"`,
		"chunk=128Mi;s3://bucket/v":              `"chunk"`,
		"chunk=32Ki;s3://bucket/v":               `"chunk"`,
		"size=0;s3://bucket/v":                   `"size"`,
		"endpoint=ftp://host;s3://bucket/v":      `"endpoint"`,
		"endpoint=http://u:p@host;s3://bucket/v": `"endpoint"`,
		"parallel=0;s3://bucket/v":               `"parallel"`,
		"parallel=1000;s3://bucket/v":            `"parallel"`,
		"lease-ttl=10ms;s3://bucket/v":           `"lease-ttl"`,
		"timeout=1ms;s3://bucket/v":              `"timeout"`,
		"region=a/b;s3://bucket/v":               `"region"`,
		"path-style=maybe;s3://bucket/v":         `"path-style"`,
		"bogus=1;s3://bucket/v":                  `"bogus"`,
		"size=1Gi;s3://bucket/v?versionId=3":     "query",
	}
	for spec, want := range cases {
		_, err := backends.Parse(spec)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v; want an error containing %s", spec, err, want)
		}
		if err != nil && !errors.Is(err, backends.ErrInvalidSpec) {
			t.Errorf("Parse(%q): %v is not ErrInvalidSpec", spec, err)
		}
	}
	s, err := backends.Parse("size=10Gi,chunk=4Mi,endpoint=http://127.0.0.1:9000,region=us-east-1,path-style=true;s3://bucket/prefix")
	if err != nil {
		t.Fatal(err)
	}
	// Defaults drop out of the canonical name.
	if got, want := s.String(), "chunk=4Mi,endpoint=http://127.0.0.1:9000,path-style=true,size=10Gi;s3://bucket/prefix"; got != want {
		t.Errorf("canonical %q, want %q", got, want)
	}
}

func TestDecodeMeta(t *testing.T) {
	m := meta{Format: 1, Size: 10 << 30, ChunkSize: 4 << 20, Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	got, err := decodeMeta(m.encode())
	if err != nil || got != m {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for in, want := range map[string]string{
		`{"format":2,"size":1048576,"chunkSize":65536}`:   "format version 2",
		`{"format":1,"size":1048576,"chunkSize":65535}`:   "chunk size",
		`{"format":1,"size":0,"chunkSize":65536}`:         "size",
		`{"format":1,"size":1048576,"chunkSize":65536} x`: "trailing",
		`not json`: "malformed",
	} {
		if _, err := decodeMeta([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("decodeMeta(%s) = %v; want %q", in, err, want)
		}
	}
}

func TestChunkSetNext(t *testing.T) {
	s := newChunkSet()
	for _, i := range []uint64{3, 4, 5, 63, 64, 65, 200} {
		s.set(i, true)
	}
	s.set(200, false)
	if s.count() != 6 {
		t.Fatalf("count %d", s.count())
	}
	for _, c := range []struct {
		i, end uint64
		want   bool
		next   uint64
	}{
		{0, 1000, false, 3}, {3, 1000, true, 6}, {6, 1000, false, 63}, {63, 1000, true, 66},
		{66, 1000, false, 1000}, {66, 100, false, 100}, {0, 2, false, 2}, {64, 65, true, 65},
	} {
		if got := s.next(c.i, c.end, c.want); got != c.next {
			t.Errorf("next(%d, %d, %v) = %d, want %d", c.i, c.end, c.want, got, c.next)
		}
	}
}

func FuzzParseURL(f *testing.F) {
	for _, s := range []string{"s3://bucket", "s3://bucket/a/b/", "s3://b/x", "S3://Bucket_1/..", "s3://bucket/a?b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		l, err := ParseURL(s)
		if err != nil {
			return
		}
		// The canonical form parses to the same location.
		l2, err := ParseURL(l.String())
		if err != nil || l2 != l {
			t.Fatalf("%q → %q → %+v, %v", s, l.String(), l2, err)
		}
		if strings.HasPrefix(l.Prefix, "/") || strings.HasSuffix(l.Prefix, "/") {
			t.Fatalf("%q: prefix %q", s, l.Prefix)
		}
	})
}

func FuzzDecodeMeta(f *testing.F) {
	f.Add([]byte(`{"format":1,"size":10737418240,"chunkSize":4194304,"created":"2026-01-02T03:04:05Z"}`))
	f.Add([]byte(`{"format":1,"size":1,"chunkSize":65536}`))
	f.Add([]byte(`{"format":1,"size":9223372036854775807,"chunkSize":67108864}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMeta(b)
		if err != nil {
			return
		}
		if m.Size == 0 || m.ChunkSize < minChunk || m.ChunkSize > maxChunk || m.Size > maxVolume(m.ChunkSize) {
			t.Fatalf("accepted %+v", m)
		}
		m2, err := decodeMeta(m.encode())
		if err != nil || m2.Size != m.Size || m2.ChunkSize != m.ChunkSize || !m2.Created.Equal(m.Created) {
			t.Fatalf("re-encode: %+v, %v", m2, err)
		}
	})
}

var _ = fmt.Sprint
var _ = context.Background
