package rate

import (
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// FuzzParseLimits feeds arbitrary option values through the spec parser
// and ParseLimits: whatever they accept must make a valid filter, and
// whatever they refuse must be refused with the offending key named.
func FuzzParseLimits(f *testing.F) {
	f.Add("10Mi", "", "", "", "", "")
	f.Add("", "1G", "500", "50", "1s", "true")
	f.Add("0", "0", "0", "0", "100ms", "false")
	f.Add("-1", "2Ti", "x", "-5", "0s", "maybe")
	f.Add("1.5Ki", "", "9999999999", "", "1h", "")
	f.Fuzz(func(t *testing.T, read, write, iopsR, iopsW, burst, enable string) {
		opts := map[string]string{}
		for k, v := range map[string]string{KeyReadRate: read, KeyWriteRate: write,
			KeyReadIOPS: iopsR, KeyWriteIOPS: iopsW, KeyBurst: burst, KeyEnable: enable} {
			if v != "" {
				opts[k] = v
			}
		}
		s, err := backends.Parse(backends.Spec{Options: opts, URL: "memory:"}.String())
		if err != nil {
			return // the spec parser's own fuzz target covers its errors
		}
		l, err := ParseLimits(s)
		if err != nil {
			named := false
			for _, k := range append(limitKeys, KeyEnable) {
				named = named || strings.Contains(err.Error(), `"`+k+`"`)
			}
			if !named {
				t.Fatalf("error names no option: %v", err)
			}
			return
		}
		if err := l.Check(); err != nil {
			t.Fatalf("ParseLimits accepted %+v that Check refuses: %v", l, err)
		}
		d, err := New(memory.New(4096), l)
		if err != nil {
			t.Fatal(err)
		}
		if got := d.Limits(); got != l {
			t.Fatalf("limits %+v, want %+v", got, l)
		}
		d.Close()
	})
}
