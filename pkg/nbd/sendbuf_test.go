package nbd

import (
	"net"
	"os"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A unix socket connection gets a send buffer that holds whole large
// replies, past net.core.wmem_max where the process may.
func TestUnixSendBuffer(t *testing.T) {
	srv, err := NewServer(ServerConfig{Exports: staticExports{}})
	if err != nil {
		t.Fatal(err)
	}
	client, server := socketPair(t)
	defer client.Close()
	defer server.Close()
	newServerConn(srv, server)
	rc, err := server.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var got int
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		got, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF)
	}); err != nil || gerr != nil {
		t.Fatal(err, gerr)
	}
	wmemMax := unixSendBuffer
	if b, err := os.ReadFile("/proc/sys/net/core/wmem_max"); err == nil && os.Geteuid() != 0 {
		wmemMax, _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	// The kernel doubles what it is given, for its bookkeeping.
	if want := 2 * min(unixSendBuffer, wmemMax); got < want {
		t.Fatalf("send buffer %d bytes, want at least %d", got, want)
	}
}
