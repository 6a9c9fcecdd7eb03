package httpdev_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testpki"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/http"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

var mtime = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestNginxRoundTrip(t *testing.T) {
	n := testserver.StartNginx(t, testserver.NginxOptions{})
	data := devtest.RandBytes(9<<20 + 12345) // not a multiple of anything
	n.WriteFile(t, "disk.img", data, mtime)

	for _, loc := range []string{"/", "/noetag/"} {
		t.Run("location"+loc, func(t *testing.T) {
			dev := devtest.Open(t, n.URL+loc+"disk.img", backends.Env{})
			if dev.Size() != uint64(len(data)) {
				t.Fatalf("size %d, want %d", dev.Size(), len(data))
			}
			if c := dev.Caps(); !c.ReadOnly || c.Fast {
				t.Fatalf("caps %+v: want ReadOnly and not Fast", c)
			}
			ctx := context.Background()
			// One read of everything: split into parallel range GETs.
			devtest.CheckRead(t, "whole read", dev, 0, data)
			for _, r := range [][2]int{{0, 1}, {1, 4095}, {4096, 4096}, {len(data) - 1, 1}, {len(data) - 70000, 70000}, {3<<20 - 7, 5 << 20}} {
				p := make([]byte, r[1])
				if err := dev.ReadAt(ctx, p, uint64(r[0])); err != nil {
					t.Fatalf("read %v: %v", r, err)
				}
				if !bytes.Equal(p, data[r[0]:r[0]+r[1]]) {
					t.Fatalf("read %v differs", r)
				}
			}
			devtest.CheckReadOnly(t, dev)
		})
	}
}

// exports serves one pool's volumes by spec, like `csi-nbd serve --allow '*'`.
type exports struct{ pool *backends.Pool }

func (e exports) Open(ctx context.Context, name string) (*nbd.Export, func(), error) {
	s, err := backends.Parse(name)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", nbd.ErrUnknownExport, err)
	}
	dev, release, err := e.pool.Acquire(ctx, s)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", nbd.ErrUnknownExport, err)
	}
	return &nbd.Export{Device: dev, Description: s.String()}, release, nil
}

func (exports) List(context.Context) []nbd.ExportInfo { return nil }

// serveNBD serves specs over NBD (pkg/nbd's server in this process) until
// the test ends.
func serveNBD(t *testing.T, env backends.Env) *testserver.NBDServer {
	t.Helper()
	pool := backends.NewPool(env)
	t.Cleanup(func() { pool.Close() }) // after the server's shutdown
	return testserver.StartNBD(t, exports{pool})
}

