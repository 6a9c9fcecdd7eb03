package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
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

// clientRequireTool skips the test if the binary is missing, except in CI
// (CI set), where a skip would hide breakage.
func clientRequireTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is required in CI but not found: %v", name, err)
		}
		t.Skipf("%s not installed: %v", name, err)
	}
}

// clientShortTempDir is a temp dir with a short path (unix socket paths
// are limited to 108 bytes; t.TempDir embeds the test name).
func clientShortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

type clientLockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *clientLockedBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *clientLockedBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

type clientNbdkit struct {
	sock   string
	uri    string // nbd+unix URI of the default export
	cmd    *exec.Cmd
	exited chan struct{}
	stderr *clientLockedBuf
}

// clientStartNbdkit runs `nbdkit -f -U SOCK ARGS...` and waits until it
// listens. It is killed at cleanup.
func clientStartNbdkit(t testing.TB, args ...string) *clientNbdkit {
	t.Helper()
	clientRequireTool(t, "nbdkit")
	dir := clientShortTempDir(t)
	k := &clientNbdkit{sock: filepath.Join(dir, "s"), exited: make(chan struct{}), stderr: &clientLockedBuf{}}
	k.uri = "nbd+unix:///?socket=" + k.sock
	pidFile := filepath.Join(dir, "pid")
	k.cmd = exec.Command("nbdkit", append([]string{"-f", "--exit-with-parent", "-U", k.sock, "-P", pidFile}, args...)...)
	k.cmd.Stdout, k.cmd.Stderr = k.stderr, k.stderr
	if err := k.cmd.Start(); err != nil {
		t.Fatalf("starting nbdkit: %v", err)
	}
	go func() { k.cmd.Wait(); close(k.exited) }()
	t.Cleanup(k.kill)
	deadline := time.Now().Add(15 * time.Second)
	for {
		// nbdkit writes the pid file once it is listening.
		if b, err := os.ReadFile(pidFile); err == nil && len(b) > 0 && b[len(b)-1] == '\n' {
			return k
		}
		select {
		case <-k.exited:
			t.Fatalf("nbdkit %v exited early: %s", args, k.stderr)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdkit %v did not start: %s", args, k.stderr)
		}
	}
}

func (k *clientNbdkit) kill() {
	k.cmd.Process.Kill()
	<-k.exited
}

func clientCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func clientDial(t testing.TB, uri string, cfg ClientConfig) *Client {
	t.Helper()
	c, err := Dial(clientCtx(t, 10*time.Second), uri, cfg)
	if err != nil {
		t.Fatalf("Dial(%s): %v", uri, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func clientRandBytes(n int, seed uint64) []byte {
	r := mrand.New(mrand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func clientWantErrno(t testing.TB, err error, want syscall.Errno) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("got error %v, want errors.Is(err, %v)", err, want)
	}
	var ne *Error
	if !errors.As(err, &ne) {
		t.Fatalf("error %v is not an *nbd.Error", err)
	}
}

func TestClientParseURI(t *testing.T) {
	for _, tc := range []struct {
		uri, network, addr, export string
		tls                        bool
		bad                        bool
	}{
		{uri: "nbd://example.com/disk", network: "tcp", addr: "example.com:10809", export: "disk"},
		{uri: "nbd://example.com:1234/", network: "tcp", addr: "example.com:1234"},
		{uri: "nbd://example.com", network: "tcp", addr: "example.com:10809"},
		{uri: "nbd:///foo", network: "tcp", addr: "localhost:10809", export: "foo"},
		{uri: "nbd://[::1]:99/a%20b%2Fc", network: "tcp", addr: "[::1]:99", export: "a b/c"},
		{uri: "nbd://h//abs", network: "tcp", addr: "h:10809", export: "/abs"},
		{uri: "nbds://h/x", network: "tcp", addr: "h:10809", export: "x", tls: true},
		{uri: "nbd+unix:///exp?socket=/run/nbd.sock", network: "unix", addr: "/run/nbd.sock", export: "exp"},
		{uri: "nbd+unix://?socket=/tmp/a%20b", network: "unix", addr: "/tmp/a b"},
		{uri: "nbds+unix:///e?socket=/s", network: "unix", addr: "/s", export: "e", tls: true},
		{uri: "NBD://h/x", network: "tcp", addr: "h:10809", export: "x"},
		{uri: "nbd+unix:///exp", bad: true},
		{uri: "nbd+unix://host/exp?socket=/s", bad: true},
		{uri: "nbd://h:0/", bad: true},
		{uri: "nbd://h:99999/", bad: true},
		{uri: "nbd://h/x?socket=/s", bad: true},
		{uri: "http://h/x", bad: true},
		{uri: "nbd+vsock://1/x", bad: true},
		{uri: "nbd:foo", bad: true},
		{uri: "nbd://user@h/x", bad: true},
		{uri: "/dev/nbd0", bad: true},
		{uri: "nbd://h/%zz", bad: true},
		{uri: "nbd://]", bad: true},
		{uri: "nbd://a]b:1/", bad: true},
	} {
		network, addr, export, tls, err := ParseURI(tc.uri)
		if tc.bad {
			if err == nil {
				t.Errorf("ParseURI(%q) = %q %q %q %v, want error", tc.uri, network, addr, export, tls)
			}
			continue
		}
		if err != nil || network != tc.network || addr != tc.addr || export != tc.export || tls != tc.tls {
			t.Errorf("ParseURI(%q) = %q %q %q %v %v, want %q %q %q %v", tc.uri, network, addr, export, tls, err,
				tc.network, tc.addr, tc.export, tc.tls)
		}
	}
}

func TestClientHandshake(t *testing.T) {
	k := clientStartNbdkit(t, "--filter=exportname", "memory", "64M", "exportdesc=fixed:test disk")
	c := clientDial(t, k.uri, ClientConfig{})
	if c.Size() != 64<<20 {
		t.Errorf("Size = %d", c.Size())
	}
	want := uint16(FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes |
		FlagCanMultiConn | FlagSendCache | FlagSendFastZero)
	if f := c.Flags(); f&want != want || f&FlagReadOnly != 0 {
		t.Errorf("Flags = %#x, want at least %#x and not read-only", f, want)
	}
	if !c.StructuredReplies() {
		t.Error("structured replies not negotiated")
	}
	if _, ok := c.MetaContext(AllocationContext); !ok {
		t.Error("base:allocation not negotiated")
	}
	minBS, pref, maxBS := c.BlockSize()
	if minBS < 1 || pref < minBS || maxBS < pref {
		t.Errorf("BlockSize = %d %d %d", minBS, pref, maxBS)
	}
	if c.Description() != "test disk" {
		t.Errorf("Description = %q", c.Description())
	}
	if err := c.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := c.ReadAt(context.Background(), make([]byte, 512), 0); !errors.Is(err, ErrClientClosed) || !errors.Is(err, net.ErrClosed) {
		t.Errorf("ReadAt after Close = %v, want ErrClientClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}

	t.Run("tcp", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		clientRequireTool(t, "nbdkit")
		cmd := exec.Command("nbdkit", "-f", "--exit-with-parent", "-p", fmt.Sprint(port), "-i", "127.0.0.1", "memory", "1G")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		uri := fmt.Sprintf("nbd://127.0.0.1:%d/", port)
		var c *Client
		for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
			c, err = Dial(clientCtx(t, 5*time.Second), uri, ClientConfig{})
			if err == nil || time.Since(start) > 10*time.Second {
				break
			}
		}
		if err != nil {
			t.Fatalf("Dial(%s): %v", uri, err)
		}
		defer c.Close()
		if c.Size() != 1<<30 {
			t.Errorf("Size = %d", c.Size())
		}
		data := clientRandBytes(1<<20, 1)
		ctx := clientCtx(t, 10*time.Second)
		if err := c.WriteAt(ctx, data, 1<<29, 0); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(data))
		if err := c.ReadAt(ctx, got, 1<<29); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read back over TCP: err=%v equal=%v", err, bytes.Equal(got, data))
		}
	})
}

// clientModelIO runs random writes and verifying reads from many
// goroutines, each owning a region (so a local model is exact).
type clientIO interface {
	ReadAt(ctx context.Context, p []byte, off uint64) error
	WriteAt(ctx context.Context, p []byte, off uint64, flags uint16) error
}

func clientModelIO(t *testing.T, c clientIO, start uint64, workers, regionSize, ops, maxIO int) {
	ctx := clientCtx(t, 60*time.Second)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := mrand.New(mrand.NewPCG(uint64(w), 42))
			base := start + uint64(w*regionSize)
			model := make([]byte, regionSize) // nbdkit memory starts zeroed
			buf := make([]byte, maxIO)
			for i := 0; i < ops; i++ {
				n := 1 + rnd.IntN(maxIO)
				off := rnd.IntN(regionSize - n + 1)
				if rnd.IntN(2) == 0 {
					p := buf[:n]
					for j := range p {
						p[j] = byte(rnd.Uint32())
					}
					if err := c.WriteAt(ctx, p, base+uint64(off), 0); err != nil {
						errs <- fmt.Errorf("worker %d: WriteAt(%d, %d): %w", w, off, n, err)
						return
					}
					copy(model[off:], p)
				} else {
					p := buf[:n]
					if err := c.ReadAt(ctx, p, base+uint64(off)); err != nil {
						errs <- fmt.Errorf("worker %d: ReadAt(%d, %d): %w", w, off, n, err)
						return
					}
					if !bytes.Equal(p, model[off:off+n]) {
						errs <- fmt.Errorf("worker %d: ReadAt(%d, %d) returned wrong data", w, off, n)
						return
					}
				}
			}
			// Final full-region check.
			all := make([]byte, regionSize)
			if err := c.ReadAt(ctx, all, base); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(all, model) {
				errs <- fmt.Errorf("worker %d: region differs from model", w)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClientConcurrentIO(t *testing.T) {
	k := clientStartNbdkit(t, "memory", "64M")
	c := clientDial(t, k.uri, ClientConfig{})
	clientModelIO(t, c, 0, 32, 1<<20, 300, 64<<10)
}

func TestClientSplitsLargeRequests(t *testing.T) {
	// The server refuses requests above 64 KiB, so large reads and writes
	// only work if the client splits them.
	k := clientStartNbdkit(t, "--filter=blocksize-policy", "memory", "16M",
		"blocksize-maximum=65536", "blocksize-error-policy=error")
	c := clientDial(t, k.uri, ClientConfig{})
	if _, _, maxBS := c.BlockSize(); maxBS != 65536 {
		t.Fatalf("max block size = %d, want 65536", maxBS)
	}
	ctx := clientCtx(t, 20*time.Second)
	data := clientRandBytes(3<<20+12345, 7)
	if err := c.WriteAt(ctx, data, 4096, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if err := c.ReadAt(ctx, got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("large read differs from large write")
	}
	// A raw oversized request is refused by the server.
	clientWantErrno(t, c.Do(ctx, CmdRead, 0, 0, 128<<10, nil, nil), syscall.EINVAL)
	if err := c.ReadAt(ctx, got[:512], 0); err != nil {
		t.Fatalf("connection unusable after EINVAL: %v", err)
	}
	clientModelIO(t, c, 4<<20, 8, 1<<20, 100, 300<<10)
}

func TestClientWriteFlagsFlushTrimZero(t *testing.T) {
	k := clientStartNbdkit(t, "memory", "8M")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 20*time.Second)
	data := clientRandBytes(1<<20, 3)
	if err := c.WriteAt(ctx, data, 0, CmdFlagFUA); err != nil {
		t.Fatalf("FUA write: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
	if err := c.Cache(ctx, 0, 1<<20); err != nil {
		t.Fatalf("Cache: %v", err)
	}
	check := func(what string, off int, want []byte) {
		t.Helper()
		got := make([]byte, len(want))
		if err := c.ReadAt(ctx, got, uint64(off)); err != nil {
			t.Fatalf("%s: ReadAt: %v", what, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: wrong data", what)
		}
	}
	check("after FUA write", 0, data)
	zero := make([]byte, 64<<10)

	if err := c.Trim(ctx, 64<<10, 64<<10, 0); err != nil {
		t.Fatalf("Trim: %v", err)
	}
	check("after trim", 64<<10, zero)
	if err := c.Zero(ctx, 128<<10, 64<<10, CmdFlagNoHole|CmdFlagFUA); err != nil {
		t.Fatalf("Zero(NoHole|FUA): %v", err)
	}
	check("after zero no-hole", 128<<10, zero)
	if err := c.Zero(ctx, 192<<10, 64<<10, CmdFlagFastZero); err != nil {
		t.Fatalf("Zero(FastZero): %v", err)
	}
	check("after fast zero", 192<<10, zero)
	check("untouched", 256<<10, data[256<<10:])
	if err := c.Zero(ctx, 0, 1, 1<<7); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Zero with bogus flag: %v", err)
	}
	if err := c.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}
}

func TestClientFastZeroUnsupported(t *testing.T) {
	// Make the server refuse fast zero but keep normal zeroing.
	k := clientStartNbdkit(t, "--filter=nozero", "memory", "1M", "zeromode=plugin", "fastzeromode=none")
	c := clientDial(t, k.uri, ClientConfig{})
	if c.Flags()&FlagSendFastZero != 0 {
		t.Skip("server still advertises fast zero")
	}
	ctx := clientCtx(t, 10*time.Second)
	clientWantErrno(t, c.Zero(ctx, 0, 4096, CmdFlagFastZero), syscall.ENOTSUP)
	if err := c.Zero(ctx, 0, 4096, 0); err != nil {
		t.Fatalf("plain Zero: %v", err)
	}
}

type clientExtent struct {
	id     uint32
	length uint64
	status uint32
}

func TestClientBlockStatus(t *testing.T) {
	k := clientStartNbdkit(t, "memory", "8M")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 20*time.Second)
	id, ok := c.MetaContext(AllocationContext)
	if !ok {
		t.Fatal("no base:allocation")
	}
	status := func(off, length uint64, flags uint16) []clientExtent {
		t.Helper()
		var ex []clientExtent
		err := c.BlockStatus(ctx, off, length, flags, func(cid uint32, l uint64, s uint32) {
			ex = append(ex, clientExtent{cid, l, s})
		})
		if err != nil {
			t.Fatalf("BlockStatus(%d, %d, %#x): %v", off, length, flags, err)
		}
		return ex
	}
	// statusAt walks the extents and returns the status of byte off.
	statusAt := func(ex []clientExtent, start, off uint64) uint32 {
		t.Helper()
		pos := start
		for _, e := range ex {
			if e.id != id {
				t.Fatalf("extent for context %d, want %d", e.id, id)
			}
			if off < pos+e.length {
				return e.status
			}
			pos += e.length
		}
		t.Fatalf("offset %d not covered by extents %v", off, ex)
		return 0
	}

	ex := status(0, 8<<20, 0)
	if s := statusAt(ex, 0, 0); s != BlockStatusHole|BlockStatusZero {
		t.Fatalf("fresh disk status %#x, want hole|zero (extents %v)", s, ex)
	}

	if err := c.WriteAt(ctx, clientRandBytes(256<<10, 5), 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	ex = status(0, 8<<20, 0)
	for _, tc := range []struct {
		off  uint64
		want uint32
	}{
		{0, BlockStatusHole | BlockStatusZero},
		{1 << 20, 0},
		{1<<20 + 200<<10, 0},
		{1<<20 + 256<<10, BlockStatusHole | BlockStatusZero},
		{7 << 20, BlockStatusHole | BlockStatusZero},
	} {
		if s := statusAt(ex, 0, tc.off); s != tc.want {
			t.Errorf("after write: status at %d = %#x, want %#x (extents %v)", tc.off, s, tc.want, ex)
		}
	}

	// Trim half of it: that half becomes a hole again.
	if err := c.Trim(ctx, 1<<20, 128<<10, 0); err != nil {
		t.Fatal(err)
	}
	ex = status(1<<20, 256<<10, 0)
	if s := statusAt(ex, 1<<20, 1<<20); s&BlockStatusHole == 0 {
		t.Errorf("after trim: status %#x, want hole (extents %v)", s, ex)
	}
	if s := statusAt(ex, 1<<20, 1<<20+128<<10); s != 0 {
		t.Errorf("after trim: untrimmed status %#x, want data (extents %v)", s, ex)
	}
	// And reads there return zeroes.
	got := bytes.Repeat([]byte{0xff}, 128<<10)
	if err := c.ReadAt(ctx, got, 1<<20); err != nil || !bytes.Equal(got, make([]byte, 128<<10)) {
		t.Fatalf("read of trimmed range: err=%v zero=%v", err, bytes.Equal(got, make([]byte, 128<<10)))
	}

	// REQ_ONE: exactly one extent, not longer than asked.
	ex = status(0, 4<<20, CmdFlagReqOne)
	if len(ex) != 1 || ex[0].length > 4<<20 || ex[0].length == 0 {
		t.Fatalf("REQ_ONE extents %v", ex)
	}
	if ex[0].status != BlockStatusHole|BlockStatusZero || ex[0].length > 1<<20+128<<10 {
		t.Errorf("REQ_ONE extent %v, want a hole of at most 1.125 MiB", ex[0])
	}

	// Without meta contexts, BlockStatus is refused locally.
	c2 := clientDial(t, k.uri, ClientConfig{MetaContexts: []string{}})
	if _, ok := c2.MetaContext(AllocationContext); ok {
		t.Error("meta context negotiated although none requested")
	}
	clientWantErrno(t, c2.BlockStatus(ctx, 0, 4096, 0, nil), syscall.ENOTSUP)
}

func TestClientReadHoles(t *testing.T) {
	k := clientStartNbdkit(t, "memory", "32M")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 10*time.Second)
	if err := c.WriteAt(ctx, []byte("hello"), 5<<20, 0); err != nil {
		t.Fatal(err)
	}
	got := bytes.Repeat([]byte{0xee}, 10<<20)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 10<<20)
	copy(want[5<<20:], "hello")
	if !bytes.Equal(got, want) {
		t.Fatal("read over holes did not return zeroes and data")
	}
}

func TestClientReadOnly(t *testing.T) {
	k := clientStartNbdkit(t, "-r", "data", "1 2 3 @4096 4 5 6", "size=1M")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 10*time.Second)
	if c.Flags()&FlagReadOnly == 0 {
		t.Fatalf("Flags = %#x, want read-only", c.Flags())
	}
	got := make([]byte, 4099)
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:3], []byte{1, 2, 3}) || !bytes.Equal(got[4096:], []byte{4, 5, 6}) {
		t.Fatalf("data: %v ... %v", got[:3], got[4096:])
	}
	clientWantErrno(t, c.WriteAt(ctx, []byte{1}, 0, 0), syscall.EPERM)
	clientWantErrno(t, c.Trim(ctx, 0, 4096, 0), syscall.EPERM)
	clientWantErrno(t, c.Zero(ctx, 0, 4096, 0), syscall.EPERM)
	// The same refused by the server itself:
	clientWantErrno(t, c.Do(ctx, CmdWrite, 0, 0, 3, []byte{7, 7, 7}, nil), syscall.EPERM)
	clientWantErrno(t, c.Do(ctx, CmdWriteZeroes, 0, 0, 4096, nil, nil), syscall.EPERM)
	if err := c.ReadAt(ctx, got[:3], 0); err != nil || !bytes.Equal(got[:3], []byte{1, 2, 3}) {
		t.Fatalf("read after refused write: %v %v", err, got[:3])
	}
}

