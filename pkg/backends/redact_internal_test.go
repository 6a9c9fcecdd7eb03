package backends

import "testing"

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"memory:x":                      "memory:x",
		"data:,a?b":                     "data:,a?b",
		"https://h/f.iso?X-Amz-Sig=abc": "https://h/f.iso?…",
		"HTTP://user:pw@h:80/f#frag":    "HTTP://h:80/f?…",
		"nbd://u@h/exp":                 "nbd://h/exp",
		"nbd+unix:///e?socket=/s":       "nbd+unix:///e?socket=/s",
	} {
		if got := redactURL(in); got != want {
			t.Errorf("redactURL(%q) = %q; want %q", in, got, want)
		}
	}
}
