package helm_test

import (
	"context"
	"testing"

	"github.com/csi-nbd/csi-nbd/internal/kubetest"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/release"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cli-runtime/pkg/genericclioptions"
)

// apiServer is a real etcd and kube-apiserver on 127.0.0.1 (no kubelet, no
// controllers): enough for the API server's own validation and admission
// of every object the chart makes.
type apiServer struct {
	*kubetest.Server
	kubeconfig string
}

func startAPIServer(t *testing.T) *apiServer {
	t.Helper()
	s := kubetest.StartWith(t, kubetest.Options{
		// RBAC as in a real cluster, so the chart's roles are checked
		// for escalation.
		AuthorizationMode: "RBAC",
		// As every real cluster: the node plugin is privileged.
		Args: []string{"--allow-privileged=true"},
	})
	return &apiServer{Server: s, kubeconfig: s.Kubeconfig(t)}
}

func (s *apiServer) helm(t *testing.T) *action.Configuration {
	t.Helper()
	f := genericclioptions.NewConfigFlags(false)
	ns := namespace
	f.KubeConfig, f.Namespace = &s.kubeconfig, &ns
	cfg := &action.Configuration{}
	if err := cfg.Init(f, namespace, "secret", t.Logf); err != nil {
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
	cs := s.Client(t)
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
