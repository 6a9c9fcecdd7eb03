package vm

import (
	"strings"
	"testing"
)

// TestSanityResults: the VM test passes only on two clean csi-sanity
// summaries; a failed spec, an empty run or a missing run fails it.
func TestSanityResults(t *testing.T) {
	const (
		mountOK  = "VMTEST: csi-sanity mount: Ran 61 of 103 Specs in 8.5 seconds; 61 Passed | 0 Failed | 1 Pending | 41 Skipped; 8820 ms"
		blockOK  = "VMTEST: csi-sanity block: Ran 61 of 103 Specs in 5.6 seconds; 61 Passed | 0 Failed | 1 Pending | 41 Skipped; 5790 ms"
		blockBad = "VMTEST: csi-sanity block: Ran 61 of 103 Specs in 5.6 seconds; 59 Passed | 2 Failed | 1 Pending | 41 Skipped; 5790 ms"
		mountNil = "VMTEST: csi-sanity mount: Ran 0 of 103 Specs in 0.1 seconds; 0 Passed | 0 Failed | 0 Pending | 103 Skipped; 100 ms"
	)
	for _, tc := range []struct {
		name  string
		lines []string
		want  string // a problem containing this; "" for none
	}{
		{"clean", []string{"VMTEST: booted", mountOK, blockOK}, ""},
		{"failed spec", []string{mountOK, blockBad}, "block: 2 specs failed"},
		{"nothing passed", []string{mountNil, blockOK}, "mount: no spec passed"},
		{"block missing", []string{mountOK}, "access type block"},
		{"no summary", []string{"VMTEST: csi-sanity mount: ; ; 100 ms", blockOK}, "access type mount"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, problems := sanityResults(tc.lines)
			if tc.want == "" {
				if len(problems) != 0 {
					t.Errorf("problems %q, want none", problems)
				}
				return
			}
			if len(problems) != 1 || !strings.Contains(problems[0], tc.want) {
				t.Errorf("problems %q, want one containing %q", problems, tc.want)
			}
		})
	}
}
