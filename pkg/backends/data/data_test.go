package data

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"net/url"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

var ctx = context.Background()

// bootSector is the start of a tiny x86 boot sector (mov ax,0x13; int 0x10; cld ...).
var bootSector = []byte{0xb8, 0x13, 0x00, 0xcd, 0x10, 0xfc}

func TestDecode(t *testing.T) {
	for _, tc := range []struct {
		uri  string
		want []byte
	}{
		{"data:,hello", []byte("hello")},
		{"DATA:,hello", []byte("hello")},
		{"data:,", nil},
		{"data:;base64,", nil},
		{"data:;base64,uBMAzRD8", bootSector},
		{"data:application/octet-stream;base64,uBMAzRD8", bootSector},
		{"data:;base64,aGVsbG8=", []byte("hello")},
		{"data:;BASE64,aGVsbG8", []byte("hello")},       // unpadded
		{"data:;base64,aGVsbG8%3D", []byte("hello")},    // percent-encoded padding
		{"data:;base64,-_-_", []byte{0xfb, 0xff, 0xbf}}, // URL-safe
		{"data:;base64,+/+/", []byte{0xfb, 0xff, 0xbf}}, // standard
		{"data:;base64,-_8", []byte{0xfb, 0xff}},        // URL-safe unpadded
		{"data:text/plain;charset=utf-8,a%20b", []byte("a b")},
		{"data:,a+b%2C%2c,c", []byte("a+b,,,c")},
		{"data:text/plain;base64x,abc", []byte("abc")}, // not ";base64"
		{"data:,%00%FF", []byte{0, 0xff}},
	} {
		got, err := Decode(tc.uri)
		if err != nil || !bytes.Equal(got, tc.want) {
			t.Errorf("Decode(%q) = %q, %v; want %q", tc.uri, got, err, tc.want)
		}
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct{ uri, want string }{
		{"memory:", "not a data: URI"},
		{"data:hello", "no ','"},
		{"data:,%4", "invalid percent escape at byte 0"},
		{"data:,ab%zz", "invalid percent escape at byte 2"},
		{"data:;base64,aGVsbG8*", "invalid base64: illegal character or truncated input at byte 7"},
		{"data:;base64,a", "invalid base64"},
		{"data:;base64,aGVsbG8==", "invalid base64"},
		{"data:;base64,aG=sbG8", "invalid base64"},
		{"data:;base64,+_", "mixes the standard (+/) and URL-safe (-_) alphabets"},
	} {
		_, err := Decode(tc.uri)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%q) error = %v; want it to contain %q", tc.uri, err, tc.want)
		}
	}
}

