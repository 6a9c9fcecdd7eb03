package attach

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/attach/fuseloop"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// The Manager's FUSE+loop path end to end: attach with fallback=always,
// I/O through /dev/loopN reaches the stack, detach removes the loop, the
// FUSE mount and the record.
func TestFuseLoopFallbackAttachDetach(t *testing.T) {
	if err := fuseloop.Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("FUSE+loop is required in CI: %v", err)
		}
		t.Skip(err)
	}
	ctx := ctxT(t)
	m, err := NewManager(t.TempDir(), backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.openKernel = func(context.Context) (kernel, error) { return nil, ErrNoNBD }
	path, err := m.Attach(ctx, "f", "size=8Mi;memory:f", nil, Options{Fallback: FallbackAlways})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(path, "/dev/loop") {
		t.Fatalf("path %q", path)
	}
	if l := m.List(); len(l) != 1 || l[0].Kind != KindFuseLoop || l[0].Path != path {
		t.Fatalf("List: %+v", l)
	}
	want := pattern(4096, 3)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(want, 8192); err != nil {
		f.Close()
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		t.Fatal(err)
	}
	f.Close()
	dev, ok := m.Device("f")
	if !ok {
		t.Fatal("Device: not found")
	}
	got := make([]byte, len(want))
	if err := dev.ReadAt(ctx, got, 8192); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the write through %s did not reach the device: %v", path, err)
	}
	done := m.Done("f")
	if err := m.Detach(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	<-done
	if _, err := os.Stat(m.st.recordPath("f")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("record kept: %v", err)
	}
	if ents, _ := os.ReadDir(m.fuseDir("f")); len(ents) != 0 {
		t.Fatalf("FUSE file system still mounted: %v", ents)
	}
}
