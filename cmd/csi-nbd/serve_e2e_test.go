package main

// End-to-end tests of `csi-nbd serve`: TLS, --readonly and several
// listeners in-process through run(), and signals, stale sockets and the
// version stamp on the real binary, built once per test run.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/testpki"
)

// testVersion is stamped into the binary the signal tests run.
const testVersion = "v9.9.9-test"

var (
	binOnce sync.Once
	binDir  string
	binPath string
	binErr  error
)

func TestMain(m *testing.M) {
	if dir := os.Getenv("CSI_NBD_TEST_WRITER"); dir != "" {
		os.Exit(runTestWriter(dir)) // a helper process, see fuseloop_resume_e2e_test.go
	}
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// realBinary builds the csi-nbd binary (once per test run) with the
// version stamped to testVersion.
func realBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "csi-nbd-e2e")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "csi-nbd")
		out, err := exec.Command("go", "build", "-ldflags", "-X main.version="+testVersion, "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// startServeOn runs `csi-nbd serve` in-process with one --listen per
// element of listen, then args, and returns the addresses it printed
// (tcp://HOST:PORT with the real port, or unix://PATH), in order.
func startServeOn(t *testing.T, listen []string, args ...string) []string {
	t.Helper()
	var full []string
	full = append(full, "serve")
	for _, l := range listen {
		full = append(full, "--listen", l)
	}
	full = append(full, args...)
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	stderr := &syncBuffer{}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, full, pw, stderr)
		pw.Close()
	}()
	br := bufio.NewReader(pr)
	var addrs []string
	for range listen {
		line, err := br.ReadString('\n')
		if err != nil {
			cancel()
			t.Fatalf("serve did not start: %v; stderr: %s", err, stderr.String())
		}
		a, ok := strings.CutPrefix(strings.TrimSpace(line), "listening on ")
		if !ok {
			cancel()
			t.Fatalf("unexpected line %q", line)
		}
		addrs = append(addrs, a)
	}
	go io.Copy(io.Discard, br)
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			if code != 0 {
				t.Errorf("serve exited %d: %s", code, stderr.String())
			}
		case <-time.After(30 * time.Second):
			t.Errorf("serve did not stop on cancel")
		}
		for _, a := range addrs {
			if p, ok := strings.CutPrefix(a, "unix://"); ok {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("socket left behind: %v", err)
				}
			}
		}
	})
	return addrs
}

// tcpHostPort turns tcp://HOST:PORT into HOST:PORT.
func tcpHostPort(t *testing.T, addr string) string {
	t.Helper()
	hp, ok := strings.CutPrefix(addr, "tcp://")
	if !ok {
		t.Fatalf("not a tcp address: %q", addr)
	}
	if _, port, err := net.SplitHostPort(hp); err != nil || port == "0" {
		t.Fatalf("bad listening address %q: %v", addr, err)
	}
	return hp
}

// runServeErr runs `csi-nbd serve ARGS` in-process, expecting it to exit
// before serving.
func runServeErr(t *testing.T, args ...string) (int, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	sock := filepath.Join(t.TempDir(), "s")
	code := run(context.Background(), append([]string{"serve", "--listen", "unix://" + sock}, args...), &stdout, &stderr)
	if stdout.Len() != 0 {
		t.Errorf("serve %q printed %q", args, stdout.String())
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("serve %q left a socket behind", args)
	}
	return code, stderr.String()
}

// ---- TLS ----

// tlsDirs makes a throwaway CA and writes nbdkit-style server certificates
// to srv, and libnbd-style client directories: withCert has a client
// certificate, caOnly only the CA.
func tlsDirs(t *testing.T) (srv, withCert, caOnly string) {
	t.Helper()
	ca := testpki.NewCA(t, "csi-nbd serve test CA")
	return ca.ServerDir(t), ca.ClientDir(t, true), ca.ClientDir(t, false)
}

func TestServeTLSRequire(t *testing.T) {
	requireTool(t, "nbdinfo")
	srvDir, clientDir, caOnly := tlsDirs(t)
	hp := tcpHostPort(t, startServeOn(t, []string{"tcp://127.0.0.1:0"}, "--tls=require", "--tls-certificates", srvDir)[0])

	// Over TLS, with or without a client certificate (none is demanded).
	for _, dir := range []string{clientDir, caOnly} {
		if got := strings.TrimSpace(sh(t, "nbdinfo", "--size", "nbds://"+hp+"/?tls-certificates="+dir)); got != "1073741824" {
			t.Fatalf("size over TLS (%s): %s", filepath.Base(dir), got)
		}
	}
	// In the clear, refused.
	msg := shFails(t, "nbdinfo", "--size", "nbd://"+hp+"/")
	if !strings.Contains(strings.ToLower(msg), "tls") {
		t.Errorf("plain connection refused without mentioning TLS: %s", msg)
	}
}

