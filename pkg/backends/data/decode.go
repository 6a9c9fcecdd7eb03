package data

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// Decode returns the bytes an RFC 2397 data URI carries:
//
//	data:[<mediatype>][;base64],<data>
//
// The data is percent-decoded, then base64-decoded if ";base64" ends the
// header. Base64 may be standard or URL-safe, padded or not, as long as
// it does not mix the two alphabets. The media type is not interpreted.
func Decode(uri string) ([]byte, error) {
	if len(uri) < 5 || !strings.EqualFold(uri[:5], "data:") {
		return nil, errors.New("not a data: URI")
	}
	header, payload, ok := strings.Cut(uri[5:], ",")
	if !ok {
		return nil, errors.New("data URI has no ',' before its data")
	}
	raw, err := percentDecode(payload)
	if err != nil {
		return nil, fmt.Errorf("data URI: %w", err)
	}
	const b64 = ";base64"
	if len(header) < len(b64) || !strings.EqualFold(header[len(header)-len(b64):], b64) {
		return raw, nil
	}
	b, err := decodeBase64(raw)
	if err != nil {
		return nil, fmt.Errorf("data URI: invalid base64: %w", err)
	}
	return b, nil
}

// percentDecode decodes %XX escapes; '+' is literal, as in RFC 3986.
func percentDecode(s string) ([]byte, error) {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '%' {
			out = append(out, c)
			continue
		}
		if i+2 >= len(s) || unhex(s[i+1]) < 0 || unhex(s[i+2]) < 0 {
			return nil, fmt.Errorf("invalid percent escape at byte %d of the data (want %%XX)", i)
		}
		out = append(out, byte(unhex(s[i+1])<<4|unhex(s[i+2])))
		i += 2
	}
	return out, nil
}

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'a' <= c && c <= 'f':
		return int(c - 'a' + 10)
	case 'A' <= c && c <= 'F':
		return int(c - 'A' + 10)
	}
	return -1
}

// decodeBase64 picks the alphabet and padding from the input itself, which
// is unambiguous unless both alphabets' special characters appear.
func decodeBase64(s []byte) ([]byte, error) {
	std := bytes.ContainsAny(s, "+/")
	url := bytes.ContainsAny(s, "-_")
	if std && url {
		return nil, errors.New("mixes the standard (+/) and URL-safe (-_) alphabets")
	}
	enc := base64.StdEncoding
	if url {
		enc = base64.URLEncoding
	}
	if bytes.IndexByte(s, '=') < 0 {
		enc = enc.WithPadding(base64.NoPadding)
	}
	out := make([]byte, enc.DecodedLen(len(s)))
	n, err := enc.Decode(out, s)
	if err != nil {
		var ce base64.CorruptInputError
		if errors.As(err, &ce) {
			return nil, fmt.Errorf("illegal character or truncated input at byte %d of the base64 text", int64(ce))
		}
		return nil, err
	}
	return out[:n], nil
}
