package backends

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
)

// sizeUnit is one quantity suffix. The lists are ordered largest first so
// FormatSize can pick the largest suffix that divides exactly.
type sizeUnit struct {
	suffix string
	mult   uint64
}

var (
	binaryUnits = []sizeUnit{
		{"Ei", 1 << 60}, {"Pi", 1 << 50}, {"Ti", 1 << 40},
		{"Gi", 1 << 30}, {"Mi", 1 << 20}, {"Ki", 1 << 10},
	}
	decimalUnits = []sizeUnit{
		{"E", 1e18}, {"P", 1e15}, {"T", 1e12},
		{"G", 1e9}, {"M", 1e6}, {"k", 1e3},
	}
)

// maxSizeLen bounds ParseSize's input: no valid size needs more, and the
// bound keeps the exact big-number arithmetic cheap on hostile input.
const maxSizeLen = 64

// ParseSize parses a byte count written as a Kubernetes quantity: plain
// bytes ("512"), a binary suffix (Ki, Mi, Gi, Ti, Pi, Ei) or a decimal one
// (k, M, G, T, P, E). A decimal fraction ("1.5Gi") is allowed only when it
// comes to a whole number of bytes. Signs, exponents, spaces and values
// above 2^64-1 are rejected.
func ParseSize(s string) (uint64, error) {
	n, err := parseSize(s)
	if err != nil {
		return 0, fmt.Errorf("invalid size %s: %w", quote(s), err)
	}
	return n, nil
}

func parseSize(s string) (uint64, error) {
	if s == "" {
		return 0, errors.New("empty")
	}
	if len(s) > maxSizeLen {
		return 0, fmt.Errorf("longer than %d characters", maxSizeLen)
	}
	switch s[0] {
	case '-':
		return 0, errors.New("negative sizes are not allowed")
	case '+':
		return 0, errors.New("a sign is not allowed")
	}
	// Split into integer digits, fraction digits and suffix.
	i := 0
	for i < len(s) && isDigit(s[i]) {
		i++
	}
	intPart, frac := s[:i], ""
	if i < len(s) && s[i] == '.' {
		j := i + 1
		for j < len(s) && isDigit(s[j]) {
			j++
		}
		frac, i = s[i+1:j], j
	}
	if intPart == "" && frac == "" {
		return 0, errors.New("no digits")
	}
	mult, err := sizeMultiplier(s[i:])
	if err != nil {
		return 0, err
	}
	// value = digits(intPart+frac) * mult / 10^len(frac), exactly.
	v, ok := new(big.Int).SetString(intPart+frac, 10)
	if !ok {
		return 0, errors.New("not a number")
	}
	v.Mul(v, new(big.Int).SetUint64(mult))
	den := new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(frac))), nil)
	q, r := new(big.Int).QuoRem(v, den, new(big.Int))
	if r.Sign() != 0 {
		return 0, errors.New("not a whole number of bytes")
	}
	if !q.IsUint64() {
		return 0, fmt.Errorf("larger than %d bytes", uint64(math.MaxUint64))
	}
	return q.Uint64(), nil
}

func sizeMultiplier(suffix string) (uint64, error) {
	if suffix == "" {
		return 1, nil
	}
	for _, u := range binaryUnits {
		if u.suffix == suffix {
			return u.mult, nil
		}
	}
	for _, u := range decimalUnits {
		if u.suffix == suffix {
			return u.mult, nil
		}
	}
	return 0, fmt.Errorf("unknown suffix %s (want Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E)", quote(suffix))
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }

// FormatSize writes n canonically: the shortest of plain bytes, the largest
// binary suffix that divides n and the largest decimal one that does.
// ParseSize(FormatSize(n)) == n for every n.
func FormatSize(n uint64) string {
	if n == 0 {
		return "0"
	}
	// The shortest exact form wins, binary on a tie: 1Gi, 1T (not
	// 976562500Ki), 1536Ki (not 1572864).
	best := strconv.FormatUint(n, 10)
	for _, units := range [][]sizeUnit{binaryUnits, decimalUnits} {
		for _, u := range units {
			if n%u.mult == 0 {
				if s := strconv.FormatUint(n/u.mult, 10) + u.suffix; len(s) < len(best) {
					best = s
				}
				break
			}
		}
	}
	return best
}
