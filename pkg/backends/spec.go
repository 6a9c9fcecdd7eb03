package backends

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Spec is a parsed volume spec, the one string that names a whole volume
// (the NBD export name, the CSI volume attribute):
//
//	[KEY=VALUE{,KEY=VALUE};]URL
//
// The option prefix exists exactly when the string starts with "key="
// (a key matches [a-z][a-z0-9-]*, which no URL scheme can be followed by)
// and runs to the first ';'. Everything after that ';' is the URL, kept
// verbatim: query strings, presigned URLs and data URIs are never
// rewritten. In values, ',', ';', '%' and control characters are
// percent-encoded.
//
// Options configure the backend the URL's scheme selects and any filters.
// They never hold secrets: a spec is logged and stored in cluster objects,
// so an option may name a secret (a Secret, a file) but not contain it.
type Spec struct {
	// Options maps keys to canonical values, with defaults dropped. Parse
	// never leaves it nil.
	Options map[string]string
	URL     string
}

// ErrInvalidSpec is matched (errors.Is) by every error Parse returns.
var ErrInvalidSpec = errors.New("invalid volume spec")

// specError marks an error as an ErrInvalidSpec while keeping its message
// and its own chain.
type specError struct{ err error }

func (e *specError) Error() string        { return e.err.Error() }
func (e *specError) Unwrap() error        { return e.err }
func (e *specError) Is(target error) bool { return target == ErrInvalidSpec }

func specErrorf(format string, args ...any) error {
	return &specError{fmt.Errorf(format, args...)}
}

// Parse parses and validates a spec. It is strict: unknown or duplicate
// keys, bad values, unknown schemes and malformed URLs (as far as the
// backend's Validate checks) are errors naming the offending part. The
// result is canonical: Parse(s.String()) gives s back.
func Parse(s string) (Spec, error) {
	if s == "" {
		return Spec{}, specErrorf("spec: empty")
	}
	opts := map[string]string{}
	url := s
	if hasPrefix(s) {
		semi := strings.IndexByte(s, ';')
		if semi < 0 {
			return Spec{}, specErrorf("spec: option prefix %s has no ';' before the URL", quote(s))
		}
		if err := parseOptions(s[:semi], opts); err != nil {
			return Spec{}, err
		}
		url = s[semi+1:]
	}
	if url == "" {
		return Spec{}, specErrorf("spec: empty URL in %s", quote(s))
	}
	sp, b, err := normalize(Spec{Options: opts, URL: url})
	if err != nil {
		return Spec{}, err
	}
	if b.Validate != nil {
		if err := b.Validate(sp); err != nil {
			return Spec{}, &specError{fmt.Errorf("spec: %w", err)}
		}
	}
	for _, f := range filters() {
		if f.Validate != nil && f.On(sp) {
			if err := f.Validate(sp); err != nil {
				return Spec{}, &specError{fmt.Errorf("spec: filter %s: %w", f.Name, err)}
			}
		}
	}
	return sp, nil
}

// hasPrefix reports whether s starts with "key=".
func hasPrefix(s string) bool {
	if s == "" || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		switch c := s[i]; {
		case c == '=':
			return true
		case 'a' <= c && c <= 'z', isDigit(c), c == '-':
		default:
			return false
		}
	}
	return false
}

// parseOptions splits the prefix into opts, checking syntax only.
func parseOptions(prefix string, opts map[string]string) error {
	for _, item := range strings.Split(prefix, ",") {
		key, val, ok := strings.Cut(item, "=")
		switch {
		case item == "":
			return specErrorf("spec: empty option in %s", quote(prefix))
		case key == "":
			return specErrorf("spec: empty option key in %s", quote(item))
		case !validKey(key):
			return specErrorf("spec: invalid option key %s (want [a-z][a-z0-9-]*)", quote(key))
		case !ok:
			return specErrorf("spec: option %s has no value (want KEY=VALUE)", quote(key))
		}
		if _, dup := opts[key]; dup {
			return specErrorf("spec: duplicate option %s", quote(key))
		}
		v, err := unescapeValue(val)
		if err != nil {
			return &specError{fmt.Errorf("spec option %s: %w", quote(key), err)}
		}
		opts[key] = v
	}
	return nil
}

