package cow

import (
	"bytes"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// A data: image (read-only) made writable by the overlay, driven by real
// clients: qemu-io writes and zeroes, qemu-img compares with the expected
// image, nbdinfo --map shows the merged extents.
func TestRealClientsOverDataOrigin(t *testing.T) {
	img := pattern(100000, 9)
	spec := "cow=true,cow-block=4Ki,size=4Mi;data:;base64," + base64.StdEncoding.EncodeToString(img)
	dev := devtest.Open(t, spec, backends.Env{StateDir: t.TempDir()})
	sock := testserver.ServeNBD(t, dev)
	q := "nbd:unix:" + sock
	testserver.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 50000 10000", "-c", "write -z 1048576 1048576",
		"-c", "write -P 0x62 3000000 5", q)
	want := make([]byte, 4<<20)
	copy(want, img)
	copy(want[50000:60000], bytes.Repeat([]byte{0x61}, 10000))
	copy(want[3000000:], "bbbbb")
	exp := filepath.Join(t.TempDir(), "want.img")
	if err := os.WriteFile(exp, want, 0o600); err != nil {
		t.Fatal(err)
	}
	testserver.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", exp, q)
	// Origin data (with overlay data inside) to 100000, the zeroed MiB
	// merged with the data: padding's hole, the one written block, hole.
	out := testserver.Run(t, "nbdinfo", "--map", "nbd+unix:///?socket="+sock)
	var got []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		got = append(got, strings.Join(strings.Fields(l), " "))
	}
	want2 := []string{"0 100000 0 data", "100000 2898272 3 hole,zero", "2998272 4096 0 data", "3002368 1191936 3 hole,zero"}
	if strings.Join(got, "|") != strings.Join(want2, "|") {
		t.Fatalf("nbdinfo --map:\n%s\nwant %q", out, want2)
	}
}
