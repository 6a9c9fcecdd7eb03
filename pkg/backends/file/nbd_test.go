package file

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
)

func losetup(t *testing.T, img string) string {
	t.Helper()
	testserver.RequireTool(t, "losetup")
	out, err := exec.Command("losetup", "-f", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("no loop device: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// TestThroughNBDClients serves a sparse file volume and checks it with
// libnbd's and qemu's clients: the map shows the file's holes, data
// copied in with nbdcopy compares equal, and trims leave holes in the file.
func TestThroughNBDClients(t *testing.T) {
	for _, direct := range []string{"false", "true"} {
		t.Run("direct="+direct, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "disk.img")
			d := open(t, "direct="+direct+",size=16Mi;file://"+p)
			uri := testserver.ServeNBDURI(t, d)
			if !d.Caps().Trim {
				t.Skip("filesystem cannot punch holes")
			}

			d.WriteAt(ctx, devtest.RandBytes(1<<20), 4<<20, false)
			m := testserver.Run(t, "nbdinfo", "--map", uri)
			want := []string{"0  4194304    3  hole,zero", "4194304  1048576    0  data", "5242880 11534336    3  hole,zero"}
			for _, w := range want {
				if !strings.Contains(strings.Join(strings.Fields(m), " "), strings.Join(strings.Fields(w), " ")) {
					t.Fatalf("nbdinfo --map:\n%s\nwant a line %q", m, w)
				}
			}

			// A source with a hole in the middle; nbdcopy skips zeros
			// and trims or zeroes the destination there.
			src := filepath.Join(dir, "src")
			data := devtest.RandBytes(16 << 20)
			clear(data[6<<20 : 10<<20])
			os.WriteFile(src, data, 0o600)
			testserver.Run(t, "nbdcopy", "--connections=4", "--threads=4", src, uri)
			testserver.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
			testserver.Run(t, "nbdcopy", uri, filepath.Join(dir, "back"))
			if back, _ := os.ReadFile(filepath.Join(dir, "back")); !bytes.Equal(back, data) {
				t.Fatal("data read back through nbdcopy differs")
			}

			// Trim through the protocol punches a hole in the file.
			d.Flush(ctx)
			before := blocks(t, p)
			testserver.Run(t, "qemu-io", "-f", "raw", "-c", "discard 0 4M", uri)
			if after := blocks(t, p); after != before-4<<20/512 {
				t.Fatalf("blocks %d -> %d after a 4 MiB trim", before, after)
			}
		})
	}
}
