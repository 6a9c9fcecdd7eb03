package nbdremote

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testpki"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

func TestBadSpecs(t *testing.T) {
	for _, tc := range []struct{ spec, want string }{
		{"nbd://127.0.0.1:99999/x", `bad port "99999"`},
		{"nbd+unix:///x", "missing socket="},
		{"nbd+unix:///x?socket=run/s", "socket= must be an absolute path"},
		{"nbd://h/x?socket=/s", "socket= is only valid with nbd+unix"},
		{"nbd://user@h/x", "user info"},
		{"nbd:opaque", "expected nbd://"},
		{"nbd://h/%zz", "invalid URL escape"},
		{"connections=0;nbd://h/", `option "connections": 0 is not between 1 and 16`},
		{"connections=17;nbd://h/", `option "connections": 17`},
		{"connections=x;nbd://h/", "invalid integer"},
		{"timeout=0s;nbd://h/", `option "timeout": must be more than 0`},
		{"timeout=-1s;nbd://h/", "negative"},
		{"tls-certificates=/etc;nbd://h/", `option "tls-certificates" needs a TLS URI`},
		{"tls-certificates=certs;nbds://h/", "not an absolute path"},
		{"bogus=1;nbd://h/", "bogus"},
	} {
		_, err := backends.Parse(tc.spec)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v; want an error containing %q", tc.spec, err, tc.want)
		}
	}
	for _, ok := range []string{"nbd://h/e", "nbds://h:1234/", "nbd+unix:///e?socket=/s", "NBDS+UNIX:///?socket=/s",
		"connections=4,timeout=5s;nbd://[::1]/x", "tls-certificates=/d;nbds://h/"} {
		if _, err := backends.Parse(ok); err != nil {
			t.Errorf("Parse(%q): %v", ok, err)
		}
	}
	// A certificate directory must hold something useful.
	if err := devtest.OpenErr(t, "tls-certificates="+t.TempDir()+";nbds://127.0.0.1:1/", backends.Env{}); !strings.Contains(err.Error(), "neither ca-cert.pem nor client-cert.pem") {
		t.Errorf("empty certificate directory: %v", err)
	}
}

// FuzzSpec: whatever Parse accepts for these schemes is canonical and
// opens with valid options.
func FuzzSpec(f *testing.F) {
	for _, s := range []string{"nbd://h/e", "connections=4;nbds://h:1/x", "nbd+unix:///e?socket=/s",
		"timeout=1m;nbd://[::1]:10809/", "tls-certificates=/x;nbds+unix:///?socket=/s%20x", "nbd://h/%2F"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		sp, err := backends.Parse(s)
		if err != nil {
			return
		}
		o, err := parseOptions(sp)
		if err != nil {
			t.Fatalf("Parse(%q) accepted options parseOptions refuses: %v", s, err)
		}
		if o.Connections < 1 || o.Connections > maxConnections || o.Timeout <= 0 {
			t.Fatalf("Parse(%q): options %+v", s, o)
		}
		again, err := backends.Parse(sp.String())
		if err != nil || again.String() != sp.String() {
			t.Fatalf("not canonical: %q -> %q -> %q, %v", s, sp.String(), again.String(), err)
		}
	})
}

// FuzzParseURI checks pkg/nbd's URI parser, which this backend relies on.
func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"nbd://h/e", "nbds://h:1/x", "nbd+unix:///e?socket=/s", "nbd://[::1]:10809/", "nbd://h:0/", "nbd:x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		network, addr, _, _, err := nbd.ParseURI(s)
		if err != nil {
			if !strings.Contains(err.Error(), "URI") {
				t.Fatalf("error does not say what was bad: %v", err)
			}
			return
		}
		switch network {
		case "tcp":
			if _, _, err := net.SplitHostPort(addr); err != nil {
				t.Fatalf("ParseURI(%q): address %q: %v", s, addr, err)
			}
		case "unix":
			if addr == "" {
				t.Fatalf("ParseURI(%q): empty socket", s)
			}
		default:
			t.Fatalf("ParseURI(%q): network %q", s, network)
		}
	})
}

