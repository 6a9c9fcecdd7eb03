package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// The attach and detach commands' argument handling; attaching itself
// needs the kernel's nbd driver and is tested in the VM (test/vm).
func TestAttachDetachUsage(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		code int
		out  string // in stderr
	}{
		{[]string{"attach"}, 2, "exactly one SPEC"},
		{[]string{"attach", "--resume", "memory:"}, 2, "exactly one SPEC"},
		{[]string{"attach", "a:", "b:"}, 2, "exactly one SPEC"},
		{[]string{"attach", "--state-dir", dir, "--resume"}, 1, "no volumes recorded"},
		{[]string{"attach", "--state-dir", dir, "--fallback", "sometimes", "memory:"}, 1, `fallback "sometimes"`},
		{[]string{"attach", "--state-dir", dir, "--connections", "0x", "memory:"}, 2, "connections"},
		{[]string{"attach", "--state-dir", dir, "nosuchscheme://x"}, 1, "nosuchscheme"},
		{[]string{"detach"}, 2, "one DEVICE"},
		{[]string{"detach", "--state-dir", dir, "/dev/sda"}, 1, "not an nbd device"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.out) {
			t.Errorf("csi-nbd %s: exit %d, want %d; stderr %q should mention %q",
				strings.Join(tc.args, " "), code, tc.code, stderr.String(), tc.out)
		}
	}
	var stdout bytes.Buffer
	if code := run(context.Background(), []string{"attach", "--help"}, &stdout, &stdout); code != 0 || !strings.Contains(stdout.String(), "--resume") {
		t.Fatalf("attach --help: exit %d, %q", code, stdout.String())
	}
}
