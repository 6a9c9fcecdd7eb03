package cache

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// oneExport serves one device under every name.
type oneExport struct{ dev backends.Device }

func (o oneExport) Open(context.Context, string) (*nbd.Export, func(), error) {
	return &nbd.Export{Device: o.dev}, func() {}, nil
}
func (o oneExport) List(context.Context) []nbd.ExportInfo { return nil }

// serve serves dev on a unix socket until the test ends and returns the
// socket path.
func serve(t *testing.T, dev backends.Device) string {
	t.Helper()
	srv, err := nbd.NewServer(nbd.ServerConfig{Exports: oneExport{dev}})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-done; err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			t.Error(err)
		}
	})
	return sock
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	testserver.RequireTool(t, name)
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// Real clients through a writeback cache over a slow origin: nbdcopy
// writes an image, qemu-io overwrites a range with FUA (-f), qemu-img compares
// the export with the expected image; after Close the origin holds it all.
func TestRealClientsThroughWriteback(t *testing.T) {
	const size = 16 << 20
	org := newMem(size)
	org.delay = time.Millisecond
	d := mustOpen(t, org, cfg(t, modeWriteback, 4<<20, 16<<10))
	sock := serve(t, d)
	uri := "nbd+unix:///?socket=" + sock
	qemuURI := "nbd:unix:" + sock

	img := make([]byte, size)
	rand.Read(img)
	in := filepath.Join(t.TempDir(), "in.img")
	if err := os.WriteFile(in, img, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "nbdcopy", "--connections=2", "--threads=2", in, uri)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a -f 1000000 300000", qemuURI)
	for i := 1000000; i < 1300000; i++ {
		img[i] = 0x5a
	}
	if err := os.WriteFile(in, img, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", in, qemuURI)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	got := readAll(t, org.Device, 0, size)
	if !bytes.Equal(got, img) {
		t.Fatal("origin does not hold what the clients wrote")
	}
}
