package helm_test

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

	"github.com/csi-nbd/csi-nbd/internal/testpki"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/release"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
)

// kubeBin finds etcd and kube-apiserver as hack/kube-testenv.sh builds
// them (KUBE_TESTENV_BIN overrides). Missing: skipped locally, a failure
// in CI, like testserver.RequireTool.
func kubeBin(t *testing.T) string {
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

// process runs a server for the test's lifetime; its output is shown when
// the test fails.
func process(t *testing.T, name string, args ...string) {
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

// apiServer is a real etcd and kube-apiserver on 127.0.0.1 (no kubelet, no
// controllers): enough for the API server's own validation and admission
// of every object the chart makes.
type apiServer struct {
	url, token, caFile string
}

func startAPIServer(t *testing.T) *apiServer {
	bin := kubeBin(t)
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
		"ca.pem":     ca.PEM,
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
	process(t, filepath.Join(bin, "kube-apiserver"),
		"--etcd-servers="+clientURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		"--tls-cert-file="+filepath.Join(dir, "server.pem"), "--tls-private-key-file="+filepath.Join(dir, "server.key"),
		"--cert-dir="+filepath.Join(dir, "certs"),
		"--token-auth-file="+filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file="+filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--endpoint-reconciler-type=none",
		// As every real cluster: the node plugin is privileged.
		"--allow-privileged=true",
		// storage.k8s.io/v1 VolumeAttributesClass is on by default in 1.34.
		"--v=1")

	s := &apiServer{url: "https://" + testserver.Addr(port), token: token, caFile: filepath.Join(dir, "ca.pem")}
	s.waitReady(t, ca)
	return s
}

// waitReady polls /readyz until the API server answers ok; the bound only
// keeps a broken server from hanging the test.
func (s *apiServer) waitReady(t *testing.T, ca *testpki.CA) {
	t.Helper()
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool(), MinVersion: tls.VersionTLS12}},
	}
	deadline := time.Now().Add(3 * time.Minute)
	var last string
	for time.Now().Before(deadline) {
		req, _ := http.NewRequest(http.MethodGet, s.url+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+s.token)
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
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("kube-apiserver not ready: %s", last)
}

func (s *apiServer) getter(namespace string) *genericclioptions.ConfigFlags {
	f := genericclioptions.NewConfigFlags(false)
	f.APIServer, f.BearerToken, f.CAFile, f.Namespace = &s.url, &s.token, &s.caFile, &namespace
	return f
}

func (s *apiServer) clientset(t *testing.T) *kubernetes.Clientset {
	t.Helper()
	rc, err := s.getter(namespace).ToRESTConfig()
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

func (s *apiServer) helm(t *testing.T) *action.Configuration {
	t.Helper()
	cfg := &action.Configuration{}
	if err := cfg.Init(s.getter(namespace), namespace, "secret", t.Logf); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestAPIServer installs the chart into a real API server with each
// example values file, upgrades one release and uninstalls them: the
// server's own validation and admission accept every object, the chart
// sees the server's APIs through discovery, and an uninstall leaves nothing
// of the chart's behind.
func TestAPIServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	s := startAPIServer(t)
	cs := s.clientset(t)
	ctx := context.Background()

	install := func(t *testing.T, files ...string) {
		t.Helper()
		in := action.NewInstall(s.helm(t))
		in.ReleaseName, in.Namespace, in.CreateNamespace = "csi-nbd", namespace, true
		var vals map[string]any
		if len(files) > 0 {
			vals = valuesFile(t, files...)
		}
		rel, err := in.Run(loadChart(t), vals)
		if err != nil {
			t.Fatalf("helm install %v: %v", files, err)
		}
		if rel.Info.Status != release.StatusDeployed {
			t.Fatalf("release %s", rel.Info.Status)
		}
	}
	uninstall := func(t *testing.T) {
		t.Helper()
		if _, err := action.NewUninstall(s.helm(t)).Run("csi-nbd"); err != nil {
			t.Fatalf("helm uninstall: %v", err)
		}
		if _, err := cs.StorageV1().CSIDrivers().Get(ctx, driverName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("CSIDriver after uninstall: %v", err)
		}
		sel := metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=csi-nbd"}
		crs, err := cs.RbacV1().ClusterRoles().List(ctx, sel)
		if err != nil {
			t.Fatal(err)
		}
		scs, err := cs.StorageV1().StorageClasses().List(ctx, sel)
		if err != nil {
			t.Fatal(err)
		}
		if len(crs.Items)+len(scs.Items) != 0 {
			t.Errorf("%d ClusterRoles and %d StorageClasses left after uninstall", len(crs.Items), len(scs.Items))
		}
	}

	t.Run("defaults, then upgrade", func(t *testing.T) {
		install(t)
		drv, err := cs.StorageV1().CSIDrivers().Get(ctx, driverName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !*drv.Spec.AttachRequired {
			t.Error("CSIDriver stored without attachRequired")
		}
		// Discovery, not --kube-version, decided to make these.
		vacs, err := cs.StorageV1().VolumeAttributesClasses().List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(vacs.Items) != 2 {
			t.Errorf("%d VolumeAttributesClasses stored, want 2", len(vacs.Items))
		}
		if _, err := cs.AppsV1().DaemonSets(namespace).Get(ctx, "csi-nbd-node", metav1.GetOptions{}); err != nil {
			t.Error(err)
		}

		// Same classes, local images, no snapshotter: its rights go.
		up := action.NewUpgrade(s.helm(t))
		up.Namespace = namespace
		if _, err := up.Run("csi-nbd", loadChart(t), valuesFile(t, "memory.yaml", "local-images.yaml")); err != nil {
			t.Fatalf("helm upgrade: %v", err)
		}
		if _, err := cs.RbacV1().ClusterRoles().Get(ctx, "csi-nbd-snapshotter", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("snapshotter ClusterRole after an upgrade without it: %v", err)
		}
		uninstall(t)
	})
	for _, f := range []string{"s3.yaml", "http-iso.yaml"} {
		t.Run(f, func(t *testing.T) {
			install(t, f)
			uninstall(t)
		})
	}
}