// normalize checks s's scheme and options and returns s with canonical
// values and defaults dropped, plus its backend.
func normalize(s Spec) (Spec, *Backend, error) {
	scheme, ok := schemeOf(s.URL)
	if !ok {
		return Spec{}, nil, specErrorf("spec: no URL scheme in %s (want SCHEME:...; known: %s)",
			quote(s.URL), strings.Join(Schemes(), ", "))
	}
	b, ok := lookupBackend(scheme)
	if !ok {
		return Spec{}, nil, specErrorf("spec: unknown scheme %s in %s (known: %s)",
			quote(scheme), quote(s.URL), strings.Join(Schemes(), ", "))
	}
	out := Spec{Options: make(map[string]string, len(s.Options)), URL: s.URL}
	for _, k := range sortedKeys(s.Options) {
		o, ok := lookupOption(b, k)
		if !ok {
			return Spec{}, nil, specErrorf("spec: unknown option %s for scheme %q (known: %s)",
				quote(k), scheme, strings.Join(knownKeys(b), ", "))
		}
		v, err := o.canonical(s.Options[k])
		if err != nil {
			return Spec{}, nil, &specError{fmt.Errorf("spec option %q: %w", k, err)}
		}
		if o.Default != "" && v == o.Default {
			continue
		}
		out.Options[k] = v
	}
	for _, o := range b.Options {
		if _, ok := out.Options[o.Key]; o.Required && !ok {
			return Spec{}, nil, specErrorf("spec: scheme %q needs option %q", scheme, o.Key)
		}
	}
	return out, b, nil
}

// schemeOf returns the lower-cased scheme of an RFC 3986 URL.
func schemeOf(url string) (string, bool) {
	i := strings.IndexByte(url, ':')
	if i <= 0 {
		return "", false
	}
	for j := 0; j < i; j++ {
		c := url[j] | 0x20 // lower-case letters; other bytes checked below
		switch {
		case 'a' <= c && c <= 'z':
		case j > 0 && (isDigit(url[j]) || url[j] == '+' || url[j] == '-' || url[j] == '.'):
		default:
			return "", false
		}
	}
	return strings.ToLower(url[:i]), true
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// String formats s canonically: keys sorted, values in canonical form and
// percent-encoded, defaults dropped, and no prefix at all without options.
// It is the volume's identity (the Pool key).
func (s Spec) String() string {
	if len(s.Options) == 0 {
		return s.URL
	}
	b, _ := lookupBackend(s.Scheme())
	var sb strings.Builder
	for _, k := range sortedKeys(s.Options) {
		v := s.Options[k]
		if o, ok := lookupOption(b, k); ok {
			if c, err := o.canonical(v); err == nil {
				v = c
			}
			if o.Default != "" && v == o.Default {
				continue
			}
		}
		if sb.Len() > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(k)
		sb.WriteByte('=')
		sb.WriteString(escapeValue(v))
	}
	if sb.Len() == 0 {
		return s.URL
	}
	sb.WriteByte(';')
	sb.WriteString(s.URL)
	return sb.String()
}

// Scheme returns the URL's scheme in lower case ("memory", "data"), or ""
// if the URL has none.
func (s Spec) Scheme() string {
	scheme, _ := schemeOf(s.URL)
	return scheme
}

// Value returns option key's value, or its registered default when it is
// absent (Parse drops defaults). ok is false if neither exists.
func (s Spec) Value(key string) (string, bool) {
	if v, ok := s.Options[key]; ok {
		return v, true
	}
	b, _ := lookupBackend(s.Scheme())
	if o, ok := lookupOption(b, key); ok && o.Default != "" {
		return o.Default, true
	}
	return "", false
}

// Size returns a size option (or its default) in bytes.
func (s Spec) Size(key string) (uint64, bool) {
	v, ok := s.Value(key)
	if !ok {
		return 0, false
	}
	n, err := ParseSize(v)
	return n, err == nil
}

// Bool returns a bool option (or its default).
func (s Spec) Bool(key string) (bool, bool) {
	v, ok := s.Value(key)
	if !ok {
		return false, false
	}
	b, err := parseBool(v)
	return b, err == nil
}

// Int returns an integer option (or its default).
func (s Spec) Int(key string) (int64, bool) {
	v, ok := s.Value(key)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(v, 10, 64)
	return n, err == nil
}

// Duration returns a duration option (or its default).
func (s Spec) Duration(key string) (time.Duration, bool) {
	v, ok := s.Value(key)
	if !ok {
		return 0, false
	}
	d, err := parseDuration(v)
	return d, err == nil
}

// Redacted is s's canonical form for logs and errors: user info in a URL
// is dropped, and so is an http(s) URL's query, which for a presigned URL
// is a credential.
func (s Spec) Redacted() string {
	r := Spec{Options: s.Options, URL: redactURL(s.URL)}
	return r.String()
}

func redactURL(u string) string {
	i := strings.Index(u, "://")
	if i < 0 {
		return u
	}
	scheme := strings.ToLower(u[:i])
	rest := u[i+3:]
	end := strings.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	if at := strings.LastIndexByte(rest[:end], '@'); at >= 0 {
		rest = rest[at+1:]
	}
	if scheme == "http" || scheme == "https" {
		if q := strings.IndexAny(rest, "?#"); q >= 0 {
			rest = rest[:q] + "?…"
		}
	}
	return u[:i+3] + rest
}
