package nbd

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// requireTool skips a test whose external peer is missing, except in CI,
// where everything is installed and a skip would hide breakage.
func requireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required in CI: %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
	return p
}

type testServer struct {
	srv  *Server
	sock string
	tcp  string
}

// startServer serves exports on a unix socket and a TCP port on 127.0.0.1.
func startServer(t testing.TB, exports ExportSource, mut ...func(*ServerConfig)) *testServer {
	t.Helper()
	cfg := ServerConfig{Exports: exports}
	for _, m := range mut {
		m(&cfg)
	}
	srv, err := NewServer(cfg)
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
		t.Fatal(err)
	}
	ctx := context.Background()
	go srv.Serve(ctx, uln)
	go srv.Serve(ctx, tln)
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
	})
	return &testServer{srv: srv, sock: sock, tcp: tln.Addr().String()}
}

// uri is the libnbd URI of an export on the unix socket.
func (s *testServer) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + s.sock
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	requireTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}
