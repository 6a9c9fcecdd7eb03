package file

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// oneExport serves one device as the default export.
type oneExport struct{ dev backends.Device }

func (e oneExport) Open(context.Context, string) (*nbd.Export, func(), error) {
	return &nbd.Export{Device: e.dev}, func() {}, nil
}
func (e oneExport) List(context.Context) []nbd.ExportInfo { return []nbd.ExportInfo{{}} }

// serve serves dev on a unix socket in-process and returns its NBD URI.
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
	go srv.Serve(context.Background(), ln)
	t.Cleanup(func() {
		c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(c)
	})
	return "nbd+unix:///?socket=" + sock
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
			uri := serve(t, d)
			if !d.Caps().Trim {
				t.Skip("filesystem cannot punch holes")
			}

			d.WriteAt(ctx, randBytes(1<<20), 4<<20, false)
			m := run(t, "nbdinfo", "--map", uri)
			want := []string{"0  4194304    3  hole,zero", "4194304  1048576    0  data", "5242880 11534336    3  hole,zero"}
			for _, w := range want {
				if !strings.Contains(strings.Join(strings.Fields(m), " "), strings.Join(strings.Fields(w), " ")) {
					t.Fatalf("nbdinfo --map:\n%s\nwant a line %q", m, w)
				}
			}

			// A source with a hole in the middle; nbdcopy skips zeros
			// and trims or zeroes the destination there.
			src := filepath.Join(dir, "src")
			data := randBytes(16 << 20)
			clear(data[6<<20 : 10<<20])
			os.WriteFile(src, data, 0o600)
			run(t, "nbdcopy", "--connections=4", "--threads=4", src, uri)
			run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
			run(t, "nbdcopy", uri, filepath.Join(dir, "back"))
			if back, _ := os.ReadFile(filepath.Join(dir, "back")); !bytes.Equal(back, data) {
				t.Fatal("data read back through nbdcopy differs")
			}

			// Trim through the protocol punches a hole in the file.
			d.Flush(ctx)
			before := blocks(t, p)
			run(t, "qemu-io", "-f", "raw", "-c", "discard 0 4M", uri)
			if after := blocks(t, p); after != before-4<<20/512 {
				t.Fatalf("blocks %d -> %d after a 4 MiB trim", before, after)
			}
		})
	}
}
