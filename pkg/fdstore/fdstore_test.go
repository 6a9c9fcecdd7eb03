package fdstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func startStore(t *testing.T) (*Server, *Client) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "fds.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer()
	done := make(chan struct{})
	go func() { s.Serve(l); close(done) }()
	t.Cleanup(func() { l.Close(); <-done; s.Close() })
	return s, &Client{Socket: sock}
}

func tempFile(t *testing.T, content string) *os.File {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "f")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(content); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func readAll(t *testing.T, f *os.File) string {
	t.Helper()
	b := make([]byte, 100)
	n, err := f.ReadAt(b, 0)
	if err != nil && err != io.EOF {
		t.Fatal(err)
	}
	return string(b[:n])
}

func TestPutGetReplaceDelete(t *testing.T) {
	s, c := startStore(t)
	ctx := context.Background()

	if _, err := c.Get(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get of a missing name: %v, want ErrNotFound", err)
	}
	f1 := tempFile(t, "one")
	if err := c.Put(ctx, "a", f1); err != nil {
		t.Fatal(err)
	}
	// The store keeps its own copy: closing ours does not matter.
	f1.Close()
	g, err := c.Get(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, g); got != "one" {
		t.Fatalf("read through the returned descriptor: %q", got)
	}
	// Same open file description: writes through it are visible.
	if _, err := g.WriteAt([]byte("ONE"), 0); err != nil {
		t.Fatal(err)
	}
	g.Close()

	f2 := tempFile(t, "two")
	if err := c.Put(ctx, "a", f2); err != nil {
		t.Fatal(err)
	}
	if err := c.Put(ctx, "b", f2); err != nil {
		t.Fatal(err)
	}
	g, err = c.Get(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, g); got != "two" {
		t.Fatalf("after replacing: %q", got)
	}
	if fl, err := unix.FcntlInt(g.Fd(), unix.F_GETFD, 0); err != nil || fl&unix.FD_CLOEXEC == 0 {
		t.Errorf("received descriptor flags %#x, %v: want close-on-exec", fl, err)
	}
	g.Close()

	names, err := c.List(ctx)
	if err != nil || strings.Join(names, ",") != "a,b" {
		t.Fatalf("List = %q, %v", names, err)
	}
	if err := c.Delete(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Delete: %v", err)
	}
	if _, err := c.Get(ctx, "a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after Delete: %v", err)
	}
	if s.Len() != 1 {
		t.Fatalf("Len = %d, want 1", s.Len())
	}
}

func TestBadNames(t *testing.T) {
	_, c := startStore(t)
	ctx := context.Background()
	f := tempFile(t, "x")
	for _, n := range []string{"", "a/b", "a\x00", strings.Repeat("x", MaxName+1)} {
		if err := c.Put(ctx, n, f); err == nil {
			t.Errorf("Put(%q) succeeded", n)
		}
	}
	if err := c.Put(ctx, strings.Repeat("x", MaxName), f); err != nil {
		t.Errorf("Put of a %d-byte name: %v", MaxName, err)
	}
}

