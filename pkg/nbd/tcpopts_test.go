package nbd

import (
	"context"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// congestionOf reads the congestion control algorithm of tc's socket.
func congestionOf(t *testing.T, tc syscall.Conn) string {
	t.Helper()
	rc, err := tc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var name string
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		name, gerr = unix.GetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return strings.TrimRight(name, "\x00")
}

// acceptedPair connects to a listener on addr and returns the accepted end.
func acceptedPair(t *testing.T, network, laddr, dial string) *net.TCPConn {
	t.Helper()
	ln, err := net.Listen(network, laddr)
	if err != nil {
		t.Skipf("listen %s: %v", laddr, err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	c, err := net.Dial(network, net.JoinHostPort(dial, port))
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

// A connection from this host gets the loopback congestion control, a
// connection from elsewhere keeps the system's.
func TestTuneTCPLoopbackCongestion(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{{"tcp4", "127.0.0.1"}, {"tcp6", "::1"}} {
		t.Run(tc.addr, func(t *testing.T) {
			s := acceptedPair(t, tc.network, net.JoinHostPort(tc.addr, "0"), tc.addr)
			if !isLoopbackConn(s) {
				t.Fatalf("%v <- %v: not taken for loopback", s.LocalAddr(), s.RemoteAddr())
			}
			tuneTCP(s)
			if got := congestionOf(t, s); got != loopbackCongestion {
				t.Errorf("congestion control %q, want %q", got, loopbackCongestion)
			}
			if nd, err := unix.GetsockoptInt(sockFD(t, s), unix.IPPROTO_TCP, unix.TCP_NODELAY); err != nil || nd == 0 {
				t.Errorf("TCP_NODELAY %d, %v: want it set", nd, err)
			}
		})
	}
}

// Connections a loopback listener accepts start with the loopback
// congestion control (so they never pace), before anything is set on them.
func TestTuneListenerLoopback(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{{"tcp4", "127.0.0.1"}, {"tcp6", "::1"}} {
		t.Run(tc.addr, func(t *testing.T) {
			ln, err := net.Listen(tc.network, net.JoinHostPort(tc.addr, "0"))
			if err != nil {
				t.Skipf("listen: %v", err)
			}
			defer ln.Close()
			tuneListener(ln)
			c, err := net.Dial(tc.network, ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if got := congestionOf(t, s.(*net.TCPConn)); got != loopbackCongestion {
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
	// serve runs a server on ln until the test ends and connects to it,
	// returning once the server has greeted the client: by then it has
	// tuned both.
	serve := func(t *testing.T, ln net.Listener, addr string) {
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
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		greeting := make([]byte, 8)
		if _, err := io.ReadFull(c, greeting); err != nil || string(greeting) != "NBDMAGIC" {
			t.Fatalf("greeting %q, %v", greeting, err)
		}
	}
	t.Run("listener", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		serve(t, ln, ln.Addr().String())
		if got := congestionOf(t, ln.(*net.TCPListener)); got != loopbackCongestion {
			t.Errorf("listener's congestion control %q, want %q", got, loopbackCongestion)
		}
	})
	t.Run("accepted", func(t *testing.T) {
		// A wrapped listener is not tuned: what it accepts still is.
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cl := capListener{ln, make(chan net.Conn, 1)}
		serve(t, cl, ln.Addr().String())
		s := (<-cl.conns).(*net.TCPConn)
		if got := congestionOf(t, s); got != loopbackCongestion {
			t.Errorf("accepted connection's congestion control %q, want %q", got, loopbackCongestion)
		}
	})
}

// sockFD returns tc's descriptor, for getsockopt (valid while tc is open).
func sockFD(t *testing.T, tc *net.TCPConn) int {
	t.Helper()
	rc, err := tc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		t.Fatal(err)
	}
	return fd
}