func TestClientOutOfRange(t *testing.T) {
	for _, sr := range []bool{true, false} {
		t.Run(fmt.Sprintf("structured=%v", sr), func(t *testing.T) {
			k := clientStartNbdkit(t, "memory", "1M")
			c := clientDial(t, k.uri, ClientConfig{NoStructuredReplies: !sr})
			ctx := clientCtx(t, 10*time.Second)
			buf := make([]byte, 4096)
			clientWantErrno(t, c.ReadAt(ctx, buf, 1<<20-512), syscall.EINVAL)
			// Writes past the end: the spec (and nbdkit) say ENOSPC.
			clientWantErrno(t, c.WriteAt(ctx, buf, 1<<20, 0), syscall.ENOSPC)
			clientWantErrno(t, c.Do(ctx, CmdRead, 0, 1<<40, 4096, nil, buf), syscall.EINVAL)
			clientWantErrno(t, c.Do(ctx, 99, 0, 0, 0, nil, nil), syscall.EINVAL)
			var ne *Error
			errors.As(c.ReadAt(ctx, buf, 1<<20), &ne)
			if ne == nil || ne.Cmd != CmdRead || !strings.Contains(ne.Error(), "NBD_CMD_READ") {
				t.Errorf("error %v does not name the command", ne)
			}
			if err := c.ReadAt(ctx, buf, 1<<20-4096); err != nil {
				t.Fatalf("in-range read after errors: %v", err)
			}
		})
	}
}

