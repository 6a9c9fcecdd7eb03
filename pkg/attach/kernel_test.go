package attach

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd/netlink"
)

// Tests against the real nbd driver. They run inside the test VM
// (test/vm), which sets CSI_NBD_KERNEL_TEST; this host kernel has no nbd.
func kernelTest(t *testing.T) (*Manager, context.Context) {
	t.Helper()
	if os.Getenv("CSI_NBD_KERNEL_TEST") == "" {
		t.Skip("needs the kernel nbd driver: runs inside the test VM (go test ./test/vm)")
	}
	m, err := NewManager(t.TempDir(), backends.Env{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, ctxT(t)
}

// vmlog prints a line the VM test copies into its own log.
func vmlog(format string, args ...any) { fmt.Printf("VMLOG "+format+"\n", args...) }

func TestKernelResize(t *testing.T) {
	m, ctx := kernelTest(t)
	path, err := m.Attach(ctx, "resize", "size=64Mi;memory:resize", nil, Options{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	if sz, ok := sysfsSize(path); !ok || sz != 64<<20 {
		t.Fatalf("%s size %d (%v), want 64Mi", path, sz, ok)
	}
	k, err := netlink.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	idx, _ := ParseNBDPath(path)
	sts, err := k.Status(ctx, idx)
	if err != nil || len(sts) != 1 || !sts[0].Connected {
		t.Fatalf("STATUS of %s: %+v, %v", path, sts, err)
	}
	// RECONFIGURE alone: does this kernel apply NBD_ATTR_SIZE_BYTES?
	v := m.lookup("resize")
	if err := backends.Resize(ctx, v.dev, 96<<20); err != nil {
		t.Fatal(err)
	}
	if err := k.Reconfigure(ctx, netlink.ReconfigureConfig{Index: uint32(idx), Size: 96 << 20, BackendIdentifier: "resize"}); err != nil {
		t.Fatal(err)
	}
	sz, _ := sysfsSize(path)
	vmlog("RECONFIGURE with NBD_ATTR_SIZE_BYTES 96Mi: device size now %d (applied: %v)", sz, sz == 96<<20)
	if err := m.Resize(ctx, "resize", 128<<20); err != nil {
		t.Fatal(err)
	}
	if sz, _ := sysfsSize(path); sz != 128<<20 {
		t.Fatalf("%s size %d after Resize, want 128Mi", path, sz)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := pattern(1<<20, 4)
	if _, err := f.WriteAt(data, 120<<20); err != nil {
		t.Fatalf("write past the old end: %v", err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 120<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back past the old end: %v", err)
	}
	f.Close()
	if err := m.Detach(ctx, "resize"); err != nil {
		t.Fatal(err)
	}
	sts, err = k.Status(ctx, idx)
	if err != nil || (len(sts) == 1 && sts[0].Connected) {
		t.Fatalf("STATUS after detach: %+v, %v", sts, err)
	}
}

// A connection that dies under a live device (as when a request times
// out) is announced by LINK_DEAD and replaced; I/O goes on.
func TestKernelRepairsDeadConnection(t *testing.T) {
	m, ctx := kernelTest(t)
	path, err := m.Attach(ctx, "repair", "size=32Mi;memory:repair", nil, Options{Connections: 2, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	v := m.lookup("repair")
	v.connMu.Lock()
	var victim net.Conn
	for c := range v.conns {
		victim = c
		break
	}
	v.connMu.Unlock()
	start := time.Now()
	victim.Close()
	eventually(t, "the dead connection replaced", func() bool { return m.Health("repair") == nil && v.live.Load() == 2 })
	vmlog("dead connection replaced after %v", time.Since(start).Round(time.Millisecond))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_SYNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 0; i < 32; i++ {
		if _, err := f.WriteAt(pattern(64<<10, byte(i)), int64(i)<<20); err != nil {
			t.Fatalf("write %d after the repair: %v", i, err)
		}
	}
	if err := m.Detach(ctx, "repair"); err != nil {
		t.Fatal(err)
	}
}

// A device disconnected by someone else (nbd-client -d, csi-nbd detach
// with no serving process recorded) is forgotten, not resurrected.
func TestKernelExternalDisconnect(t *testing.T) {
	m, ctx := kernelTest(t)
	path, err := m.Attach(ctx, "ext", "size=16Mi;memory:ext", nil, Options{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	idx, _ := ParseNBDPath(path)
	if err := Disconnect(ctx, idx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Done("ext"):
	case <-time.After(30 * time.Second):
		t.Fatal("volume still served after an external DISCONNECT")
	}
	if len(m.List()) != 0 {
		t.Fatalf("still listed: %+v", m.List())
	}
}