// rawRequest sends one packet with fds and returns the answer packet.
func rawRequest(t *testing.T, sock string, pkt []byte, fds ...int) string {
	t.Helper()
	conn, err := net.Dial("unixpacket", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	uc.SetDeadline(time.Now().Add(5 * time.Second))
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := uc.WriteMsgUnix(pkt, oob, nil); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	n, err := uc.Read(buf)
	if err != nil {
		return "error: " + err.Error()
	}
	return string(buf[:n])
}

func TestBadMessages(t *testing.T) {
	s, c := startStore(t)
	f := tempFile(t, "x")
	fd := int(f.Fd())
	for _, tc := range []struct {
		pkt []byte
		fds []int
	}{
		{[]byte{'X', 'a'}, nil},
		{[]byte{'P', 'a'}, nil},                                   // put without a descriptor
		{[]byte{'P', 'a'}, []int{fd, fd}},                         // two
		{[]byte{'G', 'a'}, []int{fd}},                             // get with one
		{[]byte{'G'}, nil},                                        // no name
		{[]byte{'L', 'a'}, nil},                                   // list with a name
		{append([]byte{'G'}, make([]byte, maxPacket+10)...), nil}, // too long
	} {
		got := rawRequest(t, c.Socket, tc.pkt, tc.fds...)
		if !strings.HasPrefix(got, "E") {
			t.Errorf("request %q with %d fds: answer %q, want E...", tc.pkt[:min(len(tc.pkt), 8)], len(tc.fds), got)
		}
	}
	if s.Len() != 0 {
		t.Errorf("bad requests stored %d descriptors", s.Len())
	}
	// An empty packet and a client that hangs up are no trouble either.
	conn, err := net.Dial("unixpacket", c.Socket)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write(nil)
	conn.Close()
	if _, err := c.List(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A client that connects and says nothing must not hold up others.
func TestSlowClientDoesNotBlock(t *testing.T) {
	_, c := startStore(t)
	idle, err := net.Dial("unixpacket", c.Socket)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := c.Put(ctx, "a", tempFile(t, "x")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Get(ctx, "a"); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentClients(t *testing.T) {
	s, c := startStore(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("v%d", i)
			want := fmt.Sprintf("content %d", i)
			f, err := os.CreateTemp(t.TempDir(), "f")
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			f.WriteString(want)
			for range 20 {
				if err := c.Put(ctx, name, f); err != nil {
					errs <- err
					return
				}
				g, err := c.Get(ctx, name)
				if err != nil {
					errs <- err
					return
				}
				b := make([]byte, 64)
				n, _ := g.ReadAt(b, 0)
				g.Close()
				if string(b[:n]) != want {
					errs <- fmt.Errorf("%s: read %q", name, b[:n])
					return
				}
				if _, err := c.List(ctx); err != nil {
					errs <- err
					return
				}
			}
			if i%2 == 0 {
				if err := c.Delete(ctx, name); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if s.Len() != 8 {
		t.Errorf("Len = %d, want 8", s.Len())
	}
}

func TestListenRefusesLiveSocket(t *testing.T) {
	_, c := startStore(t)
	if _, err := Listen(c.Socket); err == nil {
		t.Fatal("a second Listen on a live socket succeeded")
	}
}

func TestContextCancel(t *testing.T) {
	c := &Client{Socket: filepath.Join(t.TempDir(), "none.sock")}
	if _, err := c.Get(context.Background(), "a"); err == nil {
		t.Fatal("Get without a store succeeded")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, c2 := startStore(t)
	if _, err := c2.List(ctx); err == nil {
		t.Fatal("List with a cancelled context succeeded")
	}
}

func FuzzParseRequest(f *testing.F) {
	f.Add([]byte("Pvol"), 1)
	f.Add([]byte("L"), 0)
	f.Add([]byte("Ga/b"), 0)
	f.Add([]byte("D\x00"), 0)
	f.Fuzz(func(t *testing.T, b []byte, nfds int) {
		r, err := parseRequest(b, nfds)
		if err != nil {
			return
		}
		if r.op != opList {
			if CheckName(r.name) != nil {
				t.Fatalf("accepted bad name %q", r.name)
			}
		}
		if (r.op == opPut) != (nfds == 1) || nfds > 1 {
			t.Fatalf("accepted op %q with %d fds", r.op, nfds)
		}
		if string(append([]byte{r.op}, r.name...)) != string(b) {
			t.Fatalf("round trip of %q", b)
		}
	})
}

func FuzzParseAnswer(f *testing.F) {
	f.Add([]byte("K"))
	f.Add([]byte("nvol"))
	f.Add([]byte("Ebad"))
	f.Add([]byte("N?"))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := parseAnswer(b)
		if err != nil {
			return
		}
		if a.status == stName && CheckName(a.text) != nil {
			t.Fatalf("accepted bad name %q", a.text)
		}
		if (a.status == stOK || a.status == stNotFound) && a.text != "" {
			t.Fatalf("accepted payload on %q", a.status)
		}
	})
}
