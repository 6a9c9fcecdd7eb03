package backends_test

import (
	"errors"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func TestParseFormat(t *testing.T) {
	for _, tc := range []struct {
		in, canon string
		opts      map[string]string
		url       string
	}{
		{"size=1Gi;memory:", "memory:", map[string]string{}, "memory:"},
		{"size=64Mi;memory:scratch", "size=64Mi;memory:scratch", map[string]string{"size": "64Mi"}, "memory:scratch"},
		{"memory:", "memory:", map[string]string{}, "memory:"},
		{"size=1024Mi;memory:", "memory:", map[string]string{}, "memory:"},
		{"size=2048Mi;memory:x", "size=2Gi;memory:x", map[string]string{"size": "2Gi"}, "memory:x"},
		{"size=1.5Gi;memory:x", "size=1536Mi;memory:x", map[string]string{"size": "1536Mi"}, "memory:x"},
		{"MEMORY:Big", "MEMORY:Big", map[string]string{}, "MEMORY:Big"},
		// The URL after the first ';' is verbatim, ';' and '=' included.
		{"size=1Mi;memory:a;b=c?d=e,f%zz", "size=1Mi;memory:a;b=c?d=e,f%zz", map[string]string{"size": "1Mi"}, "memory:a;b=c?d=e,f%zz"},
		{"data:,hello", "data:,hello", map[string]string{}, "data:,hello"},
		{"data:;base64,aGVsbG8=", "data:;base64,aGVsbG8=", map[string]string{}, "data:;base64,aGVsbG8="},
		{"data:text/plain;charset=utf-8,a%20b", "data:text/plain;charset=utf-8,a%20b", map[string]string{}, "data:text/plain;charset=utf-8,a%20b"},
		{"size=4Ki;data:,x", "size=4Ki;data:,x", map[string]string{"size": "4Ki"}, "data:,x"},
		// Percent-encoded values; hex case and needless escapes are normalised.
		{"name=a%2cb%3Bc%25d;fake:", "name=a%2Cb%3Bc%25d;fake:", map[string]string{"name": "a,b;c%d"}, "fake:"},
		{"name=%41%0a;fake:", "name=A%0A;fake:", map[string]string{"name": "A\n"}, "fake:"},
		{"name=a=b+c;fake:", "name=a=b+c;fake:", map[string]string{"name": "a=b+c"}, "fake:"},
		{"name=;fake:", "name=;fake:", map[string]string{"name": ""}, "fake:"},
		// Every kind canonicalised, defaults dropped, keys sorted.
		{"timeout=90s,mode=b,flag=yes,count=+007,size=1024Ki;fake:", "count=7,flag=true,mode=b,timeout=1m30s;fake:",
			map[string]string{"count": "7", "flag": "true", "mode": "b", "timeout": "1m30s"}, "fake:"},
		{"timeout=30000ms,mode=a,flag=off,count=3;fake:", "fake:", map[string]string{}, "fake:"},
		{"need=x;fakereq:", "need=x;fakereq:", map[string]string{"need": "x"}, "fakereq:"},
		// Filter options go with any scheme.
		{"tst-inner=1024,size=1Gi;memory:", "tst-inner=1Ki;memory:", map[string]string{"tst-inner": "1Ki"}, "memory:"},
	} {
		s, err := backends.Parse(tc.in)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.in, err)
			continue
		}
		if !maps.Equal(s.Options, tc.opts) || s.Options == nil || s.URL != tc.url {
			t.Errorf("Parse(%q) = %#v; want options %v URL %q", tc.in, s, tc.opts, tc.url)
		}
		if got := s.String(); got != tc.canon {
			t.Errorf("Parse(%q).String() = %q; want %q", tc.in, got, tc.canon)
		}
		s2, err := backends.Parse(s.String())
		if err != nil || !maps.Equal(s2.Options, s.Options) || s2.URL != s.URL {
			t.Errorf("Parse(%q) = %#v, %v; want %#v", s.String(), s2, err, s)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "spec: empty"},
		{"size=12Q;memory:", `spec option "size": invalid size "12Q": unknown suffix "Q"`},
		{"size=;memory:", `spec option "size": invalid size "": empty`},
		{"size=-1Gi;memory:", `spec option "size": invalid size "-1Gi": negative`},
		{"sise=1;memory:", `spec: unknown option "sise" for scheme "memory" (known: size, tst-inner, tst-outer, volume)`},
		{"count=1;memory:", `spec: unknown option "count" for scheme "memory"`},
		{"size=1Gi,size=2Gi;memory:", `spec: duplicate option "size"`},
		{"size=1Gi,size=1Gi;memory:", `spec: duplicate option "size"`},
		{"size=1Gi,=x;memory:", `spec: empty option key in "=x"`},
		{"size=1Gi,;memory:", `spec: empty option in "size=1Gi,"`},
		{"size=1Gi,Foo=x;memory:", `spec: invalid option key "Foo"`},
		{"size=1Gi,ro;memory:", `spec: option "ro" has no value (want KEY=VALUE)`},
		{"size=1Gi", `spec: option prefix "size=1Gi" has no ';' before the URL`},
		{"size=1Gi;", `spec: empty URL in "size=1Gi;"`},
		{"ftp://x", `spec: unknown scheme "ftp" in "ftp://x" (known: data, fake, fakereq, `},
		{"FTP://x", `spec: unknown scheme "ftp" in "FTP://x"`},
		{"/dev/sda", `spec: no URL scheme in "/dev/sda"`},
		{"Size=1Gi;memory:", `spec: no URL scheme in "Size=1Gi;memory:"`},
		{";memory:", `spec: no URL scheme`},
		{"name=%zz;fake:", `spec option "name": invalid percent escape at byte 0 of "%zz"`},
		{"name=a%4;fake:", `spec option "name": invalid percent escape`},
		{"flag=maybe;fake:", `spec option "flag": invalid bool "maybe"`},
		{"count=1.5;fake:", `spec option "count": invalid integer "1.5"`},
		{"timeout=-1s;fake:", `spec option "timeout": invalid duration "-1s": negative`},
		{"timeout=soon;fake:", `spec option "timeout": invalid duration "soon"`},
		{"mode=d;fake:", `spec option "mode": invalid value "d" (want one of: a, b, c)`},
		{"mode=A;fake:", `spec option "mode": invalid value "A"`},
		{"fakereq:", `spec: scheme "fakereq" needs option "need"`},
		{"size=9Ei;memory:", `spec: memory: option "size": 9Ei is larger than the maximum`},
		{"data:hello", `spec: data URI has no ','`},
		{"data:;base64,aGVsbG8*", `spec: data URI: invalid base64: illegal character or truncated input at byte 7`},
		{"size=4;data:,hello", `spec: data: option "size" is 4, smaller than the 5 bytes of data`},
	} {
		_, err := backends.Parse(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) error = %v; want it to contain %q", tc.in, err, tc.want)
			continue
		}
		if !errors.Is(err, backends.ErrInvalidSpec) {
			t.Errorf("Parse(%q) error %v is not ErrInvalidSpec", tc.in, err)
		}
	}
}

