package nbd

// TLS: libnbd (GnuTLS) against the server's crypto/tls, in the three TLS
// modes, plus raw conversations for what clients cannot be made to do.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/testpki"
)

// tlsFiles is a throwaway PKI in the layout libnbd expects: the client
// directory holds ca-cert.pem, client-cert.pem and client-key.pem.
type tlsFiles struct {
	clientDir string // CA + client certificate
	anonDir   string // CA only: no client certificate
	otherDir  string // a different CA, plus a client certificate from it
	server    *tls.Config
}

// newTLSFiles builds the PKI. The server requires and verifies client
// certificates when requireClientCert is set.
func newTLSFiles(t testing.TB, requireClientCert bool) *tlsFiles {
	t.Helper()
	ca := testpki.NewCA(t, "csi-nbd test CA")
	serverDir := ca.ServerDir(t)
	f := &tlsFiles{
		clientDir: ca.ClientDir(t, true),
		anonDir:   ca.ClientDir(t, false),
		otherDir:  testpki.NewCA(t, "some other CA").ClientDir(t, true),
	}
	// The server loads its files back, as a real deployment would.
	pair, err := tls.LoadX509KeyPair(filepath.Join(serverDir, "server-cert.pem"), filepath.Join(serverDir, "server-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	f.server = &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	if requireClientCert {
		f.server.ClientAuth = tls.RequireAndVerifyClientCert
		f.server.ClientCAs = ca.Pool()
	}
	return f
}

// tlsURI is the nbds+unix URI of export with the given certificate dir.
func (s *testServer) tlsURI(export, certDir string) string {
	return "nbds+unix:///" + export + "?socket=" + s.sock + "&tls-certificates=" + url.QueryEscape(certDir)
}

// tlsTCPURI is the nbds:// URI over TCP; the certificate names localhost.
func (s *testServer) tlsTCPURI(export, certDir string) string {
	_, port, _ := net.SplitHostPort(s.tcp)
	return "nbds://localhost:" + port + "/" + export + "?tls-certificates=" + url.QueryEscape(certDir)
}

func startTLSServer(t *testing.T, mode TLSMode, requireClientCert bool, exports staticExports) (*testServer, *tlsFiles) {
	t.Helper()
	f := newTLSFiles(t, requireClientCert)
	s := startServer(t, exports, func(c *ServerConfig) {
		c.TLSMode = mode
		c.TLS = f.server
	})
	return s, f
}

func TestTLSRequire(t *testing.T) {
	dev := newTestDevice(16 << 20)
	s, f := startTLSServer(t, TLSRequire, true, staticExports{"": {Device: dev, Description: "secret"}})

	t.Run("nbdinfo_tls", func(t *testing.T) {
		for _, uri := range []string{s.tlsURI("", f.clientDir), s.tlsTCPURI("", f.clientDir)} {
			info := nbdinfo(t, uri)
			if !info.TLS || !info.Structured || len(info.Exports) != 1 {
				t.Fatalf("%s: %+v", uri, info)
			}
			e := info.Exports[0]
			if e["export-size"] != float64(16<<20) || e["description"] != "secret" || e["can_df"] != true {
				t.Fatalf("%s: export %v", uri, e)
			}
		}
		info := nbdinfo(t, "--list", s.tlsURI("", f.clientDir))
		if len(info.Exports) != 1 || info.Exports[0]["description"] != "secret" {
			t.Fatalf("list over TLS: %+v", info)
		}
	})

	t.Run("plain_refused", func(t *testing.T) {
		for _, uri := range []string{s.uri(""), s.tcpURI("")} {
			out, err := runErr(t, "nbdinfo", uri)
			if err == nil {
				t.Fatalf("plain client served by a TLS-only server:\n%s", out)
			}
			// libnbd 1.14 renders NBD_REP_ERR_TLS_REQD as "Operation
			// not supported" without the server's message (exactly as
			// for nbdkit --tls=require); raw_before_tls checks the
			// code itself.
			if !strings.Contains(out, "without TLS") || !strings.Contains(out, "opt_go") {
				t.Errorf("unexpected refusal:\n%s", out)
			}
			t.Logf("%s: %s", uri, strings.TrimSpace(out))
		}
	})

	t.Run("client_without_certificate_refused", func(t *testing.T) {
		if out, err := runErr(t, "nbdinfo", s.tlsURI("", f.anonDir)); err == nil {
			t.Fatalf("served a client without a certificate:\n%s", out)
		}
	})

	t.Run("untrusted_ca_refused", func(t *testing.T) {
		// The client does not trust the server's CA (and the server does
		// not trust the client's).
		if out, err := runErr(t, "nbdinfo", s.tlsURI("", f.otherDir)); err == nil {
			t.Fatalf("TLS succeeded across unrelated CAs:\n%s", out)
		}
	})

	t.Run("nbdcopy_tls", func(t *testing.T) {
		src := filepath.Join(t.TempDir(), "src.img")
		want := randomFile(t, src, 16<<20)
		run(t, "nbdcopy", "--connections=4", "--threads=4", src, s.tlsTCPURI("", f.clientDir))
		if data, _ := dev.snapshot(); string(data) != string(want) {
			t.Fatal("device differs after nbdcopy over TLS")
		}
		dst := filepath.Join(t.TempDir(), "dst.img")
		run(t, "nbdcopy", "--connections=4", "--threads=4", s.tlsURI("", f.clientDir), dst)
		if fileSum(t, dst) != fileSum(t, src) {
			t.Fatal("export → file over TLS differs")
		}
	})

	t.Run("libnbd_cases_over_tls", func(t *testing.T) {
		for _, c := range []string{"structured_read", "block_status", "aio_pipeline"} {
			dev.Zero(t.Context(), 0, dev.Size(), 0)
			runPython(t, "libnbd_io.py", s.tlsURI("", f.clientDir), c)
		}
	})

	t.Run("raw_before_tls", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		for _, opt := range []uint32{optList, optStructuredReply, optInfo, optGo, optListMetaContext, 4242} {
			var payload []byte
			if opt == optInfo || opt == optGo {
				payload = rawGoPayload("")
			}
			r.sendOpt(opt, payload)
			r.expectOptReply(opt, repErrTLSReqd)
		}
		r.sendOpt(optAbort, nil)
		r.expectOptReply(optAbort, repAck)
		r.expectClosed()

		r = rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.sendOpt(optExportName, nil) // no way to refuse but to hang up
		r.expectClosed()
	})

	t.Run("raw_starttls", func(t *testing.T) {
		r := rawStartTLS(t, s.sock, f)
		// A second STARTTLS inside TLS is invalid.
		r.sendOpt(optStartTLS, nil)
		r.expectOptReply(optStartTLS, repErrInvalid)
		r.negotiate2("", true)
		r.writeData(0, rawPattern(4096, 1))
		if got := r.readData(0, 4096); string(got) != string(rawPattern(4096, 1)) {
			t.Fatal("read back over TLS")
		}
	})

	t.Run("raw_data_before_handshake", func(t *testing.T) {
		// Bytes pipelined after STARTTLS, before the TLS handshake, are
		// a protocol violation (and an injection risk): hang up.
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle)
		r.write(append(rawOption(optStartTLS, nil), rawOption(optList, nil)...))
		r.expectOptReply(optStartTLS, repAck)
		r.expectClosed()
	})
}