// exercise runs concurrent random writes, zeroes and trims against dev and
// checks reads against a model.
func exercise(t *testing.T, dev backends.Device, size int) []byte {
	t.Helper()
	model := make([]byte, size)
	const workers = 8
	region := size / workers
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			base := w * region
			m := model[base : base+region]
			for range 40 {
				n := r.IntN(min(256<<10, region/2)) + 1
				off := r.IntN(region - n)
				switch r.IntN(4) {
				case 0, 1:
					b := devtest.RandBytes(n)
					if err := dev.WriteAt(ctx, b, uint64(base+off), r.IntN(4) == 0); err != nil {
						errs <- err
						return
					}
					copy(m[off:], b)
				case 2:
					if err := dev.Zero(ctx, uint64(base+off), uint64(n), backends.ZeroFlags(r.IntN(4))); err != nil {
						errs <- err
						return
					}
					clear(m[off : off+n])
				case 3:
					if err := dev.Trim(ctx, uint64(base+off), uint64(n), false); err != nil {
						errs <- err
						return
					}
					clear(m[off : off+n])
				}
				got := make([]byte, n)
				roff := r.IntN(region - n)
				if err := dev.ReadAt(ctx, got, uint64(base+roff)); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, m[roff:roff+n]) {
					errs <- errors.New("read differs from the model")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := dev.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	return model
}

// TestNbdkitMemory: four connections to nbdkit's memory plugin (which
// allows multi-conn); the data as nbdkit holds it, read by nbdcopy,
// matches what was written through us.
func TestNbdkitMemory(t *testing.T) {
	k := startNbdkit(t, testserver.FreePort(t), "memory", "32M")
	d := openSpec(t, "connections=4;"+k.uri(), backends.Env{})
	c := d.Caps()
	if len(d.slots) != 4 || !c.MultiConn || !c.Trim || !c.Zero || !c.FastZero || !c.Extents || !c.Flush || c.Fast || c.ReadOnly {
		t.Fatalf("connections %d, caps %+v", len(d.slots), c)
	}
	if d.Size() != 32<<20 {
		t.Fatalf("size %d", d.Size())
	}
	model := exercise(t, d, 32<<20)
	out := filepath.Join(t.TempDir(), "out")
	testserver.Run(t, "nbdcopy", k.uri(), out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, model) {
		t.Fatal("nbdkit holds different data")
	}
	// Extents mirror nbdkit's: a trimmed 1 MiB is a hole.
	d.WriteAt(ctx, devtest.RandBytes(2<<20), 0, false)
	d.Trim(ctx, 1<<20, 1<<20, false)
	var exts []backends.Extent
	if err := d.Extents(ctx, 0, 2<<20, func(e backends.Extent) { exts = append(exts, e) }); err != nil {
		t.Fatal(err)
	}
	if len(exts) < 2 || exts[0] != (backends.Extent{Length: 1 << 20}) || exts[1].Flags != backends.ExtentHole|backends.ExtentZero {
		t.Fatalf("extents %+v", exts)
	}
}

// TestNoMultiConn: a server without multi-conn gets one connection.
func TestNoMultiConn(t *testing.T) {
	k := startNbdkit(t, testserver.FreePort(t), "--filter=multi-conn", "memory", "1M", "multi-conn-mode=disable")
	d := openSpec(t, "connections=4;"+k.uri(), backends.Env{})
	if len(d.slots) != 1 || !d.Caps().MultiConn {
		t.Fatalf("connections %d caps %+v", len(d.slots), d.Caps())
	}
	exercise(t, d, 1<<20)
}

// TestOwnServer runs the backend against our own server, over TCP and a
// unix socket, with a memory volume behind it.
func TestOwnServer(t *testing.T) {
	for i := range 2 {
		vol := memory.New(16 << 20)
		srv := testserver.StartNBD(t, testserver.OneExport{Device: vol})
		uri := []string{srv.TCPURI(""), srv.UnixURI("")}[i]
		d := openSpec(t, "connections=3;"+uri, backends.Env{})
		if len(d.slots) != 3 || !d.Caps().Extents {
			t.Fatalf("%s: connections %d caps %+v", uri, len(d.slots), d.Caps())
		}
		model := exercise(t, d, 16<<20)
		devtest.CheckRead(t, uri+": the volume", vol, 0, model)
	}
}

// TestServerErrorsAreNotRetried: an error the server answers with comes
// back as it is (ENOSPC here), while the connection stays up.
func TestServerErrorsAreNotRetried(t *testing.T) {
	k := startNbdkit(t, testserver.FreePort(t), "--filter=error", "memory", "1M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%")
	d := openSpec(t, k.uri(), backends.Env{})
	if err := d.WriteAt(ctx, []byte{1}, 0, false); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write: %v, want ENOSPC", err)
	}
	if err := d.ReadAt(ctx, make([]byte, 10), 0); err != nil {
		t.Fatalf("read after a refused write: %v", err)
	}
	ro := startNbdkit(t, testserver.FreePort(t), "-r", "memory", "1M")
	r := openSpec(t, ro.uri(), backends.Env{})
	devtest.CheckReadOnly(t, r)
}