// Huge URLs and values must not end up whole in error messages.
func TestParseErrorTruncates(t *testing.T) {
	huge := strings.Repeat("x", 1<<20)
	for _, in := range []string{
		"ftp://" + huge,
		"name=" + huge,
		"name=%zz" + huge + ";fake:",
		"size=" + huge + ";memory:",
		huge + "=1;memory:",
		"data:;base64," + huge + "*",
		"data:" + huge,
		"a" + huge + ":x",
		"size=1Gi," + huge + ";memory:",
		"size=1Gi," + huge + "=%zz;memory:",
		"size=1Gi," + huge + "=1," + huge + "=1;memory:",
	} {
		_, err := backends.Parse(in)
		if err == nil {
			t.Errorf("Parse(%.20q...) succeeded", in)
		} else if len(err.Error()) > 400 {
			t.Errorf("Parse(%.20q...) error is %d bytes: %.300s", in, len(err.Error()), err)
		}
	}
}

func TestSpecGetters(t *testing.T) {
	s, err := backends.Parse("count=-5,flag=1,timeout=2m,name=n%3B;fake:")
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := s.Size("size"); !ok || v != 1<<20 {
		t.Errorf("Size(size) = %d, %v; want default 1Mi", v, ok)
	}
	if v, ok := s.Int("count"); !ok || v != -5 {
		t.Errorf("Int(count) = %d, %v", v, ok)
	}
	if v, ok := s.Bool("flag"); !ok || !v {
		t.Errorf("Bool(flag) = %v, %v", v, ok)
	}
	if v, ok := s.Duration("timeout"); !ok || v != 2*time.Minute {
		t.Errorf("Duration(timeout) = %v, %v", v, ok)
	}
	if v, ok := s.Value("mode"); !ok || v != "a" {
		t.Errorf("Value(mode) = %q, %v; want default a", v, ok)
	}
	if v, ok := s.Value("name"); !ok || v != "n;" {
		t.Errorf("Value(name) = %q, %v", v, ok)
	}
	if _, ok := s.Value("tst-inner"); ok {
		t.Error("Value(tst-inner) set without option or default")
	}
	if _, ok := s.Size("nope"); ok {
		t.Error("Size(nope) ok")
	}
	if _, ok := s.Int("name"); ok {
		t.Error("Int of a string option ok")
	}
	if got := s.Scheme(); got != "fake" {
		t.Errorf("Scheme = %q", got)
	}
	if got := (backends.Spec{URL: "MeMoRy:x"}).Scheme(); got != "memory" {
		t.Errorf("Scheme = %q", got)
	}
	if got := (backends.Spec{URL: "nothing"}).Scheme(); got != "" {
		t.Errorf("Scheme = %q", got)
	}
}

