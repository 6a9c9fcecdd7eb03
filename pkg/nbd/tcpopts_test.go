package nbd

import (
	"context"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// onFD runs f on s's descriptor.
func onFD(t *testing.T, s syscall.Conn, f func(fd int)) {
	t.Helper()
	rc, err := s.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Control(func(fd uintptr) { f(int(fd)) }); err != nil {
		t.Fatal(err)
	}
}

// congestionOf reads the congestion control algorithm of a TCP socket.
func congestionOf(t *testing.T, s syscall.Conn) string {
	t.Helper()
	var name string
	var err error
	onFD(t, s, func(fd int) { name, err = unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION) })
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimRight(name, "\x00")
}

// requireOtherDefault skips a test of the loopback congestion control on
// a system whose default is that already: an untuned socket would pass.
func requireOtherDefault(t *testing.T) {
	t.Helper()
	def, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	if err != nil {
		t.Skipf("the system's congestion control: %v", err)
	}
	if strings.TrimSpace(string(def)) == loopbackCongestion {
		t.Skipf("the system's congestion control is %s already: nothing to tell apart", loopbackCongestion)
	}
}

// listenLoopback listens on a free port of host, or skips if host has no
// such address here (an IPv6-less machine).
func listenLoopback(t *testing.T, network, host string) net.Listener {
	t.Helper()
	ln, err := net.Listen(network, net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("listen on %s: %v", host, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// connect dials ln and returns the end ln accepts.
func connect(t *testing.T, ln net.Listener) *net.TCPConn {
	t.Helper()
	c, err := net.Dial(ln.Addr().Network(), ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s.(*net.TCPConn)
}

var loopbacks = []struct{ network, host string }{{"tcp4", "127.0.0.1"}, {"tcp6", "::1"}}

// An accepted connection from this host gets the loopback congestion
// control (and TCP_NODELAY).
func TestTuneTCPLoopbackCongestion(t *testing.T) {
	requireOtherDefault(t)
	for _, lo := range loopbacks {
		t.Run(lo.host, func(t *testing.T) {
			s := connect(t, listenLoopback(t, lo.network, lo.host))
			tuneTCP(s, false)
			if got := congestionOf(t, s); got != loopbackCongestion {
				t.Errorf("congestion control %q, want %q", got, loopbackCongestion)
			}
			var nd int
			var err error
			onFD(t, s, func(fd int) { nd, err = unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY) })
			if err != nil || nd == 0 {
				t.Errorf("TCP_NODELAY %d, %v: want it set", nd, err)
			}
		})
	}
}

// Connections a loopback listener accepts start with the loopback
// congestion control (so they never pace), before anything is set on them.
func TestTuneListenerLoopback(t *testing.T) {
	requireOtherDefault(t)
	for _, lo := range loopbacks {
		t.Run(lo.host, func(t *testing.T) {
			ln := listenLoopback(t, lo.network, lo.host)
			if !tuneListener(ln) {
				t.Error("a loopback listener was not tuned")
			}
			if got := congestionOf(t, connect(t, ln)); got != loopbackCongestion {
				t.Errorf("accepted connection's congestion control %q, want %q", got, loopbackCongestion)
			}
		})
	}
}

// fakeConn is a net.Conn with the addresses given, for isLoopbackConn.
type fakeConn struct {
	net.Conn
	local, remote net.Addr
}

func (f fakeConn) LocalAddr() net.Addr  { return f.local }
func (f fakeConn) RemoteAddr() net.Addr { return f.remote }

func TestIsLoopbackConn(t *testing.T) {
	tcp := func(s string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(s), Port: 10809} }
	for _, tc := range []struct {
		local, remote net.Addr
		want          bool
	}{
		{tcp("127.0.0.1"), tcp("127.0.0.1"), true},
		{tcp("127.0.0.1"), tcp("127.3.2.1"), true},
		{tcp("::1"), tcp("::1"), true},
		{tcp("::ffff:127.0.0.1"), tcp("::ffff:127.0.0.1"), true},
		{tcp("10.0.0.2"), tcp("10.0.0.3"), false},
		{tcp("127.0.0.1"), tcp("192.0.2.7"), false}, // a forwarded port
		{tcp("192.0.2.7"), tcp("127.0.0.1"), false},
		{tcp("2001:db8::1"), tcp("::1"), false},
		{&net.UnixAddr{Name: "@x", Net: "unix"}, &net.UnixAddr{Net: "unix"}, false},
	} {
		if got := isLoopbackConn(fakeConn{local: tc.local, remote: tc.remote}); got != tc.want {
			t.Errorf("%v <- %v: loopback %v, want %v", tc.local, tc.remote, got, tc.want)
		}
	}
}

// capListener hands the test each connection it accepts.
type capListener struct {
	net.Listener
	conns chan net.Conn
}

func (l capListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.conns <- c
	}
	return c, err
}

// The server's accept loop tunes its listener and what it accepts.
func TestServeTunesTCP(t *testing.T) {
	requireOtherDefault(t)
	// serve runs a server on ln until the test ends and connects to it,
	// returning once the server has greeted the client: by then it has
	// tuned both.
	serve := func(t *testing.T, ln net.Listener) {
		srv, err := NewServer(ServerConfig{Exports: staticExports{}})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- srv.Serve(context.Background(), ln) }()
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := srv.Shutdown(ctx); err != nil {
				t.Error(err)
			}
			<-done
		})
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		// Kept open: the server ends a connection whose client is gone.
		t.Cleanup(func() { c.Close() })
		greeting := make([]byte, 8)
		if _, err := io.ReadFull(c, greeting); err != nil || string(greeting) != "NBDMAGIC" {
			t.Fatalf("greeting %q, %v", greeting, err)
		}
	}
	t.Run("listener", func(t *testing.T) {
		ln := listenLoopback(t, "tcp4", "127.0.0.1")
		serve(t, ln)
		if got := congestionOf(t, ln.(*net.TCPListener)); got != loopbackCongestion {
			t.Errorf("listener's congestion control %q, want %q", got, loopbackCongestion)
		}
	})
	t.Run("accepted", func(t *testing.T) {
		// A wrapped listener is not tuned: what it accepts still is.
		ln := listenLoopback(t, "tcp4", "127.0.0.1")
		cl := capListener{ln, make(chan net.Conn, 1)}
		serve(t, cl)
		s := (<-cl.conns).(*net.TCPConn)
		if got := congestionOf(t, s); got != loopbackCongestion {
			t.Errorf("accepted connection's congestion control %q, want %q", got, loopbackCongestion)
		}
	})
}

// The client reaches a server on this host with the loopback congestion
// control from the start; other addresses are left alone.
func TestLoopbackDialControl(t *testing.T) {
	for _, lo := range loopbacks {
		t.Run(lo.host, func(t *testing.T) {
			requireOtherDefault(t)
			ln := listenLoopback(t, lo.network, lo.host)
			d := net.Dialer{Control: loopbackDialControl}
			c, err := d.Dial(lo.network, ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if got := congestionOf(t, c.(*net.TCPConn)); got != loopbackCongestion {
				t.Errorf("dialled connection's congestion control %q, want %q", got, loopbackCongestion)
			}
		})
	}
	// Not loopback, or not TCP: nothing is done (a nil RawConn would panic).
	for _, a := range []struct{ network, address string }{
		{"tcp4", "192.0.2.7:10809"}, {"tcp6", "[2001:db8::1]:10809"}, {"unix", "/run/x.sock"}, {"tcp4", "bogus"},
	} {
		if err := loopbackDialControl(a.network, a.address, nil); err != nil {
			t.Errorf("%s %s: %v", a.network, a.address, err)
		}
	}
}