func TestClientServerErrors(t *testing.T) {
	k := clientStartNbdkit(t, "--filter=error", "memory", "1M",
		"error-pread=EIO", "error-pread-rate=100%",
		"error-pwrite=ENOSPC", "error-pwrite-rate=100%",
		"error-trim=ENOMEM", "error-trim-rate=100%")
	for _, sr := range []bool{true, false} {
		c := clientDial(t, k.uri, ClientConfig{NoStructuredReplies: !sr})
		ctx := clientCtx(t, 10*time.Second)
		clientWantErrno(t, c.ReadAt(ctx, make([]byte, 4096), 0), syscall.EIO)
		clientWantErrno(t, c.WriteAt(ctx, make([]byte, 4096), 0, 0), syscall.ENOSPC)
		clientWantErrno(t, c.Trim(ctx, 0, 4096, 0), syscall.ENOMEM)
		if err := c.Zero(ctx, 0, 4096, 0); err != nil {
			t.Fatalf("Zero: %v", err)
		}
		// Big split reads fail as a whole but leave the connection usable.
		clientWantErrno(t, c.ReadAt(ctx, make([]byte, 1<<20), 0), syscall.EIO)
		if err := c.Flush(ctx); err != nil {
			t.Fatalf("Flush: %v", err)
		}
	}
}

