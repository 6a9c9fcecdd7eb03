package backends

import (
	"math"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
	}{
		{"0", 0},
		{"512", 512},
		{"007", 7},
		{"4Ki", 4 << 10},
		{"64Mi", 64 << 20},
		{"1Gi", 1 << 30},
		{"10Ti", 10 << 40},
		{"1Pi", 1 << 50},
		{"1Ei", 1 << 60},
		{"15Ei", 15 << 60},
		{"1k", 1000},
		{"1M", 1e6},
		{"2G", 2e9},
		{"3T", 3e12},
		{"4P", 4e15},
		{"5E", 5e18},
		{"1.5Gi", 3 << 29},
		{"1.5k", 1500},
		{".5Ki", 512},
		{"2.Mi", 2 << 20},
		{"0.001k", 1},
		{"18446744073709551615", math.MaxUint64},
	} {
		got, err := ParseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestParseSizeErrors(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", `invalid size "": empty`},
		{"12Q", `invalid size "12Q": unknown suffix "Q"`},
		{"-1", "negative"},
		{"+1", "sign"},
		{"1.25", "whole number of bytes"},
		{"0.0001k", "whole number of bytes"},
		{"16Ei", "larger than"},
		{"18446744073709551616", "larger than"},
		{"Gi", "no digits"},
		{".", "no digits"},
		{"1 Gi", "unknown suffix"},
		{"1gi", "unknown suffix"},
		{"1K", "unknown suffix"},
		{"1e3", "unknown suffix"},
		{"1.2.3", "unknown suffix"},
		{" 1", "no digits"},
		{strings.Repeat("9", 65), "longer than 64"},
	} {
		_, err := ParseSize(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseSize(%q) error = %v; want it to contain %q", tc.in, err, tc.want)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for _, tc := range []struct {
		in   uint64
		want string
	}{
		{0, "0"},
		{1, "1"},
		{512, "512"},
		{1000, "1k"},
		{1024, "1Ki"},
		{1536, "1536"},
		{2048 << 20, "2Gi"},
		{1 << 30, "1Gi"},
		{3 << 29, "1536Mi"},
		{1e9, "1G"},
		{1 << 60, "1Ei"},
		// The shortest exact form wins; binary on a tie.
		{5e18, "5E"},
		{1e12, "1T"},
		{3 << 20, "3Mi"},
		{1 << 40, "1Ti"},
		{5e15 + 1000, "5000000000001k"},
		{math.MaxUint64, "18446744073709551615"},
	} {
		if got := FormatSize(tc.in); got != tc.want {
			t.Errorf("FormatSize(%d) = %q; want %q", tc.in, got, tc.want)
		}
		if n, err := ParseSize(FormatSize(tc.in)); err != nil || n != tc.in {
			t.Errorf("ParseSize(FormatSize(%d)) = %d, %v", tc.in, n, err)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "1Gi", "1.5Gi", "1k", "12Q", "-1", "16Ei", ".5Ki"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			if len(err.Error()) > 400 {
				t.Fatalf("error too long (%d bytes): %.200s", len(err.Error()), err)
			}
			return
		}
		c := FormatSize(n)
		m, err := ParseSize(c)
		if err != nil || m != n {
			t.Fatalf("ParseSize(%q) = %d but ParseSize(FormatSize) = %d, %v", s, n, m, err)
		}
		if FormatSize(m) != c {
			t.Fatalf("FormatSize not a fixed point: %q -> %q", c, FormatSize(m))
		}
	})
}