// TestReconnect kills nbdkit (file plugin, so the data survives) while
// readers and writers run, restarts it on the same port, and checks that
// no request failed and every write is there.
func TestReconnect(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	base := devtest.RandBytes(4 << 20)
	if err := os.WriteFile(img, base, 0o600); err != nil {
		t.Fatal(err)
	}
	k := startNbdkit(t, testserver.FreePort(t), "file", img)
	d := openSpec(t, "connections=2,timeout=2m;"+k.uri(), backends.Env{})

	var stop atomic.Bool
	var ops atomic.Int64
	var mu sync.Mutex
	want := bytes.Clone(base)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			region := uint64(w) << 20 // each worker owns 1 MiB
			for !stop.Load() {
				off := region + uint64(r.IntN(1<<20-4096))
				if r.IntN(2) == 0 {
					b := devtest.RandBytes(4096)
					if err := d.WriteAt(ctx, b, off, false); err != nil {
						errs <- err
						return
					}
					mu.Lock()
					copy(want[off:], b)
					mu.Unlock()
				} else {
					got := make([]byte, 4096)
					if err := d.ReadAt(ctx, got, off); err != nil {
						errs <- err
						return
					}
					mu.Lock()
					same := bytes.Equal(got, want[off:off+4096])
					mu.Unlock()
					if !same {
						errs <- errors.New("read returned wrong data")
						return
					}
				}
				ops.Add(1)
			}
		}()
	}
	waitOps := func(n int64) {
		for target := ops.Load() + n; ops.Load() < target; {
			select {
			case err := <-errs:
				t.Fatal(err)
			default:
			}
			backends.Sleep(ctx, 5e6)
		}
	}
	for range 3 {
		waitOps(200)
		k.kill()
		backends.Sleep(ctx, 2e8) // requests now retry against a closed port
		k.start()
		waitOps(200) // and complete once it is back
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := d.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(img)
	if !bytes.Equal(got, want) {
		t.Fatal("file behind nbdkit differs from the writes acknowledged")
	}
}

// TestUnreachable: a refused port and a server that never answers fail
// opening with errors that say so once the timeout has passed; a server
// gone for good fails requests with EIO after the timeout, and a
// cancelled context stops a request at once.
func TestUnreachable(t *testing.T) {
	port := testserver.FreePort(t)
	err := devtest.OpenErr(t, "timeout=500ms;nbd://"+testserver.Addr(port)+"/", backends.Env{})
	if !strings.Contains(err.Error(), "connection refused") || !strings.Contains(err.Error(), "within 500ms") ||
		!strings.Contains(err.Error(), testserver.Addr(port)) {
		t.Errorf("refused: %v", err)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close() // accept, say nothing
		}
	}()
	err = devtest.OpenErr(t, "timeout=300ms;nbd://"+ln.Addr().String()+"/", backends.Env{})

	if !strings.Contains(err.Error(), "no answer within 300ms") {
		t.Errorf("silent server: %v", err)
	}

	k := startNbdkit(t, testserver.FreePort(t), "memory", "1M")
	d := openSpec(t, "timeout=500ms;"+k.uri(), backends.Env{})
	k.kill()
	err = d.ReadAt(ctx, make([]byte, 512), 0)
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "no answer within 500ms") ||
		!strings.Contains(err.Error(), "connection refused") {
		t.Errorf("read from a dead server: %v", err)
	}

	// With a long timeout, only cancelling stops a request that is
	// waiting for the server to come back.
	k2 := startNbdkit(t, testserver.FreePort(t), "memory", "1M")
	long := openSpec(t, "timeout=1h;"+k2.uri(), backends.Env{})
	k2.kill()
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- long.ReadAt(cctx, make([]byte, 512), 0) }()
	backends.Sleep(ctx, 3e8)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled read: %v", err)
	}
}

