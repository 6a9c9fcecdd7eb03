package testserver

import (
	"context"
	"errors"
	"net"
	"net/url"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// This file imports pkg/nbd, so pkg/nbd's own tests must never import
// testserver (that would be an import cycle); they keep their own helpers.

// OneExport is an nbd.ExportSource that serves one device as the default
// export and under any other name, and lists just the default export.
type OneExport struct{ Device backends.Device }

// Open returns the device whatever the name; the server never closes it.
func (e OneExport) Open(context.Context, string) (*nbd.Export, func(), error) {
	return &nbd.Export{Device: e.Device}, func() {}, nil
}

// List advertises the default export ("").
func (e OneExport) List(context.Context) []nbd.ExportInfo { return []nbd.ExportInfo{{}} }

// NBDServer is pkg/nbd's server running inside the test process, listening
// on a unix socket and on TCP 127.0.0.1, so that real NBD clients (nbdinfo,
// nbdcopy, qemu-img, qemu-io) can be pointed at an in-process device.
type NBDServer struct {
	Sock    string // the unix socket's path
	TCPAddr string // "127.0.0.1:PORT"
}

// UnixURI is the libnbd/qemu URI of export on the unix socket
// ("nbd+unix:///EXPORT?socket=SOCK"); export is escaped as a URI path, so
// specs with '?' or '%' in them pass through intact.
func (s *NBDServer) UnixURI(export string) string {
	return "nbd+unix://" + exportPath(export) + "?socket=" + s.Sock
}

// TCPURI is the URI of export over TCP ("nbd://127.0.0.1:PORT/EXPORT").
func (s *NBDServer) TCPURI(export string) string {
	return "nbd://" + s.TCPAddr + exportPath(export)
}

func exportPath(export string) string {
	return (&url.URL{Path: "/" + export}).EscapedPath()
}

// StartNBD serves src with pkg/nbd's server until the test ends. At cleanup
// it shuts the server down (in-flight requests finish, connections close)
// and fails the test if shutdown takes over 10 s or a Serve loop ended with
// an error other than nbd.ErrServerClosed. Whatever src opened is the
// caller's to close: register that cleanup before calling StartNBD so it
// runs after the server has stopped.
func StartNBD(t testing.TB, src nbd.ExportSource) *NBDServer {
	t.Helper()
	srv, err := nbd.NewServer(nbd.ServerConfig{Exports: src})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	uln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	tln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		uln.Close()
		t.Fatal(err)
	}
	lns := []net.Listener{uln, tln}
	done := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { done <- srv.Serve(context.Background(), ln) }()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("nbd server shutdown: %v", err)
		}
		for range lns {
			if err := <-done; err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				t.Errorf("nbd server: %v", err)
			}
		}
	})
	return &NBDServer{Sock: sock, TCPAddr: tln.Addr().String()}
}

// ServeNBD serves dev (as OneExport) with pkg/nbd's server until the test
// ends and returns the unix socket's path. It does not close dev.
func ServeNBD(t testing.TB, dev backends.Device) (sock string) {
	t.Helper()
	return StartNBD(t, OneExport{dev}).Sock
}

// ServeNBDURI is ServeNBD returning the default export's
// "nbd+unix:///?socket=SOCK" URI, which libnbd tools and qemu both accept.
func ServeNBDURI(t testing.TB, dev backends.Device) string {
	t.Helper()
	return StartNBD(t, OneExport{dev}).UnixURI("")
}

// Run runs a real program (RequireTool first: skipped when missing, except
// in CI), fails the test if it exits non-zero (showing its output), and
// returns its combined stdout and stderr. The program is killed when the
// test's context ends.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	return RunContext(t, t.Context(), name, args...)
}

// RunContext is Run with the program killed when ctx is done, for tests
// that bound how long a client may hang.
func RunContext(t testing.TB, ctx context.Context, name string, args ...string) string {
	t.Helper()
	bin := RequireTool(t, name)
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}
