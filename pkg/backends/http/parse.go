package httpdev

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// contentRange is a parsed Content-Range header (RFC 9110 §14.4).
type contentRange struct {
	first, last int64 // the bytes sent, inclusive; -1 for "bytes */N"
	total       int64 // the representation's length; -1 for "*"
}

// parseContentRange parses "bytes FIRST-LAST/TOTAL", "bytes FIRST-LAST/*"
// and "bytes */TOTAL" strictly: it guards what we copy into the caller's
// buffer, so anything odd is refused rather than guessed at.
func parseContentRange(s string) (contentRange, error) {
	bad := func(why string) (contentRange, error) {
		return contentRange{}, fmt.Errorf("invalid Content-Range %s: %s", strconv.Quote(clip(s)), why)
	}
	unit, rest, ok := strings.Cut(s, " ")
	if !ok || !strings.EqualFold(unit, "bytes") {
		return bad(`want "bytes FIRST-LAST/TOTAL"`)
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return bad("no '/'")
	}
	cr := contentRange{first: -1, last: -1, total: -1}
	if tot != "*" {
		n, err := parseDigits(tot)
		if err != nil {
			return bad("total: " + err.Error())
		}
		cr.total = n
	}
	if rng == "*" {
		if cr.total < 0 {
			return bad(`"*/*"`)
		}
		return cr, nil
	}
	f, l, ok := strings.Cut(rng, "-")
	if !ok {
		return bad("no '-' in range")
	}
	var err error
	if cr.first, err = parseDigits(f); err != nil {
		return bad("first: " + err.Error())
	}
	if cr.last, err = parseDigits(l); err != nil {
		return bad("last: " + err.Error())
	}
	if cr.last < cr.first {
		return bad("last before first")
	}
	if cr.total >= 0 && cr.last >= cr.total {
		return bad("range beyond total")
	}
	return cr, nil
}

// parseDigits parses a non-empty run of ASCII digits (no sign, no space)
// into a non-negative int64.
func parseDigits(s string) (int64, error) {
	if s == "" {
		return 0, errors.New("empty number")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, errors.New("not a number")
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, errors.New("number out of range")
	}
	return n, nil
}

func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}

// parseHeaderSecret turns the value of a header-secret into request
// headers. A value whose first line starts with a header name and a colon
// ("X-Api-Key: abc") is one or more "Name: value" lines; anything else
// ("Bearer abc", "Basic dXNlcjpwdw==") is the Authorization header's
// value. Errors name the secret and the line, never its contents.
func parseHeaderSecret(name, v string) ([][2]string, error) {
	v = strings.TrimRight(v, "\r\n")
	if strings.TrimSpace(v) == "" {
		return nil, fmt.Errorf("secret %q is empty", name)
	}
	lines := strings.Split(v, "\n")
	if i := strings.IndexByte(lines[0], ':'); i <= 0 || !isToken(lines[0][:i]) {
		if len(lines) > 1 {
			return nil, fmt.Errorf("secret %q: an Authorization value must be one line (or give \"Header: value\" lines)", name)
		}
		val := strings.TrimSpace(strings.TrimSuffix(lines[0], "\r"))
		if !validValue(val) {
			return nil, fmt.Errorf("secret %q: Authorization value holds control characters", name)
		}
		return [][2]string{{"Authorization", val}}, nil
	}
	var out [][2]string
	for n, line := range lines {
		line = strings.TrimSuffix(line, "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		k, val, ok := strings.Cut(line, ":")
		if !ok || !isToken(k) {
			return nil, fmt.Errorf("secret %q: line %d is not \"Header: value\"", name, n+1)
		}
		val = strings.TrimSpace(val)
		if !validValue(val) {
			return nil, fmt.Errorf("secret %q: line %d: value holds control characters", name, n+1)
		}
		switch strings.ToLower(k) {
		case "host", "range", "if-match", "if-unmodified-since", "content-length", "transfer-encoding", "connection":
			return nil, fmt.Errorf("secret %q: line %d: that header is the backend's own", name, n+1)
		}
		out = append(out, [2]string{k, val})
	}
	return out, nil
}

// isToken reports whether s is an RFC 9110 token (a header name).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

func validValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}