func open(t *testing.T, spec string) backends.Device {
	t.Helper()
	s, err := backends.Parse(spec)
	if err != nil {
		t.Fatal(err)
	}
	d, err := backends.Open(ctx, s, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestDevice(t *testing.T) {
	d := open(t, "size=16;data:,hello")
	if d.Size() != 16 {
		t.Fatalf("size %d", d.Size())
	}
	c := d.Caps()
	if !c.ReadOnly || !c.Extents || !c.MultiConn || c.Trim || c.Zero {
		t.Errorf("caps %+v", c)
	}
	got := bytes.Repeat([]byte{0xEE}, 8)
	if err := d.ReadAt(ctx, got, 2); err != nil || string(got) != "llo\x00\x00\x00\x00\x00" {
		t.Errorf("ReadAt = %q, %v", got, err)
	}
	got = bytes.Repeat([]byte{0xEE}, 4)
	if err := d.ReadAt(ctx, got, 12); err != nil || !bytes.Equal(got, make([]byte, 4)) {
		t.Errorf("ReadAt padding = %q, %v", got, err)
	}
	if err := d.ReadAt(ctx, got, 14); !errors.Is(err, backends.ErrInvalid) {
		t.Errorf("ReadAt past end: %v", err)
	}
	for _, err := range []error{
		d.WriteAt(ctx, []byte("x"), 0, false),
		d.Trim(ctx, 0, 1, false),
		d.Zero(ctx, 0, 1, 0),
	} {
		if !errors.Is(err, backends.ErrReadOnly) {
			t.Errorf("write op error = %v; want ErrReadOnly", err)
		}
	}
	const hole = backends.ExtentHole | backends.ExtentZero
	for _, tc := range []struct {
		off, n uint64
		want   []backends.Extent
	}{
		{0, 16, []backends.Extent{{Length: 5}, {Length: 11, Flags: hole}}},
		{1, 3, []backends.Extent{{Length: 3}}},
		{4, 3, []backends.Extent{{Length: 1}, {Length: 2, Flags: hole}}},
		{5, 11, []backends.Extent{{Length: 11, Flags: hole}}},
		{16, 0, nil},
	} {
		var got []backends.Extent
		if err := d.Extents(ctx, tc.off, tc.n, func(e backends.Extent) { got = append(got, e) }); err != nil {
			t.Fatal(err)
		}
		if len(got) != len(tc.want) {
			t.Errorf("Extents(%d, %d) = %v; want %v", tc.off, tc.n, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("Extents(%d, %d) = %v; want %v", tc.off, tc.n, got, tc.want)
			}
		}
	}
	if err := d.Flush(ctx); err != nil {
		t.Error(err)
	}
	if err := d.Close(); err != nil {
		t.Error(err)
	}
}

func TestEmpty(t *testing.T) {
	d := open(t, "data:,")
	if d.Size() != 0 {
		t.Errorf("size %d", d.Size())
	}
	if err := d.ReadAt(ctx, nil, 0); err != nil {
		t.Error(err)
	}
	if d := open(t, "size=1Ki;data:,"); d.Size() != 1024 {
		t.Errorf("padded size %d", d.Size())
	}
}

func TestSizeTooSmall(t *testing.T) {
	_, err := backends.Parse("size=4;data:,hello")
	if err == nil || !strings.Contains(err.Error(), `option "size"`) {
		t.Errorf("error = %v; want one naming option size", err)
	}
	// Open checks too, for specs that skipped Parse.
	_, err = backends.Open(ctx, backends.Spec{Options: map[string]string{"size": "4"}, URL: "data:,hello"}, backends.Env{})
	if err == nil || !strings.Contains(err.Error(), `option "size"`) {
		t.Errorf("Open error = %v; want one naming option size", err)
	}
}

// FuzzDataURI checks Decode never panics, that what Parse accepts opens
// and reads back the decoded bytes, and that both encodings round-trip
// the fuzzed bytes.
func FuzzDataURI(f *testing.F) {
	for _, s := range []string{"data:,hello", "data:;base64,uBMAzRD8", "data:;base64,-_8", "data:,%zz", "data:x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		b, err := Decode(in)
		if err == nil {
			s, perr := backends.Parse(in)
			if perr != nil {
				t.Fatalf("Decode(%q) ok but Parse: %v", in, perr)
			}
			d, oerr := backends.Open(ctx, s, backends.Env{})
			if oerr != nil {
				t.Fatalf("Open(%q): %v", in, oerr)
			}
			got := make([]byte, d.Size())
			if d.Size() != uint64(len(b)) || d.ReadAt(ctx, got, 0) != nil || !bytes.Equal(got, b) {
				t.Fatalf("device for %q reads %q; want %q", in, got, b)
			}
		} else if len(err.Error()) > 300 {
			t.Fatalf("error too long: %.300s", err)
		}
		raw := []byte(in)
		for _, uri := range []string{
			"data:;base64," + base64.StdEncoding.EncodeToString(raw),
			"data:;base64," + base64.RawURLEncoding.EncodeToString(raw),
			"data:application/octet-stream," + url.PathEscape(in),
		} {
			got, err := Decode(uri)
			if err != nil || !bytes.Equal(got, raw) {
				t.Fatalf("Decode(%q) = %q, %v; want %q", uri, got, err, raw)
			}
		}
	})
}
