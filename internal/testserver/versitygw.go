package testserver

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/csi-nbd/csi-nbd/internal/testpki"
)

// Versitygw is a versitygw S3 gateway (posix backend over a temp
// directory) running as a separate process on 127.0.0.1. Stop and Restart
// let tests take it away under a running volume and bring it back with the
// same data on the same port.
type Versitygw struct {
	t      testing.TB
	bin    string
	Dir    string // the posix backend's root: one directory per bucket
	Port   int
	Access string
	Secret string

	tlsDir string // with server-cert.pem, server-key.pem: serve https
	client *http.Client

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan error // receives cmd.Wait's result
	log    *os.File
}

// Endpoint is the gateway's base URL.
func (v *Versitygw) Endpoint() string {
	if v.tlsDir != "" {
		return "https://" + Addr(v.Port)
	}
	return "http://" + Addr(v.Port)
}

// StartVersitygw starts versitygw (RequireTool: skipped when missing,
// except in CI) with fresh credentials and an empty data directory, and
// stops it when the test ends.
func StartVersitygw(t testing.TB) *Versitygw {
	t.Helper()
	return startVersitygw(t, nil)
}

// StartVersitygwTLS is StartVersitygw serving https with a certificate
// from ca (for localhost, 127.0.0.1 and ::1).
func StartVersitygwTLS(t testing.TB, ca *testpki.CA) *Versitygw {
	t.Helper()
	return startVersitygw(t, ca)
}

func startVersitygw(t testing.TB, ca *testpki.CA) *Versitygw {
	v := &Versitygw{
		t:      t,
		bin:    RequireTool(t, "versitygw"),
		Dir:    t.TempDir(),
		Port:   FreePort(t),
		Access: "testaccess",
		Secret: "testsecret0123456789",
	}
	v.client = http.DefaultClient
	if ca != nil {
		v.tlsDir = ca.ServerDir(t)
		v.client = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}}}
	}
	logf, err := os.Create(filepath.Join(t.TempDir(), "versitygw.log"))
	if err != nil {
		t.Fatal(err)
	}
	v.log = logf
	t.Cleanup(func() {
		v.Stop()
		logf.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logf.Name()); err == nil && len(b) > 0 {
				t.Logf("versitygw log:\n%s", tail(b, 4000))
			}
		}
	})
	v.Restart()
	return v
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// Restart starts the gateway again (after Stop) on the same port and data
// directory, and waits until it answers its health check.
func (v *Versitygw) Restart() {
	v.t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd != nil {
		v.t.Fatal("versitygw: Restart while running")
	}
	args := []string{"--port", Addr(v.Port), "--access", v.Access, "--secret", v.Secret, "--health", "/health"}
	if v.tlsDir != "" {
		args = append(args, "--cert", filepath.Join(v.tlsDir, "server-cert.pem"), "--key", filepath.Join(v.tlsDir, "server-key.pem"))
	}
	cmd := exec.Command(v.bin, append(args, "posix", v.Dir)...)
	cmd.Stdout, cmd.Stderr = v.log, v.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		v.t.Fatalf("versitygw: %v", err)
	}
	v.cmd = cmd
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := v.client.Get(v.Endpoint() + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-exited:
			v.cmd = nil
			v.t.Fatalf("versitygw exited at start: %v (log %s)", err, v.log.Name())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			v.t.Fatalf("versitygw: no health answer on %s after 30 s: %v", v.Endpoint(), err)
		}
	}
	v.exited = exited
}

// Stop kills the gateway (SIGKILL: no chance to finish requests) and waits
// until it has gone. It is a no-op when it is not running.
func (v *Versitygw) Stop() {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.cmd == nil {
		return
	}
	_ = v.cmd.Process.Kill()
	// Reaped, so the port is free for a Restart.
	select {
	case <-v.exited:
	case <-time.After(10 * time.Second):
		v.t.Errorf("versitygw: pid %d did not exit after SIGKILL", v.cmd.Process.Pid)
	}
	v.cmd = nil
}

// Client returns an SDK client for the gateway (path-style addressing).
func (v *Versitygw) Client() *s3.Client {
	return s3.New(s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(v.Endpoint()),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(v.Access, v.Secret, ""),
		HTTPClient:   v.client,
	})
}

// Secrets are the gateway's credentials in the keys backends.Env uses.
func (v *Versitygw) Secrets() map[string]string {
	return map[string]string{"access-key-id": v.Access, "secret-access-key": v.Secret}
}

// CreateBucket makes a bucket, failing the test on error.
func (v *Versitygw) CreateBucket(name string) {
	v.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := v.Client().CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(name)}); err != nil {
		v.t.Fatalf("versitygw: create bucket %q: %v", name, err)
	}
}

// Keys lists the object keys under prefix (sorted, as S3 lists them).
func (v *Versitygw) Keys(bucket, prefix string) ([]string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var keys []string
	p := s3.NewListObjectsV2Paginator(v.Client(), &s3.ListObjectsV2Input{
		Bucket: aws.String(bucket), Prefix: aws.String(prefix)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("list s3://%s/%s: %w", bucket, prefix, err)
		}
		for _, o := range page.Contents {
			keys = append(keys, aws.ToString(o.Key))
		}
	}
	return keys, nil
}
