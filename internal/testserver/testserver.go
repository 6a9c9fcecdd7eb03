// Package testserver starts real servers (nginx, versitygw, nbdkit...) as
// separate processes on 127.0.0.1 for tests, and finds the tools they need.
package testserver

import (
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
)

// RequireTool returns the path of the named program. When it is missing
// the test is skipped, except in CI (CI set in the environment), where
// .ci/run installs everything and a missing tool is a failure.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required in CI: %v", name, err)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Addr is "127.0.0.1:PORT".
func Addr(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
