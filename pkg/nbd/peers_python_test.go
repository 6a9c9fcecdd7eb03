package nbd

// Corner cases driven through python3-libnbd: the scripts in testdata/
// do the talking (and check what libnbd sees), these tests set up the
// server for each case and check the device afterwards.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

var (
	pythonNbdOnce sync.Once
	pythonNbdErr  error
)

// requirePythonNbd skips (fails in CI) unless the system interpreter can
// import python3-libnbd's nbd module.
func requirePythonNbd(t testing.TB) {
	t.Helper()
	requireTool(t, systemPython)
	pythonNbdOnce.Do(func() {
		out, err := exec.Command(systemPython, "-c", "import nbd").CombinedOutput()
		if err != nil {
			pythonNbdErr = fmt.Errorf("%v: %s", err, out)
		}
	})
	if pythonNbdErr != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("python3-libnbd is required in CI: %v", pythonNbdErr)
		}
		t.Skipf("python3-libnbd not usable: %v", pythonNbdErr)
	}
}

// runPython runs testdata/script with the URI and case, failing the test
// with the script's output if it exits non-zero.
func runPython(t *testing.T, script, uri, name string) string {
	t.Helper()
	requirePythonNbd(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, systemPython, filepath.Join("testdata", script), uri, name).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", script, name, err, out)
	}
	if testing.Verbose() {
		t.Logf("%s", out)
	}
	return string(out)
}

func TestLibnbdIO(t *testing.T) {
	type check func(t *testing.T, dev *testDevice)
	counts := func(wantFlushes, wantCaches, wantFast, wantNoHole int) check {
		return func(t *testing.T, dev *testDevice) {
			f, c, fz, nh := dev.counters()
			if f != wantFlushes || c != wantCaches || fz != wantFast || nh != wantNoHole {
				t.Errorf("device saw %d flushes, %d caches, %d fast zeroes, %d NO_HOLE zeroes; want %d, %d, %d, %d",
					f, c, fz, nh, wantFlushes, wantCaches, wantFast, wantNoHole)
			}
		}
	}
	for _, c := range []struct {
		test     string // subtest name when it differs from the case
		name     string
		size     int
		caps     func(*backends.Caps)
		exportRO bool
		fail     bool
		after    check
	}{
		{name: "structured_read"},
		{name: "df"},
		{name: "block_status", after: counts(0, 0, 0, 1)},
		{name: "no_meta_context"},
		{name: "fast_zero", after: counts(0, 0, 1, 0)},
		{name: "no_fast_zero", caps: func(c *backends.Caps) { c.FastZero = false }, after: counts(0, 0, 0, 0)},
		{name: "no_hole", after: counts(0, 0, 0, 1)},
		// Without native FUA, the server flushes after a FUA write.
		{name: "fua", after: counts(1, 0, 0, 0)},
		// With native FUA, it passes the flag down instead.
		{test: "fua_native", name: "fua", caps: func(c *backends.Caps) { c.FUA = true }, after: counts(0, 0, 0, 0)},
		{name: "fua_zero_trim", after: counts(2, 0, 0, 0)},
		{name: "flush", after: counts(1, 0, 0, 0)},
		{name: "cache", after: counts(0, 1, 0, 0)},
		{name: "errors", size: 64 << 20, caps: func(c *backends.Caps) { c.MaxBlock = 1 << 20 }},
		{test: "read_only_device", name: "read_only", caps: func(c *backends.Caps) { c.ReadOnly = true }},
		{test: "read_only_export", name: "read_only", exportRO: true, after: func(t *testing.T, dev *testDevice) {
			if _, alloc := dev.snapshot(); alloc[0] {
				t.Error("a read-only export wrote to the device")
			}
		}},
		{name: "trim_unsupported", caps: func(c *backends.Caps) { c.Trim = false }},
		{name: "unaligned", caps: func(c *backends.Caps) { c.MinBlock = 512 }},
		{name: "eio", fail: true, after: func(t *testing.T, dev *testDevice) {
			if data, _ := dev.snapshot(); data[1<<20] != 0 {
				t.Error("a failed write changed the device")
			}
		}},
		{name: "no_structured"},
		{name: "aio_pipeline"},
	} {
		name := c.test
		if name == "" {
			name = c.name
		}
		t.Run(name, func(t *testing.T) {
			requirePythonNbd(t)
			size := c.size
			if size == 0 {
				size = 16 << 20
			}
			dev := newTestDevice(size)
			if c.caps != nil {
				c.caps(&dev.caps)
			}
			if c.fail {
				dev.fail = fmt.Errorf("boom: %w", syscall.EIO)
				dev.failOff, dev.failLen = 1<<20, 4096
			}
			s := startServer(t, staticExports{"": {Device: dev, ReadOnly: c.exportRO}})
			runPython(t, "libnbd_io.py", s.uri(""), c.name)
			if c.after != nil {
				c.after(t, dev)
			}
		})
	}
}

func TestLibnbdNegotiation(t *testing.T) {
	exports := staticExports{
		"":      {Device: newTestDevice(16 << 20), Description: "default volume"},
		"alpha": {Device: newTestDevice(1 << 20), Description: "first"},
		"ro":    {Device: newTestDevice(64 << 10), ReadOnly: true},
	}
	s := startServer(t, exports)
	for _, name := range []string{
		"list", "info", "go_after_failed_go", "list_meta_context", "abort",
		"unknown_export", "no_structured_no_meta", "no_block_size_request", "handshake_flags",
	} {
		t.Run(name, func(t *testing.T) {
			runPython(t, "libnbd_negotiation.py", s.uri(""), name)
		})
	}
	// The same over TCP, for the URI forms that differ.
	t.Run("list_tcp", func(t *testing.T) {
		runPython(t, "libnbd_negotiation.py", s.tcpURI(""), "list")
	})
}