// rawStartTLS connects, upgrades to TLS with the client certificate, and
// returns a rawConn speaking over TLS, just after the STARTTLS.
func rawStartTLS(t *testing.T, sock string, f *tlsFiles) *rawConn {
	t.Helper()
	r := rawDialAddr(t, "unix", sock)
	r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
	r.sendOpt(optStartTLS, nil)
	r.expectOptReply(optStartTLS, repAck)
	return r.upgradeTLS(f)
}

func (r *rawConn) upgradeTLS(f *tlsFiles) *rawConn {
	r.t.Helper()
	pair, err := tls.LoadX509KeyPair(filepath.Join(f.clientDir, "client-cert.pem"), filepath.Join(f.clientDir, "client-key.pem"))
	if err != nil {
		r.t.Fatal(err)
	}
	caPEM, _ := os.ReadFile(filepath.Join(f.clientDir, "ca-cert.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	tc := tls.Client(r.c, &tls.Config{ServerName: "localhost", RootCAs: pool, Certificates: []tls.Certificate{pair}})
	if err := tc.Handshake(); err != nil {
		r.t.Fatalf("TLS handshake: %v", err)
	}
	r.c = tc
	r.br = bufio.NewReader(tc)
	return r
}

// negotiate2 is haggle for a connection that has already greeted.
func (r *rawConn) negotiate2(name string, structured bool) (uint64, uint16) {
	r.t.Helper()
	return r.haggle(name, structured)
}

func TestTLSOn(t *testing.T) {
	dev := newTestDevice(4 << 20)
	s, f := startTLSServer(t, TLSOn, false, staticExports{"": {Device: dev}})

	plain := nbdinfo(t, s.uri(""))
	if plain.TLS || plain.Exports[0]["export-size"] != float64(4<<20) {
		t.Fatalf("plain: %+v", plain)
	}
	for _, dir := range []string{f.clientDir, f.anonDir} {
		secure := nbdinfo(t, s.tlsURI("", dir))
		if !secure.TLS || secure.Exports[0]["export-size"] != float64(4<<20) {
			t.Fatalf("TLS with %s: %+v", filepath.Base(dir), secure)
		}
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 0 64k", s.uri(""))
	out := run(t, "nbdinfo", "--map", "--json", s.tlsURI("", f.anonDir))
	var m []mapExtent
	if err := json.Unmarshal([]byte(out), &m); err != nil || len(m) == 0 || m[0] != (mapExtent{0, 65536, 0}) {
		t.Fatalf("map over TLS (%v): %s", err, out)
	}

	t.Run("raw_state_forgotten_after_starttls", func(t *testing.T) {
		// Structured replies and meta contexts negotiated in clear text
		// do not survive STARTTLS (proto.md).
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		r.structuredWithAllocation("")
		r.sendOpt(optStartTLS, nil)
		r.expectOptReply(optStartTLS, repAck)
		r.upgradeTLS(f)
		_, flags, _ := r.goInfo(optGo, "")
		if flags&FlagSendDF != 0 {
			t.Fatalf("structured replies survived STARTTLS: flags %#x", flags)
		}
		if got := r.readData(0, 512); got[0] != 0x42 {
			t.Fatal("wrong data over TLS")
		}
		r.expectErrno(EINVAL, 0, CmdBlockStatus, 0, 4096, nil)
		if rep := r.do(0, CmdRead, 0, 512, nil); rep.structured {
			t.Fatal("structured reply after STARTTLS reset")
		}
	})

	t.Run("raw_extended_forgotten_after_starttls", func(t *testing.T) {
		r := rawDial(t, s)
		r.greet(clientFlagFixedNewstyle | clientFlagNoZeroes)
		r.askExtended()
		r.sendOpt(optStartTLS, nil)
		r.expectOptReply(optStartTLS, repAck)
		r.upgradeTLS(f)
		// Compact again: structured replies may be asked for, and a
		// compact request is answered.
		r.sendOpt(optStructuredReply, nil)
		r.expectOptReply(optStructuredReply, repAck)
		r.goInfo(optGo, "")
		r.structured = true
		if rep := r.do(0, CmdRead, 0, 512, nil); rep.extended || rep.typ != replyTypeOffsetData || rep.data[0] != 0x42 {
			t.Fatalf("read after STARTTLS: %+v", rep)
		}
	})

	t.Run("raw_extended_inside_tls", func(t *testing.T) {
		r := rawStartTLS(t, s.sock, f)
		r.askExtended()
		r.goExtended("")
		if rep := r.doExt(0, CmdRead, 0, 512, nil); rep.typ != replyTypeOffsetData || rep.data[0] != 0x42 {
			t.Fatalf("extended read over TLS: %+v", rep)
		}
	})

	t.Run("raw_plain_allowed", func(t *testing.T) {
		r := rawDial(t, s)
		r.negotiate("", true)
		r.readData(0, 4096)
	})
}

func TestTLSShutdownWithUnreadReplies(t *testing.T) {
	f := newTLSFiles(t, true)
	shutdownWithUnreadReplies(t, ServerConfig{TLSMode: TLSRequire, TLS: f.server}, func(sock string) *rawConn {
		r := rawStartTLS(t, sock, f)
		r.haggle("", true)
		return r
	})
}

func TestTLSShutdownDuringHandshake(t *testing.T) {
	// A client that asks for STARTTLS and then never starts the TLS
	// handshake is closed by a graceful Shutdown, without its context
	// having to expire.
	f := newTLSFiles(t, false)
	srv, err := NewServer(ServerConfig{Exports: staticExports{"": {Device: newTestDevice(1 << 20)}}, TLSMode: TLSRequire, TLS: f.server})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(t.Context(), ln)
	r := rawDialAddr(t, "unix", sock)
	r.greet(clientFlagFixedNewstyle)
	r.sendOpt(optStartTLS, nil)
	r.expectOptReply(optStartTLS, repAck)
	ctx, cancel := context.WithTimeout(t.Context(), rawGuard)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	r.expectClosed()
}

func TestTLSOffRefusesStartTLS(t *testing.T) {
	s := startServer(t, staticExports{"": {Device: newTestDevice(1 << 20)}})
	out, err := runErr(t, "nbdinfo", s.tlsURI("", t.TempDir()))
	if err == nil {
		t.Fatalf("nbds:// succeeded against a server without TLS:\n%s", out)
	}
	t.Logf("%s", strings.TrimSpace(out))
}

func TestTLSConfigRequired(t *testing.T) {
	for _, m := range []TLSMode{TLSOn, TLSRequire} {
		if _, err := NewServer(ServerConfig{Exports: staticExports{}, TLSMode: m}); err == nil {
			t.Errorf("mode %d without a TLS config accepted", m)
		}
	}
	for in, want := range map[string]TLSMode{"": TLSOff, "off": TLSOff, "on": TLSOn, "require": TLSRequire} {
		if got, err := ParseTLSMode(in); err != nil || got != want {
			t.Errorf("ParseTLSMode(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseTLSMode("yes"); err == nil {
		t.Error("ParseTLSMode accepted junk")
	}
}