func TestServeTLSVerifyPeer(t *testing.T) {
	requireTool(t, "nbdinfo")
	srvDir, clientDir, caOnly := tlsDirs(t)
	hp := tcpHostPort(t, startServeOn(t, []string{"tcp://127.0.0.1:0"},
		"--tls=require", "--tls-certificates", srvDir, "--tls-verify-peer")[0])
	if got := strings.TrimSpace(sh(t, "nbdinfo", "--size", "nbds://"+hp+"/?tls-certificates="+clientDir)); got != "1073741824" {
		t.Fatalf("size with a client certificate: %s", got)
	}
	shFails(t, "nbdinfo", "--size", "nbds://"+hp+"/?tls-certificates="+caOnly)
	shFails(t, "nbdinfo", "--size", "nbd://"+hp+"/")
	// The server survives refused handshakes.
	sh(t, "nbdinfo", "--size", "nbds://"+hp+"/?tls-certificates="+clientDir)
}

func TestServeTLSBadFlags(t *testing.T) {
	srvDir, _, _ := tlsDirs(t)
	// Server certificates but no CA to verify clients with.
	noCA, _, _ := tlsDirs(t)
	if err := os.Remove(filepath.Join(noCA, "ca-cert.pem")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--tls=require"}, "--tls-certificates"},
		{[]string{"--tls=on"}, "--tls-certificates"},
		{[]string{"--tls=bogus"}, "--tls"},
		{[]string{"--tls=bogus", "--tls-certificates", srvDir}, `"bogus"`},
		{[]string{"--tls=require", "--tls-certificates", t.TempDir()}, "--tls-certificates"},
		{[]string{"--tls=require", "--tls-certificates", noCA, "--tls-verify-peer"}, "--tls-verify-peer"},
	} {
		code, stderr := runServeErr(t, tc.args...)
		if code != 1 || !strings.Contains(stderr, tc.want) {
			t.Errorf("serve %q: exit %d, stderr %q; want 1 and %q", tc.args, code, stderr, tc.want)
		}
	}
}

// ---- --readonly, listeners ----

func TestServeReadonly(t *testing.T) {
	sock := startServe(t, "--readonly")
	info := sh(t, "nbdinfo", "--json", uri(sock, ""))
	if !strings.Contains(info, `"is_read_only": true`) {
		t.Fatalf("not read-only:\n%s", info)
	}
	msg := shFails(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "nbd:unix:"+sock)
	if !strings.Contains(msg, "ermission") && !strings.Contains(msg, "read-only") && !strings.Contains(msg, "Read-only") {
		t.Fatalf("write to a read-only server: %s", msg)
	}
	// Reads work (qemu must open the export read-only: -r).
	sh(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 64k", "-c", "read -P 0 1m 64k", "nbd:unix:"+sock)
	sh(t, "nbdcopy", uri(sock, ""), filepath.Join(t.TempDir(), "copy"))
}

func TestServeTwoListenersOneVolume(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	addrs := startServeOn(t, []string{"unix://" + sock, "tcp://127.0.0.1:0"})
	if addrs[0] != "unix://"+sock {
		t.Fatalf("first listener %q", addrs[0])
	}
	tcp := "nbd://" + tcpHostPort(t, addrs[1])
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "nbd:unix:"+sock)
	sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", tcp)
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0xa5 64k 64k", tcp)
	sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0xa5 64k 64k", "nbd:unix:"+sock)
}

// ---- the real binary: signals, stale sockets, version ----

// syncBuffer is a bytes.Buffer safe for a writer and concurrent readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type binServer struct {
	cmd            *exec.Cmd
	sock           string
	stdout, stderr *syncBuffer
	done           chan struct{} // closed when the process has exited
	err            error         // Wait's result, valid after done
}

