package httpdev

import (
	"fmt"
	"strings"
	"testing"
)

func FuzzContentRange(f *testing.F) {
	for _, s := range []string{
		"bytes 0-0/1", "bytes 0-4095/10000", "bytes */0", "bytes 5-9/*", "bytes */*",
		"Bytes 1-1/2", "bytes 9-5/10", "bytes 0-10/10", "bytes -1-2/3", "bytes 0-1/ 3",
		"bytes 0-9223372036854775807/*", "bytes 0-99999999999999999999/*", "items 0-1/2", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		cr, err := parseContentRange(s)
		if err != nil {
			if len(err.Error()) > 300 {
				t.Fatalf("error too long (%d bytes) for %q", len(err.Error()), s)
			}
			return
		}
		// What is accepted is consistent and prints back to itself.
		if cr.first < 0 && (cr.last >= 0 || cr.total < 0) || cr.first > cr.last || cr.total >= 0 && cr.last >= cr.total {
			t.Fatalf("%q parsed as inconsistent %+v", s, cr)
		}
		rng, tot := "*", "*"
		if cr.first >= 0 {
			rng = fmt.Sprintf("%d-%d", cr.first, cr.last)
		}
		if cr.total >= 0 {
			tot = fmt.Sprint(cr.total)
		}
		again, err := parseContentRange("bytes " + rng + "/" + tot)
		if err != nil || again != cr {
			t.Fatalf("%q parsed as %+v, which reparses as %+v, %v", s, cr, again, err)
		}
	})
}

// Everything parseHeaderSecret's errors can say besides the secret's name
// and line numbers: a secret's value must never appear in them.
const headerErrorTexts = `secret "s" is empty: an Authorization value must be one line (or give "Header: value" lines)` +
	` Authorization value holds control characters line is not "Header: value" value holds control characters that header is the backend's own`

func FuzzHeaderSecret(f *testing.F) {
	for _, s := range []string{
		"Bearer abc", "Basic dXNlcjpwYXNz", "X-Api-Key: abc", "X-A: 1\nX-B: 2\n", "X-A: 1\r\nX-B: 2\r\n",
		"Bearer a\nb", "X-A: 1\nbad line", "Range: bytes=0-1", "X-A: \x01", "", "\n", ":x", "a b: c",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		hs, err := parseHeaderSecret("s", v)
		if err != nil {
			if len(v) >= 6 && !strings.Contains(headerErrorTexts, v) && strings.Contains(err.Error(), v) {
				t.Fatalf("error shows the secret: %v", err)
			}
			return
		}
		if len(hs) == 0 {
			t.Fatalf("%q: no headers and no error", v)
		}
		for _, h := range hs {
			if !isToken(h[0]) || !validValue(h[1]) || strings.ContainsAny(h[1], "\r\n") {
				t.Fatalf("%q: bad header %q", v, h)
			}
		}
	})
}

func FuzzRedact(f *testing.F) {
	for _, s := range []string{
		"https://h/p?sig=x", "http://u:p@h/p", "https://h/p#frag?x", "http://h", "http://a@b@c/d?e", "noscheme?q",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r := Redact(s)
		// The marker that replaces a query is no part of it, even where
		// its bytes begin like the query's ("?\xe2\x80").
		if i := strings.IndexByte(s, '?'); i >= 0 && i+1 < len(s) && strings.Contains(strings.TrimSuffix(r, "?…"), s[i:]) && len(s[i:]) > 2 {
			t.Fatalf("Redact(%q) = %q keeps the query", s, r)
		}
		if Redact(r) != r {
			t.Fatalf("Redact(%q) = %q, not a fixed point: %q", s, r, Redact(r))
		}
	})
}
