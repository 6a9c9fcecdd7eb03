package testserver

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// NginxOptions configure StartNginx.
type NginxOptions struct {
	// Root is the directory served; empty means a fresh temp dir.
	Root string
	// CertPEM and KeyPEM, when set, make the server speak HTTPS (HTTP/2
	// offered through ALPN) instead of plain HTTP.
	CertPEM, KeyPEM []byte
}

// Nginx is a running Debian nginx serving Root on 127.0.0.1 under three
// locations that map to the same files:
//
//	/            ranges, ETag and Last-Modified (nginx's defaults)
//	/noranges/   Range headers ignored (max_ranges 0): whole-file 200s
//	/noetag/     ranges and Last-Modified, but no ETag
type Nginx struct {
	URL  string // "http://127.0.0.1:PORT" or "https://127.0.0.1:PORT", no trailing slash
	Root string
	Port int
	dir  string
}

// Path returns the file's path under Root, for tests that change it.
func (n *Nginx) Path(name string) string { return filepath.Join(n.Root, name) }

// WriteFile writes data to name under Root and gives it mtime: nginx's
// ETag is made of the mtime (in seconds) and the size, so a test that
// replaces a file with one of the same size must move the mtime to make
// the change visible. The file is replaced by a rename, so a request in
// flight keeps reading the old one (as on a real origin).
func (n *Nginx) WriteFile(t testing.TB, name string, data []byte, mtime time.Time) {
	t.Helper()
	p := n.Path(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(tmp, mtime, mtime); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		t.Fatal(err)
	}
}

// AccessLog returns nginx's access log so far (combined format: the
// request line shows the protocol, e.g. "GET /f HTTP/2.0").
func (n *Nginx) AccessLog() string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "access.log"))
	return string(b)
}

// ErrorLog returns what nginx wrote to its error log so far.
func (n *Nginx) ErrorLog() string {
	b, _ := os.ReadFile(filepath.Join(n.dir, "error.log"))
	return string(b)
}

const nginxConf = `# written by internal/testserver for one test
daemon off;
master_process off;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
events { worker_connections 256; }
http {
	access_log %[1]s/access.log;
	client_body_temp_path %[1]s/body;
	proxy_temp_path %[1]s/proxy;
	fastcgi_temp_path %[1]s/fastcgi;
	uwsgi_temp_path %[1]s/uwsgi;
	scgi_temp_path %[1]s/scgi;
	default_type application/octet-stream;
	sendfile on;
	keepalive_requests 100000;
	server {
		listen 127.0.0.1:%[2]d %[3]s;
		server_name localhost;
		%[4]s
		root %[5]s;
		location / { }
		location /noranges/ { alias %[5]s/; max_ranges 0; }
		location /noetag/ { alias %[5]s/; etag off; }
	}
}
`

// StartNginx runs nginx in the foreground as a single process (so it never
// switches to another user, even as root) with a config, pid file, logs
// and temp paths in a temp dir, and stops it when the test ends.
func StartNginx(t testing.TB, o NginxOptions) *Nginx {
	t.Helper()
	bin := RequireTool(t, "nginx")
	dir := t.TempDir()
	root := o.Root
	if root == "" {
		root = t.TempDir()
	}
	var listenOpts, tlsConf string
	scheme := "http"
	if o.CertPEM != nil {
		scheme, listenOpts = "https", "ssl http2"
		for name, b := range map[string][]byte{"cert.pem": o.CertPEM, "key.pem": o.KeyPEM} {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		tlsConf = fmt.Sprintf("ssl_certificate %[1]s/cert.pem; ssl_certificate_key %[1]s/key.pem;", dir)
	}
	// A port found free may be taken before nginx binds it: try again.
	var lastErr error
	for range 5 {
		port := FreePort(t)
		conf := filepath.Join(dir, "nginx.conf")
		text := fmt.Sprintf(nginxConf, dir, port, listenOpts, tlsConf, root)
		if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		n := &Nginx{URL: fmt.Sprintf("%s://127.0.0.1:%d", scheme, port), Root: root, Port: port, dir: dir}
		if lastErr = n.start(t, bin, conf); lastErr == nil {
			return n
		}
		if !strings.Contains(lastErr.Error(), "Address already in use") {
			break
		}
	}
	t.Fatalf("nginx: %v", lastErr)
	return nil
}

func (n *Nginx) start(t testing.TB, bin, conf string) error {
	var stderr bytes.Buffer
	cmd := exec.Command(bin, "-p", n.dir, "-e", filepath.Join(n.dir, "error.log"), "-c", conf)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	var once sync.Once
	go func() { cmd.Wait(); close(exited) }()
	stop := func() {
		once.Do(func() {
			cmd.Process.Kill()
			<-exited
		})
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", Addr(n.Port), time.Second)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			return fmt.Errorf("exited at start: %s %s", stderr.String(), n.ErrorLog())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			stop()
			return fmt.Errorf("not listening on %s after 10s: %s", Addr(n.Port), n.ErrorLog())
		}
	}
	t.Cleanup(stop)
	return nil
}