// startBinary runs the real binary's `serve --listen unix://SOCK ARGS`
// and waits until it is listening.
func startBinary(t *testing.T, sock string, args ...string) *binServer {
	t.Helper()
	bin := realBinary(t)
	s := &binServer{sock: sock, stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(bin, append([]string{"serve", "--listen", "unix://" + sock}, args...)...)
	s.cmd.Stdout, s.cmd.Stderr = s.stdout, s.stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.err = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	want := "listening on unix://" + sock + "\n"
	for deadline := time.Now().Add(10 * time.Second); !strings.HasPrefix(s.stdout.String(), want); {
		select {
		case <-s.done:
			t.Fatalf("server exited before listening: %v\nstdout: %s\nstderr: %s", s.err, s.stdout, s.stderr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not listening after 10s\nstdout: %s\nstderr: %s", s.stdout, s.stderr)
		}
	}
	return s
}

// stop sends sig and requires a clean exit (status 0, no panic, socket
// removed) within limit.
func (s *binServer) stop(t *testing.T, sig syscall.Signal, limit time.Duration) {
	t.Helper()
	start := time.Now()
	if err := s.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.done:
	case <-time.After(limit):
		t.Fatalf("server did not exit within %v of %v\nstderr: %s", limit, sig, s.stderr)
	}
	t.Logf("exited %v after %v", sig, time.Since(start).Round(time.Millisecond))
	if s.err != nil {
		t.Errorf("exit after %v: %v\nstderr: %s", sig, s.err, s.stderr)
	}
	if e := s.stderr.String(); strings.Contains(e, "panic") || strings.Contains(e, "goroutine ") {
		t.Errorf("server panicked:\n%s", e)
	}
	if _, err := os.Stat(s.sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind after %v: %v", sig, err)
	}
}

// shortSock is a unix socket path short enough for sun_path even when
// TMPDIR is long.
func shortSock(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "cne")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s")
}

func TestBinarySIGTERMDuringCopy(t *testing.T) {
	requireTool(t, "nbdcopy")
	const shutdownTimeout = 10 * time.Second
	sock := shortSock(t)
	srv := startBinary(t, sock, "--shutdown-timeout", shutdownTimeout.String(), "-v=2")

	in := filepath.Join(t.TempDir(), "in")
	data := make([]byte, 256<<20)
	r := mrand.NewChaCha8([32]byte{1})
	r.Read(data)
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	data = nil
	copyCmd := exec.Command("nbdcopy", "--connections=4", "--threads=4", in, uri(sock, ""))
	var copyOut syncBuffer
	copyCmd.Stdout, copyCmd.Stderr = &copyOut, &copyOut
	if err := copyCmd.Start(); err != nil {
		t.Fatal(err)
	}
	copyDone := make(chan error, 1)
	go func() { copyDone <- copyCmd.Wait() }()
	defer func() {
		copyCmd.Process.Kill()
		<-copyDone
	}()
	// Signal once all four connections are transferring data.
	for deadline := time.Now().Add(10 * time.Second); strings.Count(srv.stderr.String(), "NBD transmission started") < 4; {
		if time.Now().After(deadline) {
			t.Fatalf("nbdcopy did not connect\nnbdcopy: %s\nserver: %s", copyOut.String(), srv.stderr)
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	select {
	case err := <-copyDone:
		copyDone <- err
		t.Logf("nbdcopy finished before SIGTERM (%v); shutdown is tested without traffic", err)
	default:
	}
	srv.stop(t, syscall.SIGTERM, shutdownTimeout)
	select {
	case err := <-copyDone:
		copyDone <- err
		t.Logf("nbdcopy: %v: %s", err, strings.TrimSpace(copyOut.String()))
	case <-time.After(10 * time.Second):
		t.Errorf("nbdcopy still running 10s after the server exited")
	}
}

func TestBinarySIGINT(t *testing.T) {
	srv := startBinary(t, shortSock(t))
	srv.stop(t, syscall.SIGINT, 5*time.Second)
}

func TestBinaryStaleSocket(t *testing.T) {
	requireTool(t, "nbdinfo")
	sock := shortSock(t)
	first := startBinary(t, sock)
	first.cmd.Process.Kill()
	<-first.done
	if fi, err := os.Lstat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("no stale socket after kill -9: %v", err)
	}
	second := startBinary(t, sock)
	if got := strings.TrimSpace(sh(t, "nbdinfo", "--size", uri(sock, ""))); got != "1073741824" {
		t.Fatalf("size from the second server: %s", got)
	}
	second.stop(t, syscall.SIGTERM, 5*time.Second)

	// A regular file in the way is never removed.
	if err := os.WriteFile(sock, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(realBinary(t), "serve", "--listen", "unix://"+sock).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--listen") {
		t.Fatalf("serve over a regular file: %v: %s", err, out)
	}
	if b, err := os.ReadFile(sock); err != nil || string(b) != "precious" {
		t.Fatalf("regular file at the socket path was touched: %v %q", err, b)
	}
}

func TestBinaryVersion(t *testing.T) {
	out, err := exec.Command(realBinary(t), "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("--version: %v: %s", err, out)
	}
	if got, want := string(out), "csi-nbd "+testVersion+"\n"; got != want {
		t.Fatalf("--version printed %q, want %q", got, want)
	}
}
