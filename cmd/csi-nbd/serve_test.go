package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func requireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required in CI: %v", name, err)
		}
		t.Skipf("%s not installed", name)
	}
}

// startServe runs `csi-nbd serve ARGS` in-process on a fresh unix socket
// and returns the socket path once it is listening.
func startServe(t *testing.T, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	if got := startServeOn(t, []string{"unix://" + sock}, args...); got[0] != "unix://"+sock {
		t.Fatalf("listening on %q, want unix://%s", got[0], sock)
	}
	return sock
}

func uri(sock, export string) string {
	return "nbd+unix:///" + strings.ReplaceAll(export, "?", "%3F") + "?socket=" + sock
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	requireTool(t, name)
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

func shFails(t *testing.T, name string, args ...string) string {
	t.Helper()
	requireTool(t, name)
	out, err := exec.Command(name, args...).CombinedOutput()
	if err == nil {
		t.Fatalf("%s %q succeeded, want failure:\n%s", name, args, out)
	}
	return string(out)
}

func TestServeDefaultIsOneGiBMemory(t *testing.T) {
	sock := startServe(t)
	if got := strings.TrimSpace(sh(t, "nbdinfo", "--size", uri(sock, ""))); got != "1073741824" {
		t.Fatalf("size %s", got)
	}
	// Random data written through one connection reads back through others.
	in := filepath.Join(t.TempDir(), "in")
	data := make([]byte, 8<<20)
	rand.Read(data)
	if err := os.WriteFile(in, data, 0o600); err != nil {
		t.Fatal(err)
	}
	sh(t, "nbdcopy", "--connections=4", "--threads=4", in, uri(sock, ""))
	// qemu-img compare accepts the larger image only if its tail is zero,
	// so this checks the written data and the untouched rest at once.
	sh(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", in, "nbd:unix:"+sock)
}

func TestServeDataBootSector(t *testing.T) {
	sector := make([]byte, 512)
	rand.Read(sector)
	sector[510], sector[511] = 0x55, 0xaa
	spec := "data:;base64," + base64.StdEncoding.EncodeToString(sector)
	sock := startServe(t, "--allow", "data:*")

	info := sh(t, "nbdinfo", "--json", uri(sock, spec))
	if !strings.Contains(info, `"is_read_only": true`) || !strings.Contains(info, `"export-size": 512`) {
		t.Fatalf("unexpected info:\n%s", info)
	}
	out := filepath.Join(t.TempDir(), "sector")
	sh(t, "nbdcopy", uri(sock, spec), out)
	got, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, sector) {
		t.Fatal("boot sector read back differs")
	}
	// qemu, a second client implementation, agrees byte for byte.
	in := filepath.Join(t.TempDir(), "in")
	os.WriteFile(in, sector, 0o600)
	sh(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", in, "nbd:unix:"+sock+":exportname="+spec)
	// And writes are refused.
	msg := shFails(t, "qemu-io", "-f", "raw", "-c", "write 0 512", "nbd:unix:"+sock+":exportname="+spec)
	if !strings.Contains(msg, "ermission") && !strings.Contains(msg, "read-only") && !strings.Contains(msg, "Read-only") {
		t.Fatalf("write to data: export: %s", msg)
	}
}

func TestServeAllowAndDistinctMemoryVolumes(t *testing.T) {
	sock := startServe(t, "--allow", "size=*;memory:vol-*")
	a, b := "size=4Mi;memory:vol-a", "size=4Mi;memory:vol-b"
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "nbd:unix:"+sock+":exportname="+a)
	sh(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 0 64k", "nbd:unix:"+sock+":exportname="+b)
	// Each name is its own volume, and it keeps its data across
	// connections; a non-canonical spelling of a name is the same volume.
	sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k", "nbd:unix:"+sock+":exportname="+a)
	sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0x22 0 64k", "nbd:unix:"+sock+":exportname=size=4096Ki;memory:vol-b")
	// The default volume is untouched.
	sh(t, "qemu-io", "-f", "raw", "-c", "read -P 0 0 64k", "nbd:unix:"+sock)

	for _, name := range []string{"size=4Mi;memory:other", "data:,hello", "file:///etc/passwd"} {
		msg := shFails(t, "nbdinfo", "--size", uri(sock, name))
		if !strings.Contains(msg, "policy") && !strings.Contains(msg, "no export") {
			t.Errorf("%s: unexpected refusal %s", name, msg)
		}
	}
	msg := shFails(t, "nbdinfo", "--size", uri(sock, "sise=4Mi;memory:vol-c"))
	if !strings.Contains(msg, "sise") {
		t.Errorf("bad key not named: %s", msg)
	}
}

func TestServeBadSpecAtStart(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), []string{"serve", "--listen", "unix://" + filepath.Join(t.TempDir(), "s"), "size=12Q;memory:"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `"size"`) {
		t.Fatalf("code %d, stderr %q", code, stderr.String())
	}
	code = run(context.Background(), []string{"serve", "--listen", "http://x"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "--listen") {
		t.Fatalf("code %d, stderr %q", code, stderr.String())
	}
}

func TestHelpAndVersion(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"--version"}, &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), "csi-nbd ") {
		t.Fatalf("--version: %d %q", code, stdout.String())
	}
	stdout.Reset()
	if code := run(context.Background(), []string{"serve", "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "--allow") && !strings.Contains(stdout.String(), "-allow") {
		t.Fatalf("serve --help: %d %q", code, stdout.String())
	}
	if code := run(context.Background(), []string{"frobnicate"}, &stdout, &stderr); code != 2 {
		t.Fatalf("unknown command: %d", code)
	}
}

func TestGlobMatch(t *testing.T) {
	for _, c := range []struct {
		p, s string
		want bool
	}{
		{"*", "", true},
		{"*", "size=1Gi;memory:x", true},
		{"memory:*", "memory:a/b;c", true},
		{"memory:?", "memory:ab", false},
		{"size=*;memory:vol-*", "size=4Mi;memory:vol-a", true},
		{"size=*;memory:vol-*", "size=4Mi;memory:other", false},
		{"data:*", "xdata:,", false},
		{"a*b*c", "aXbYbZc", true},
		{"a*b*c", "aXbYbZ", false},
		{"", "x", false},
	} {
		if got := globMatch(c.p, c.s); got != c.want {
			t.Errorf("globMatch(%q, %q) = %v", c.p, c.s, got)
		}
	}
}