func TestClientServerShutdown(t *testing.T) {
	// ESHUTDOWN obliges the client to stop and disconnect.
	k := clientStartNbdkit(t, "--filter=error", "memory", "1M", "error-pread=ESHUTDOWN", "error-pread-rate=100%")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 10*time.Second)
	clientWantErrno(t, c.ReadAt(ctx, make([]byte, 512), 0), syscall.ESHUTDOWN)
	err := c.WriteAt(ctx, make([]byte, 512), 0, 0)
	if !errors.Is(err, syscall.ESHUTDOWN) {
		t.Fatalf("request after ESHUTDOWN: %v", err)
	}
	// The client soft-disconnects; the server then closes the connection.
	select {
	case <-c.readerDone:
	case <-time.After(5 * time.Second):
		t.Fatal("connection not shut down after ESHUTDOWN")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestClientList(t *testing.T) {
	k := clientStartNbdkit(t, "--filter=exportname", "memory", "1M",
		"exportname=a", "exportname=b b", "exportdesc=fixed:hello", "exportname-list=explicit", "exportname-strict=true")
	dial := func() net.Conn {
		conn, err := net.Dial("unix", k.sock)
		if err != nil {
			t.Fatal(err)
		}
		return conn
	}
	list, err := List(clientCtx(t, 10*time.Second), dial(), nil)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	want := []ExportEntry{{"a", "hello"}, {"b b", "hello"}}
	if fmt.Sprint(list) != fmt.Sprint(want) {
		t.Fatalf("List = %v, want %v", list, want)
	}
	// The listed exports can be attached, the others are refused.
	c := clientDial(t, "nbd+unix:///b%20b?socket="+k.sock, ClientConfig{})
	if c.ExportName() != "b b" || c.Description() != "hello" {
		t.Errorf("export %q description %q", c.ExportName(), c.Description())
	}
	_, err = Dial(clientCtx(t, 10*time.Second), "nbd+unix:///zzz?socket="+k.sock, ClientConfig{})
	var oe *OptionError
	if !errors.As(err, &oe) || oe.Reply != repErrUnknown || !errors.Is(err, fs.ErrNotExist) ||
		!strings.Contains(err.Error(), `nbd: NBD_OPT_GO for export "zzz": NBD_REP_ERR_UNKNOWN`) {
		t.Fatalf("Dial of unknown export: %v", err)
	}

	t.Run("-e", func(t *testing.T) {
		k := clientStartNbdkit(t, "-e", "named", "memory", "1M")
		conn, err := net.Dial("unix", k.sock)
		if err != nil {
			t.Fatal(err)
		}
		list, err := List(clientCtx(t, 10*time.Second), conn, nil)
		if err != nil {
			t.Fatalf("List: %v", err)
		}
		if len(list) != 1 {
			t.Fatalf("List = %v, want one export", list)
		}
		c := clientDial(t, "nbd+unix:///"+list[0].Name+"?socket="+k.sock, ClientConfig{})
		if c.Size() != 1<<20 {
			t.Fatalf("Size = %d", c.Size())
		}
	})
}

func TestClientTLS(t *testing.T) {
	ca := testpki.NewCA(t, "csi-nbd test CA")
	certDir, pool := ca.ServerDir(t), ca.Pool()
	k := clientStartNbdkit(t, "--tls=require", "--tls-certificates="+certDir, "memory", "16M")
	tlsCfg := &tls.Config{RootCAs: pool, ServerName: "localhost"}

	c := clientDial(t, "nbds+unix:///?socket="+k.sock, ClientConfig{TLS: tlsCfg})
	if !c.tls || !c.StructuredReplies() {
		t.Fatalf("tls=%v structured=%v", c.tls, c.StructuredReplies())
	}
	clientModelIO(t, c, 0, 8, 1<<20, 100, 128<<10)
	ctx := clientCtx(t, 10*time.Second)
	var n int
	if err := c.BlockStatus(ctx, 0, 1<<20, 0, func(uint32, uint64, uint32) { n++ }); err != nil || n == 0 {
		t.Fatalf("BlockStatus over TLS: %v (%d extents)", err, n)
	}

	t.Run("List", func(t *testing.T) {
		conn, err := net.Dial("unix", k.sock)
		if err != nil {
			t.Fatal(err)
		}
		list, err := List(clientCtx(t, 10*time.Second), conn, tlsCfg)
		if err != nil || len(list) != 1 {
			t.Fatalf("List over TLS = %v, %v", list, err)
		}
	})
	t.Run("no TLS configured", func(t *testing.T) {
		_, err := Dial(clientCtx(t, 10*time.Second), k.uri, ClientConfig{})
		var oe *OptionError
		if !errors.As(err, &oe) || oe.Reply != repErrTLSReqd || !strings.Contains(err.Error(), "NBD_REP_ERR_TLS_REQD") {
			t.Fatalf("plain Dial to TLS-only server: %v", err)
		}
	})
	t.Run("untrusted CA", func(t *testing.T) {
		_, err := Dial(clientCtx(t, 10*time.Second), "nbds+unix:///?socket="+k.sock,
			ClientConfig{TLS: &tls.Config{RootCAs: x509.NewCertPool(), ServerName: "localhost"}})
		if err == nil || !strings.Contains(err.Error(), "TLS handshake") {
			t.Fatalf("Dial with untrusted CA: %v", err)
		}
	})
	t.Run("server without TLS", func(t *testing.T) {
		k := clientStartNbdkit(t, "--tls=off", "memory", "1M")
		_, err := Dial(clientCtx(t, 10*time.Second), k.uri, ClientConfig{TLS: tlsCfg})
		var oe *OptionError
		if !errors.As(err, &oe) || oe.Option != optStartTLS || !strings.Contains(err.Error(), "refused TLS") {
			t.Fatalf("TLS Dial to server without TLS: %v", err)
		}
	})
}

func TestClientNoStructuredReplies(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		cfg  ClientConfig
	}{
		{"server --no-sr", []string{"--no-sr", "memory", "16M"}, ClientConfig{}},
		{"client opt-out", []string{"memory", "16M"}, ClientConfig{NoStructuredReplies: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := clientStartNbdkit(t, tc.args...)
			c := clientDial(t, k.uri, tc.cfg)
			if c.StructuredReplies() {
				t.Fatal("structured replies negotiated")
			}
			if _, ok := c.MetaContext(AllocationContext); ok {
				t.Fatal("meta context without structured replies")
			}
			clientWantErrno(t, c.BlockStatus(clientCtx(t, time.Second), 0, 4096, 0, nil), syscall.ENOTSUP)
			clientModelIO(t, c, 0, 16, 1<<20, 200, 100<<10)
		})
	}
}

