package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/all"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
)

// defaultSpec is what `csi-nbd serve` serves with no arguments.
const defaultSpec = "size=1Gi;memory:"

const serveUsage = `Usage: csi-nbd serve [OPTIONS] [SPEC]

Serves volumes to NBD clients (nbdinfo, nbdcopy, qemu, nbd-client, libnbd).
SPEC is the default export, opened by the empty export name; it defaults
to %q (a 1 GiB memory volume). A client may open another
export name -- a volume spec such as "size=64Mi;memory:scratch" -- only if
it matches an --allow pattern. All connections to one volume share one open backend; a
memory volume keeps its data until the server exits.

Options:
`

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

type serveOptions struct {
	listen      stringList
	allow       stringList
	readOnly    bool
	tlsMode     string
	tlsCertDir  string
	tlsVerify   bool
	shutdownMax time.Duration
	secretsDir  string
	stateDir    string
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o serveOptions
	fs := newFlagSet("serve", stderr, serveUsage, defaultSpec)
	fs.Var(&o.listen, "listen", "where to listen: tcp://HOST:PORT or unix:///PATH (repeatable; default tcp://127.0.0.1:10809)")
	fs.Var(&o.allow, "allow", "glob (* and ?) of export names clients may open besides the default (repeatable; default: none)")
	fs.BoolVar(&o.readOnly, "readonly", false, "serve every export read-only")
	fs.StringVar(&o.tlsMode, "tls", "off", "TLS through NBD_OPT_STARTTLS: off, on (offered) or require")
	fs.StringVar(&o.tlsCertDir, "tls-certificates", "", "directory with server-cert.pem, server-key.pem and (for --tls-verify-peer) ca-cert.pem, as nbdkit expects")
	fs.BoolVar(&o.tlsVerify, "tls-verify-peer", false, "require a client certificate signed by ca-cert.pem")
	fs.StringVar(&o.secretsDir, "secrets-dir", "", "directory of backend credentials, one file per key (a mounted Secret's layout): access-key-id, secret-access-key, ...")
	fs.StringVar(&o.stateDir, "state-dir", "", "directory for volumes' local files (cache blocks, cow overlays); default under $TMPDIR")
	fs.DurationVar(&o.shutdownMax, "shutdown-timeout", 30*time.Second, "on SIGTERM, how long to let in-flight requests finish")
	addLogFlags(fs)
	if help, err := parseFlags(fs, args, stdout); help || err != nil {
		return err
	}
	if fs.NArg() > 1 {
		fs.Usage()
		return errUsage{errors.New("at most one SPEC")}
	}
	specText := defaultSpec
	if fs.NArg() == 1 {
		specText = fs.Arg(0)
	}
	def, err := backends.Parse(specText)
	if err != nil {
		return err
	}
	if len(o.listen) == 0 {
		o.listen = stringList{"tcp://127.0.0.1:10809"}
	}
	mode, err := nbd.ParseTLSMode(o.tlsMode)
	if err != nil {
		return fmt.Errorf("--tls: %w", err)
	}
	var tlsCfg *tls.Config
	if mode != nbd.TLSOff {
		if tlsCfg, err = loadServerTLS(o.tlsCertDir, o.tlsVerify); err != nil {
			return err
		}
	}

	env := backends.Env{StateDir: o.stateDir, Owner: hostOwner()}
	if o.secretsDir != "" {
		if env.Secrets, err = backends.ReadSecretsDir(o.secretsDir); err != nil {
			return fmt.Errorf("--secrets-dir: %w", err)
		}
	}
	pool := backends.NewPool(env)
	defer func() {
		if err := pool.Close(); err != nil {
			klog.ErrorS(err, "Closing volumes")
		}
	}()
	// Open the default export now so a bad backend fails at start, not
	// at the first client.
	_, release, err := pool.Acquire(ctx, def)
	if err != nil {
		return fmt.Errorf("opening %q: %w", def.Redacted(), err)
	}
	release()
	table := &exportTable{pool: pool, def: &def, allow: o.allow, readOnly: o.readOnly}
	srv, err := nbd.NewServer(nbd.ServerConfig{Exports: table, TLSMode: mode, TLS: tlsCfg})
	if err != nil {
		return err
	}

	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for _, l := range o.listen {
		ln, err := listen(l)
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		fmt.Fprintf(stdout, "listening on %s\n", listenerURL(ln))
	}
	klog.InfoS("Serving", "version", Version(), "default", def.Redacted(), "allow", []string(o.allow), "tls", o.tlsMode)

	// Connections outlive the signal: in-flight requests get to finish.
	srvCtx := context.WithoutCancel(ctx)
	errc := make(chan error, len(lns))
	var wg sync.WaitGroup
	for _, ln := range lns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(srvCtx, ln); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	var serveErr error
	select {
	case <-ctx.Done():
		klog.InfoS("Shutting down: finishing in-flight requests")
	case serveErr = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), o.shutdownMax)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		klog.ErrorS(err, "Connections did not finish in time")
	}
	wg.Wait()
	for _, ln := range lns {
		if u, ok := ln.Addr().(*net.UnixAddr); ok {
			os.Remove(u.Name)
		}
	}
	return serveErr
}

// listen opens tcp://HOST:PORT or unix:///PATH.
func listen(s string) (net.Listener, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("--listen %q: %w", s, err)
	}
	switch u.Scheme {
	case "tcp":
		if u.Host == "" || u.Path != "" {
			return nil, fmt.Errorf("--listen %q: want tcp://HOST:PORT", s)
		}
		ln, err := net.Listen("tcp", u.Host)
		if err != nil {
			return nil, fmt.Errorf("--listen %q: %w", s, err)
		}
		return ln, nil
	case "unix":
		if u.Path == "" || u.Host != "" {
			return nil, fmt.Errorf("--listen %q: want unix:///ABSOLUTE/PATH", s)
		}
		// A socket left by a killed server would make Listen fail; remove
		// only sockets, never a file someone cares about.
		if fi, err := os.Lstat(u.Path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(u.Path)
		}
		ln, err := net.Listen("unix", u.Path)
		if err != nil {
			return nil, fmt.Errorf("--listen %q: %w", s, err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(true)
		return ln, nil
	}
	return nil, fmt.Errorf("--listen %q: scheme must be tcp or unix", s)
}

func listenerURL(ln net.Listener) string {
	switch a := ln.Addr().(type) {
	case *net.UnixAddr:
		return "unix://" + a.Name
	default:
		return "tcp://" + a.String()
	}
}

// loadServerTLS reads nbdkit-style certificate files from dir.
func loadServerTLS(dir string, verifyPeer bool) (*tls.Config, error) {
	if dir == "" {
		return nil, errors.New("--tls needs --tls-certificates DIR")
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("--tls-certificates: %w", err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if verifyPeer {
		pem, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
		if err != nil {
			return nil, fmt.Errorf("--tls-verify-peer: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--tls-verify-peer: no certificates in %s", filepath.Join(dir, "ca-cert.pem"))
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// hostOwner names this process for backend leases: host name and PID, so
// two servers on one host are told apart too.
func hostOwner() string {
	h, err := os.Hostname()
	if err != nil {
		h = "unknown-host"
	}
	return fmt.Sprintf("csi-nbd-serve@%s/%d", h, os.Getpid())
}