func TestNginxThroughNBD(t *testing.T) {
	n := testserver.StartNginx(t, testserver.NginxOptions{})
	data := devtest.RandBytes(16<<20 + 512)
	n.WriteFile(t, "disk.img", data, mtime)
	srv := serveNBD(t, backends.Env{})
	spec := n.URL + "/disk.img"

	out := testserver.Run(t, "nbdinfo", "--json", srv.UnixURI(spec))
	var info struct {
		Exports []struct {
			Size     uint64 `json:"export-size"`
			ReadOnly bool   `json:"is_read_only"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo output %v:\n%s", err, out)
	}
	if e := info.Exports[0]; e.Size != uint64(len(data)) || !e.ReadOnly {
		t.Fatalf("export %+v, want size %d read-only", e, len(data))
	}
	dst := filepath.Join(t.TempDir(), "copy")
	testserver.Run(t, "nbdcopy", "--connections=4", "--threads=4", "--requests=16", srv.UnixURI(spec), dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("copy through NBD differs from the origin's file")
	}
	qemuIO := testserver.RequireTool(t, "qemu-io")
	if out, err := exec.Command(qemuIO, "-f", "raw", "-c", "write 0 512", "nbd:unix:"+srv.Sock+":exportname="+spec).CombinedOutput(); err == nil {
		t.Fatalf("write through NBD succeeded:\n%s", out)
	}
	// The object changes under the open volume: the client gets EIO.
	n.WriteFile(t, "disk.img", devtest.RandBytes(len(data)), mtime.Add(time.Minute))
	b, err := exec.Command(testserver.RequireTool(t, "nbdcopy"), srv.UnixURI(spec), filepath.Join(t.TempDir(), "copy2")).CombinedOutput()
	if out := string(b); err == nil || !strings.Contains(out, "Input/output error") {
		t.Fatalf("nbdcopy of a changed origin: %v\n%s", err, out)
	}
}

func TestNginxMissingAndNoRanges(t *testing.T) {
	n := testserver.StartNginx(t, testserver.NginxOptions{})
	n.WriteFile(t, "disk.img", devtest.RandBytes(64<<10), mtime)

	_, err := devtest.TryOpen(n.URL+"/nothere.img?X-Sig=topsecret", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "404") || !strings.Contains(err.Error(), n.URL+"/nothere.img") {
		t.Fatalf("open of a missing object: %v; want 404 naming the URL", err)
	}
	// An empty object is an empty volume (nginx answers 416 "bytes */0").
	n.WriteFile(t, "empty.img", nil, mtime)
	if dev := devtest.Open(t, n.URL+"/empty.img", backends.Env{}); dev.Size() != 0 {
		t.Fatalf("empty object: size %d", dev.Size())
	}
	_, err = devtest.TryOpen(n.URL+"/noranges/disk.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "range requests") {
		t.Fatalf("open without ranges: %v; want a refusal naming range requests", err)
	}
}

// The object is replaced under an open volume: every later read fails with
// EIO, including reads of parts that are byte for byte the same, and
// including a large read split into parallel requests, whether the origin
// pins by ETag (/) or only by Last-Modified (/noetag/).
func TestNginxChangedUnderVolume(t *testing.T) {
	n := testserver.StartNginx(t, testserver.NginxOptions{})
	ctx := context.Background()
	for _, loc := range []string{"/", "/noetag/"} {
		for _, grow := range []bool{false, true} {
			t.Run(fmt.Sprintf("location%sgrow=%v", loc, grow), func(t *testing.T) {
				name := fmt.Sprintf("changed-%d-%v.img", len(loc), grow)
				old := devtest.RandBytes(8 << 20)
				n.WriteFile(t, name, old, mtime)
				dev := devtest.Open(t, n.URL+loc+name, backends.Env{})
				p := make([]byte, 4096)
				if err := dev.ReadAt(ctx, p, 4096); err != nil || !bytes.Equal(p, old[4096:8192]) {
					t.Fatalf("read before the change: %v", err)
				}
				// Same size, same first MiB, a later mtime: only the
				// validator tells the versions apart.
				neu := append([]byte(nil), old...)
				copy(neu[1<<20:], devtest.RandBytes(7<<20))
				if grow {
					neu = append(neu, 1)
				}
				n.WriteFile(t, name, neu, mtime.Add(time.Hour))

				if err := dev.ReadAt(ctx, p, 4096); !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "changed") {
					t.Fatalf("read after the change: %v; want EIO saying the origin changed", err)
				}
				big := make([]byte, 8<<20)
				if err := dev.ReadAt(ctx, big, 0); !errors.Is(err, syscall.EIO) {
					t.Fatalf("large read after the change: %v; want EIO", err)
				}
				// Even with the old bytes back (the old mtime too), the
				// volume stays failed: it never serves a mix.
				n.WriteFile(t, name, old, mtime)
				if err := dev.ReadAt(ctx, p, 4096); !errors.Is(err, syscall.EIO) {
					t.Fatalf("read after restoring: %v; want EIO", err)
				}
			})
		}
	}
}

func TestNginxHTTPSWithCA(t *testing.T) {
	ca := testpki.NewCA(t, "test origin CA")
	cert, key := ca.Issue(t, "localhost", x509.ExtKeyUsageServerAuth)
	n := testserver.StartNginx(t, testserver.NginxOptions{CertPEM: cert, KeyPEM: key})
	data := devtest.RandBytes(3<<20 + 1)
	n.WriteFile(t, "disk.img", data, mtime)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, ca.PEM, 0o600); err != nil {
		t.Fatal(err)
	}

	_, err := devtest.TryOpen(n.URL+"/disk.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("open without the CA: %v; want a certificate error", err)
	}
	_, err = devtest.TryOpen("ca="+filepath.Join(t.TempDir(), "missing.pem")+";"+n.URL+"/disk.img", backends.Env{})
	if err == nil || !strings.Contains(err.Error(), `"ca"`) {
		t.Fatalf("open with a missing CA file: %v; want an error naming option ca", err)
	}
	dev := devtest.Open(t, "ca="+caFile+";"+n.URL+"/disk.img", backends.Env{})
	devtest.CheckRead(t, "https read", dev, 0, data)
	// nginx offers HTTP/2 through ALPN, and the backend takes it.
	if log := n.AccessLog(); !strings.Contains(log, "HTTP/2.0\" 206") || strings.Contains(log, "HTTP/1.1\" 206") {
		t.Fatalf("want only HTTP/2 range requests in nginx's access log:\n%s", log)
	}
	// http2=false keeps to HTTP/1.1.
	dev = devtest.Open(t, "http2=false,ca="+caFile+";"+n.URL+"/disk.img", backends.Env{})
	devtest.CheckRead(t, "http/1.1 read", dev, 0, data[:4096])
	if log := n.AccessLog(); !strings.Contains(log, "HTTP/1.1\" 206") {
		t.Fatalf("no HTTP/1.1 range request in nginx's access log with http2=false:\n%s", log)
	}
}