func TestClientMultiConn(t *testing.T) {
	k := clientStartNbdkit(t, "memory", "64M")
	m, err := DialMulti(clientCtx(t, 10*time.Second), k.uri, ClientConfig{}, 4)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if len(m.Conns()) != 4 || m.Size() != 64<<20 {
		t.Fatalf("%d conns, size %d", len(m.Conns()), m.Size())
	}
	clientModelIO(t, m, 0, 16, 1<<20, 200, 64<<10)
	ctx := clientCtx(t, 10*time.Second)
	if err := m.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// Every connection served some of the traffic and sees the same data.
	want := make([]byte, 1<<20)
	if err := m.Conns()[0].ReadAt(ctx, want, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range m.Conns()[1:] {
		got := make([]byte, 1<<20)
		if err := c.ReadAt(ctx, got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("connection %d: err=%v same=%v", i+1, err, bytes.Equal(got, want))
		}
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}

	t.Run("refused without multi-conn", func(t *testing.T) {
		k := clientStartNbdkit(t, "--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable")
		if _, err := DialMulti(clientCtx(t, 10*time.Second), k.uri, ClientConfig{}, 4); !errors.Is(err, errClientNoMultiConn) {
			t.Fatalf("DialMulti(4) = %v", err)
		}
		m, err := DialMulti(clientCtx(t, 10*time.Second), k.uri, ClientConfig{}, 1)
		if err != nil {
			t.Fatalf("DialMulti(1) = %v", err)
		}
		m.Close()
	})
}

func TestClientServerKilled(t *testing.T) {
	k := clientStartNbdkit(t, "--filter=delay", "memory", "16M", "rdelay=3")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 20*time.Second)
	const n = 32
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() { errs <- c.ReadAt(ctx, make([]byte, 64<<10), uint64(i)<<16) }()
	}
	time.Sleep(300 * time.Millisecond)
	killed := time.Now()
	k.kill()
	for i := 0; i < n; i++ {
		err := <-errs
		if err == nil || ctx.Err() != nil {
			t.Fatalf("in-flight read: err=%v ctx=%v", err, ctx.Err())
		}
		var ne net.Error
		if !errors.Is(err, io.ErrUnexpectedEOF) && !errors.As(err, &ne) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("in-flight read failed with %v, want unexpected EOF or a network error", err)
		}
	}
	if d := time.Since(killed); d > 2*time.Second {
		t.Fatalf("requests took %v to fail", d)
	}
	start := time.Now()
	if err := c.WriteAt(ctx, []byte{1}, 0, 0); err == nil || time.Since(start) > time.Second {
		t.Fatalf("request after failure: %v after %v", err, time.Since(start))
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestClientCancel(t *testing.T) {
	k := clientStartNbdkit(t, "--filter=delay", "memory", "16M", "rdelay=1")
	c := clientDial(t, k.uri, ClientConfig{})
	buf := bytes.Repeat([]byte{0xab}, 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if err := c.ReadAt(ctx, buf, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt with short deadline: %v", err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("cancelled ReadAt took %v", d)
	}
	// Let the abandoned replies arrive; they must not land in buf.
	ctx2 := clientCtx(t, 10*time.Second)
	other := make([]byte, 4096)
	if err := c.ReadAt(ctx2, other, 0); err != nil {
		t.Fatalf("ReadAt after a cancelled one: %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	if !bytes.Equal(buf, bytes.Repeat([]byte{0xab}, 1<<20)) {
		t.Fatal("abandoned read wrote into the caller's buffer")
	}
	// A pre-cancelled context sends nothing.
	cctx, ccancel := context.WithCancel(context.Background())
	ccancel()
	if err := c.WriteAt(cctx, []byte{1}, 0, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("WriteAt with cancelled ctx: %v", err)
	}
	c.mu.Lock()
	pending := c.npending
	c.mu.Unlock()
	if pending != 0 {
		t.Fatalf("%d requests still pending", pending)
	}
}

// TestClientCancelStress cancels random requests at random moments while
// others complete; successful reads must still return the right data.
func TestClientCancelStress(t *testing.T) {
	k := clientStartNbdkit(t, "--filter=delay", "memory", "16M", "rdelay=1ms", "wdelay=1ms")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 60*time.Second)
	pattern := clientRandBytes(16<<20, 11)
	if err := c.WriteAt(ctx, pattern, 0, 0); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ok, cancelled int
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := mrand.New(mrand.NewPCG(uint64(w), 5))
			buf := make([]byte, 256<<10)
			for i := 0; i < 150; i++ {
				n := 1 + rnd.IntN(len(buf))
				off := rnd.IntN(len(pattern) - n)
				rctx, cancel := context.WithTimeout(ctx, time.Duration(rnd.IntN(20000))*time.Microsecond)
				err := c.ReadAt(rctx, buf[:n], uint64(off))
				cancel()
				mu.Lock()
				switch {
				case err == nil:
					ok++
					if !bytes.Equal(buf[:n], pattern[off:off+n]) {
						t.Errorf("worker %d: wrong data at %d+%d", w, off, n)
					}
				case errors.Is(err, context.DeadlineExceeded):
					cancelled++
				default:
					t.Errorf("worker %d: %v", w, err)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	t.Logf("%d reads completed, %d cancelled", ok, cancelled)
	if err := c.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatalf("connection unusable after stress: %v", err)
	}
	// Abandoned requests drain as their replies arrive.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c.mu.Lock()
		n := c.npending
		c.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d requests never drained", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestClientCloseWaitsForInflight(t *testing.T) {
	k := clientStartNbdkit(t, "--filter=delay", "memory", "16M", "rdelay=300ms")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := clientCtx(t, 10*time.Second)
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() { errs <- c.ReadAt(ctx, make([]byte, 4096), uint64(i)*4096) }()
	}
	time.Sleep(100 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		if err := <-errs; err != nil {
			t.Errorf("in-flight read during Close: %v", err)
		}
	}
	if err := c.Flush(ctx); !errors.Is(err, ErrClientClosed) {
		t.Errorf("Flush after Close: %v", err)
	}
}

func TestClientAllocs(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	k := clientStartNbdkit(t, "memory", "16M")
	c := clientDial(t, k.uri, ClientConfig{})
	ctx := context.Background()
	buf := make([]byte, 4096)
	for i := 0; i < 100; i++ { // warm the pools
		c.WriteAt(ctx, buf, 0, 0)
		c.ReadAt(ctx, buf, 0)
	}
	r := testing.AllocsPerRun(200, func() {
		if err := c.ReadAt(ctx, buf, 8192); err != nil {
			t.Fatal(err)
		}
	})
	w := testing.AllocsPerRun(200, func() {
		if err := c.WriteAt(ctx, buf, 8192, 0); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("allocs per ReadAt %.2f, per WriteAt %.2f", r, w)
	if r > 0.5 || w > 0.5 {
		t.Errorf("allocs per ReadAt %.2f, per WriteAt %.2f; want 0", r, w)
	}
}

func BenchmarkClientRead4K(b *testing.B) {
	k := clientStartNbdkit(b, "memory", "64M")
	c, err := Dial(context.Background(), k.uri, ClientConfig{})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	if err := c.WriteAt(ctx, make([]byte, 64<<20), 0, 0); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(4096)
	b.ReportAllocs()
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		buf := make([]byte, 4096)
		rnd := mrand.New(mrand.NewPCG(mrand.Uint64(), 1))
		for pb.Next() {
			if err := c.ReadAt(ctx, buf, uint64(rnd.IntN(16384))*4096); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