// TestStalledServer: a server that stops answering (SIGSTOP) makes a
// request fail with EIO at the timeout and its connection be dropped; once
// the server runs again, the next request goes over a fresh connection.
func TestStalledServer(t *testing.T) {
	k := startNbdkit(t, testserver.FreePort(t), "memory", "1M")
	d := openSpec(t, "timeout=1s;"+k.uri(), backends.Env{})
	if err := d.WriteAt(ctx, []byte("before"), 0, false); err != nil {
		t.Fatal(err)
	}
	old := d.slots[0].c
	k.cmd.Process.Signal(syscall.SIGSTOP)
	waitStopped(t, k.cmd.Process.Pid)
	err := d.ReadAt(ctx, make([]byte, 6), 0)
	k.cmd.Process.Signal(syscall.SIGCONT)
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "no answer within 1s") {
		t.Fatalf("read from a stopped server: %v", err)
	}
	got := make([]byte, 6)
	if err := d.ReadAt(ctx, got, 0); err != nil || string(got) != "before" {
		t.Fatalf("read after SIGCONT: %q, %v", got, err)
	}
	if d.slots[0].c == old {
		t.Fatal("the stalled connection was kept")
	}
}

// waitStopped waits until every thread of pid is stopped: SIGSTOP reaches
// a thread running on another CPU only a moment later.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	for {
		tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		if err != nil || len(tasks) == 0 {
			t.Fatalf("no threads of %d: %v", pid, err)
		}
		stopped := true
		for _, task := range tasks {
			b, err := os.ReadFile(task)
			// The state follows the ")" closing the command name.
			if i := bytes.LastIndexByte(b, ')'); err == nil && i >= 0 && i+2 < len(b) && b[i+2] != 'T' && b[i+2] != 't' {
				stopped = false
			}
		}
		if stopped {
			return
		}
		backends.Sleep(ctx, 5e6)
	}
}

// TestProxy serves an nbdkit export through our server with this backend
// (csi-nbd as an NBD proxy) and checks it with libnbd's and qemu's
// clients: the map shows nbdkit's holes, copies compare equal.
func TestProxy(t *testing.T) {
	k := startNbdkit(t, testserver.FreePort(t), "memory", "8M")
	d := openSpec(t, "connections=2;"+k.uri(), backends.Env{})
	proxy := testserver.ServeNBDURI(t, d)
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := devtest.RandBytes(8 << 20)
	clear(data[2<<20 : 6<<20])
	os.WriteFile(src, data, 0o600)
	testserver.Run(t, "nbdcopy", "--connections=2", src, proxy)
	testserver.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, k.uri())
	testserver.Run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, proxy)
	m := strings.Join(strings.Fields(testserver.Run(t, "nbdinfo", "--map", proxy)), " ")
	if !strings.Contains(m, "2097152 4194304 3 hole,zero") {
		t.Fatalf("nbdinfo --map through the proxy: %s", m)
	}
}

// TestTLS: nbds to nbdkit requiring TLS, with our CA (and a client
// certificate when nbdkit verifies peers), from a directory or secrets.
func TestTLS(t *testing.T) {
	ca := testpki.NewCA(t, "test CA")
	k := startNbdkit(t, testserver.FreePort(t), "--tls=require", "--tls-certificates="+ca.ServerDir(t), "--tls-verify-peer", "memory", "4M")
	uri := "nbds://localhost:" + strings.TrimPrefix(testserver.Addr(k.port), "127.0.0.1:") + "/"
	d := openSpec(t, "tls-certificates="+ca.ClientDir(t, true)+";"+uri, backends.Env{})
	exercise(t, d, 4<<20)

	// The same from a Kubernetes TLS Secret's keys.
	cert, key := ca.Issue(t, "client", x509.ExtKeyUsageClientAuth)
	s := openSpec(t, "timeout=10s;"+uri, backends.Env{Secrets: map[string]string{
		"ca.crt": string(ca.PEM), "tls.crt": string(cert), "tls.key": string(key)}})
	if err := s.ReadAt(ctx, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}

	// Without our CA, the server is not trusted; without TLS, refused;
	// without a client certificate, nbdkit refuses us.
	if err := devtest.OpenErr(t, "timeout=5s;"+uri, backends.Env{}); !strings.Contains(err.Error(), "certificate") {
		t.Errorf("untrusted server: %v", err)
	}
	if err := devtest.OpenErr(t, "timeout=5s;"+k.uri(), backends.Env{}); !strings.Contains(err.Error(), "requires TLS") {
		t.Errorf("plain connection to a TLS server: %v", err)
	}
	if err := devtest.OpenErr(t, "timeout=5s,tls-certificates="+ca.ClientDir(t, false)+";"+uri, backends.Env{}); !strings.Contains(err.Error(), "reset by peer") {
		t.Errorf("no client certificate: %v", err)
	}
}
