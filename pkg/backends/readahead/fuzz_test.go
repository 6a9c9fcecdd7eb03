package readahead

import (
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// FuzzParseMax: readahead options either parse to a window within the
// bounds or are refused naming their key.
func FuzzParseMax(f *testing.F) {
	f.Add("4Mi", "true")
	f.Add("1Ki", "")
	f.Add("1Gi", "false")
	f.Add("64Ki", "yes")
	f.Add("1.5Mi", "0")
	f.Fuzz(func(t *testing.T, max, enable string) {
		opts := map[string]string{}
		if max != "" {
			opts[KeyMax] = max
		}
		if enable != "" {
			opts[KeyEnable] = enable
		}
		s, err := backends.Parse(backends.Spec{Options: opts, URL: "memory:"}.String())
		if err != nil {
			return
		}
		n, err := parseMax(s)
		if err != nil {
			if !strings.Contains(err.Error(), `"`+KeyMax+`"`) && !strings.Contains(err.Error(), `"`+KeyEnable+`"`) {
				t.Fatalf("error names no option: %v", err)
			}
			return
		}
		if n < LowestMax || n > HighestMax {
			t.Fatalf("readahead-max %d accepted outside [%d, %d]", n, LowestMax, HighestMax)
		}
	})
}
