// Package kubetest starts a real etcd and kube-apiserver on 127.0.0.1 for
// tests (no kubelet, no controllers), from the binaries
// hack/kube-testenv.sh builds.
package kubetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/csi-nbd/csi-nbd/internal/testpki"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
)

// Bin finds etcd and kube-apiserver as hack/kube-testenv.sh builds them
// (KUBE_TESTENV_BIN overrides). Missing: skipped locally, a failure in CI
// (hack/deps.sh builds them there), like testserver.RequireTool.
func Bin(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("KUBE_TESTENV_BIN")
	if dir == "" {
		dir = filepath.Join(envOr("KUBE_CACHE", "/var/cache/csi-nbd/kube"), envOr("K8S_VERSION", "v1.34.4"), "bin")
	}
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("%s is required in CI (hack/kube-testenv.sh): %v", b, err)
			}
			t.Skipf("%s not built: run hack/kube-testenv.sh (%v)", b, err)
		}
	}
	return dir
}

func envOr(k, dflt string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return dflt
}

// Server is a running API server.
type Server struct {
	Config *rest.Config // admin (system:masters) over TLS
}

// Client returns a clientset for the admin.
func (s *Server) Client(t testing.TB) *kubernetes.Clientset {
	t.Helper()
	cs, err := kubernetes.NewForConfig(s.Config)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// Kubeconfig writes a kubeconfig file for the admin and returns its path.
func (s *Server) Kubeconfig(t testing.TB) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["test"] = &clientcmdapi.Cluster{Server: s.Config.Host, CertificateAuthorityData: s.Config.CAData}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: s.Config.BearerToken}
	cfg.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin"}
	cfg.CurrentContext = "test"
	p := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// Options adjust the API server StartWith runs.
type Options struct {
	// AuthorizationMode is kube-apiserver's --authorization-mode; empty
	// means AlwaysAllow. It is an option rather than an Arg because the
	// flag is a list: given twice, the modes add up instead of the last
	// one winning. "RBAC" makes the server check role escalation as a
	// real cluster does (the admin is in system:masters either way).
	AuthorizationMode string
	// Args go to kube-apiserver after the defaults (e.g.
	// --runtime-config=… to turn an API off, --allow-privileged=true).
	Args []string
}

// Start runs etcd and kube-apiserver for the test's lifetime and waits
// until the API server is ready. extraArgs go to kube-apiserver (e.g.
// --runtime-config=… to turn an API off).
func Start(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	return StartWith(t, Options{Args: extraArgs})
}

// StartWith is Start with Options.
func StartWith(t testing.TB, o Options) *Server {
	t.Helper()
	authz := o.AuthorizationMode
	if authz == "" {
		authz = "AlwaysAllow"
	}
	bin := Bin(t)
	dir := t.TempDir()

	etcdClient, etcdPeer := testserver.FreePort(t), testserver.FreePort(t)
	clientURL := "http://" + testserver.Addr(etcdClient)
	peerURL := "http://" + testserver.Addr(etcdPeer)
	process(t, filepath.Join(bin, "etcd"),
		"--name=test", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+clientURL, "--advertise-client-urls="+clientURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=test="+peerURL, "--log-level=warn")

	ca := testpki.NewCA(t, "kube-test-ca")
	cert, key := ca.Issue(t, "localhost", x509.ExtKeyUsageServerAuth)
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	saDER, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	token := fmt.Sprintf("t%d", time.Now().UnixNano())
	files := map[string][]byte{
		"server.pem": cert,
		"server.key": key,
		"sa.key":     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: saDER}),
		"sa.pub":     pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}),
		"tokens.csv": []byte(token + ",admin,admin,system:masters\n"),
	}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	port := testserver.FreePort(t)
	process(t, filepath.Join(bin, "kube-apiserver"), append([]string{
		"--etcd-servers=" + clientURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port),
		"--tls-cert-file=" + filepath.Join(dir, "server.pem"), "--tls-private-key-file=" + filepath.Join(dir, "server.key"),
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--token-auth-file=" + filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=" + authz,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--endpoint-reconciler-type=none",
		"--v=1"}, o.Args...)...)

	s := &Server{Config: &rest.Config{
		Host:            "https://" + testserver.Addr(port),
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: ca.PEM},
		QPS:             100, Burst: 200,
	}}
	waitReady(t, s.Config.Host, token, ca)
	return s
}

// waitReady polls /readyz until the API server answers ok; the bound only
// keeps a broken server from hanging the test.
func waitReady(t testing.TB, url, token string, ca *testpki.CA) {
	t.Helper()
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12}},
	}
	deadline := time.Now().Add(3 * time.Minute)
	var last string
	for time.Now().Before(deadline) {
		req, _ := http.NewRequest(http.MethodGet, url+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err == nil {
			var b bytes.Buffer
			_, _ = b.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			last = fmt.Sprintf("%d %s", resp.StatusCode, b.String())
		} else {
			last = err.Error()
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Fatalf("kube-apiserver not ready: %s", last)
}

// process runs a server for the test's lifetime; its output is shown when
// the test fails.
func process(t testing.TB, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, name, args...)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		if t.Failed() {
			b := out.Bytes()
			if len(b) > 8000 {
				b = b[len(b)-8000:]
			}
			t.Logf("%s output (tail):\n%s", filepath.Base(name), b)
		}
	})
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) Bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.b.Bytes()...)
}
