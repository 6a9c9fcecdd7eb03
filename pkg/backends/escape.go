package backends

import (
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// maxQuoted bounds strings quoted into error messages: specs may carry
// multi-megabyte data URIs or long presigned URLs, which must not end up
// in logs and Kubernetes events whole.
const maxQuoted = 100

// quote returns s quoted for an error message, its quoted form cut to
// about maxQuoted bytes (binary input quotes to 4 bytes per byte).
func quote(s string) string {
	q := strconv.Quote(s)
	if len(q) <= maxQuoted+2 {
		return q
	}
	cut := min(len(s), maxQuoted)
	for {
		// Back up to a rune start so the quoted prefix stays readable.
		for cut > 0 && cut < len(s) && !utf8.RuneStart(s[cut]) {
			cut--
		}
		q = strconv.Quote(s[:cut])
		if len(q) <= maxQuoted+2 || cut == 0 {
			break
		}
		cut -= (len(q)-maxQuoted-2)/4 + 1
	}
	return q + fmt.Sprintf("…(%d bytes)", len(s))
}

// needsEscape reports whether c must be percent-encoded in an option
// value: ',' and ';' delimit options, '%' introduces escapes, and control
// characters would be invisible in logs and YAML.
func needsEscape(c byte) bool {
	return c == '%' || c == ',' || c == ';' || c < 0x20 || c == 0x7f
}

// escapeValue percent-encodes the bytes of v that needsEscape selects.
func escapeValue(v string) string {
	n := 0
	for i := 0; i < len(v); i++ {
		if needsEscape(v[i]) {
			n++
		}
	}
	if n == 0 {
		return v
	}
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(v) + 2*n)
	for i := 0; i < len(v); i++ {
		c := v[i]
		if needsEscape(c) {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

// unescapeValue decodes every %XX in v (either hex case). Unlike URL
// query decoding, '+' stays '+'.
func unescapeValue(v string) (string, error) {
	if strings.IndexByte(v, '%') < 0 {
		return v, nil
	}
	var b strings.Builder
	b.Grow(len(v))
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c != '%' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(v) || !isHex(v[i+1]) || !isHex(v[i+2]) {
			return "", fmt.Errorf("invalid percent escape at byte %d of %s (want %%XX)", i, quote(v))
		}
		b.WriteByte(unhex(v[i+1])<<4 | unhex(v[i+2]))
		i += 2
	}
	return b.String(), nil
}

func isHex(c byte) bool {
	return isDigit(c) || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case isDigit(c):
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}
