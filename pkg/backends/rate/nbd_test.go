package rate

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// serve opens spec and serves it on a unix socket until the test ends; it
// returns the device and the export's libnbd URI.
func serve(t *testing.T, spec string) (backends.Device, string) {
	t.Helper()
	dev, err := devtest.TryOpen(spec, backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs after the server has shut down.
	t.Cleanup(func() {
		if err := dev.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return dev, testserver.ServeNBDURI(t, dev)
}

// Data goes through the whole stack (rate over readahead over memory)
// intact with real clients and several connections, and the filter counts
// every byte.
func TestNbdcopyThroughRateAndReadahead(t *testing.T) {
	dev, uri := serve(t, "rate-read=256Mi,rate-write=256Mi,iops-read=100000,readahead=true,size=64Mi;memory:")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	in, out := filepath.Join(dir, "in"), filepath.Join(dir, "out")
	data := make([]byte, 16<<20)
	rand.Read(data)
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	testserver.RunContext(t, ctx, "nbdcopy", "--connections=4", "--threads=4", in, uri)
	testserver.RunContext(t, ctx, "nbdcopy", "--connections=4", "--threads=4", uri, out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 64<<20 || !bytes.Equal(got[:len(data)], data) || !bytes.Equal(got[len(data):], make([]byte, len(got)-len(data))) {
		t.Fatal("data read back differs from data written")
	}
	r, ok := Find(dev)
	if !ok {
		t.Fatal("no rate filter in the stack")
	}
	st := r.Stats()
	// nbdcopy writes the file's data (it may zero or trim the rest) and
	// reads what extents call data; all of it went through the filter.
	if st.WriteBytes != uint64(len(data)) || st.ReadBytes < uint64(len(data)) {
		t.Errorf("stats %+v: want %d bytes written and at least as many read", st, len(data))
	}
}

// A copy crawling under a low limit finishes once the node plugin's call
// lifts the limit, with nothing dropped.
func TestNbdcopyLiveLimitChange(t *testing.T) {
	dev, uri := serve(t, "rate-read=256Ki,size=32Mi;memory:")
	r, _ := Find(dev)
	// Fill it, so nbdcopy reads everything (it skips holes).
	ctx := context.Background()
	fill := make([]byte, 32<<20)
	rand.Read(fill)
	if err := dev.WriteAt(ctx, fill, 0, false); err != nil {
		t.Fatal(err)
	}
	// At 256 KiB/s the copy would take two minutes; the limit is lifted
	// as soon as it is seen to be held back.
	cctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	testserver.RequireTool(t, "nbdcopy")
	done := make(chan struct{})
	out := filepath.Join(t.TempDir(), "out")
	go func() {
		defer close(done)
		cmd := exec.CommandContext(cctx, "nbdcopy", "--connections=2", "--threads=2", uri, out)
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("nbdcopy: %v\n%s", err, b)
		}
	}()
	for r.Stats().ReadThrottled == 0 {
		select {
		case <-done:
			t.Fatal("nbdcopy ended before it was throttled")
		case <-time.After(time.Millisecond):
		}
	}
	t.Logf("throttled: %+v", r.Stats())
	if err := r.SetLimits(Limits{}); err != nil {
		t.Fatal(err)
	}
	lifted := time.Now()
	<-done
	t.Logf("copy done %v after the limit was lifted: %+v", time.Since(lifted), r.Stats())
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, fill) {
		t.Fatal("copy differs from the volume")
	}
}