// String normalises hand-built specs too.
func TestStringHandBuilt(t *testing.T) {
	for _, tc := range []struct {
		s    backends.Spec
		want string
	}{
		{backends.Spec{URL: "memory:"}, "memory:"},
		{backends.Spec{Options: map[string]string{"size": "1024Mi"}, URL: "memory:"}, "memory:"},
		{backends.Spec{Options: map[string]string{"size": "2048Mi", "tst-outer": "yes"}, URL: "memory:"}, "size=2Gi,tst-outer=true;memory:"},
		{backends.Spec{Options: map[string]string{"weird": "a,b"}, URL: "memory:"}, "weird=a%2Cb;memory:"},
	} {
		if got := tc.s.String(); got != tc.want {
			t.Errorf("%#v.String() = %q; want %q", tc.s, got, tc.want)
		}
	}
}

func FuzzParseSpec(f *testing.F) {
	for _, s := range []string{
		"size=1Gi;memory:", "memory:x", "data:,hello", "name=a%2Cb;fake:",
		"size=1.5Gi,tst-outer=on;memory:a;b", "count=1,count=2;fake:",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		s, err := backends.Parse(in)
		if err != nil {
			if !errors.Is(err, backends.ErrInvalidSpec) {
				t.Fatalf("Parse(%q) error %v is not ErrInvalidSpec", in, err)
			}
			if len(err.Error()) > 1000 {
				t.Fatalf("error too long (%d bytes): %.300s", len(err.Error()), err)
			}
			return
		}
		if s.Options == nil {
			t.Fatalf("Parse(%q): nil Options", in)
		}
		canon := s.String()
		s2, err := backends.Parse(canon)
		if err != nil {
			t.Fatalf("Parse(%q) ok but Parse(String() = %q): %v", in, canon, err)
		}
		if !maps.Equal(s.Options, s2.Options) || s.URL != s2.URL {
			t.Fatalf("round trip of %q via %q: %#v != %#v", in, canon, s, s2)
		}
		if got := s2.String(); got != canon {
			t.Fatalf("String not a fixed point: %q -> %q -> %q", in, canon, got)
		}
	})
}

func TestRedacted(t *testing.T) {
	for in, want := range map[string]string{
		"size=1Ki;memory:x":            "size=1Ki;memory:x",
		"data:,a?b":                    "data:,a?b",
		"fake://h/f.iso?X-Amz-Sig=abc": "fake://h/f.iso?X-Amz-Sig=abc",
		"fake://user:pw@h:80/f":        "fake://h:80/f",
	} {
		s, err := backends.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.Redacted(); got != want {
			t.Errorf("Redacted(%q) = %q; want %q", in, got, want)
		}
	}
}
