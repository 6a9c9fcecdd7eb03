package cache

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
)

// Real clients through a writeback cache over a slow origin: nbdcopy
// writes an image, qemu-io overwrites a range with FUA (-f), qemu-img compares
// the export with the expected image; after Close the origin holds it all.
func TestRealClientsThroughWriteback(t *testing.T) {
	const size = 16 << 20
	org := newMem(size)
	org.delay = time.Millisecond
	d := mustOpen(t, org, cfg(t, modeWriteback, 4<<20, 16<<10))
	sock := testserver.ServeNBD(t, d)
	uri := "nbd+unix:///?socket=" + sock
	qemuURI := "nbd:unix:" + sock

	img := make([]byte, size)
	rand.Read(img)
	in := filepath.Join(t.TempDir(), "in.img")
	if err := os.WriteFile(in, img, 0o600); err != nil {
		t.Fatal(err)
	}
	testserver.Run(t, "nbdcopy", "--connections=2", "--threads=2", in, uri)
	testserver.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a -f 1000000 300000", qemuURI)
	for i := 1000000; i < 1300000; i++ {
		img[i] = 0x5a
	}
	if err := os.WriteFile(in, img, 0o600); err != nil {
		t.Fatal(err)
	}
	testserver.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", in, qemuURI)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	got := devtest.ReadAll(t, org.Device, 0, size)
	if !bytes.Equal(got, img) {
		t.Fatal("origin does not hold what the clients wrote")
	}
}
