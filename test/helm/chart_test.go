// Package helm_test renders charts/csi-nbd with the helm library, as
// `helm install --dry-run` would, for several values sets, and decodes
// every object strictly with the Kubernetes scheme so that a misspelt
// field fails here rather than in a cluster.
package helm_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/releaseutil"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	_ "github.com/csi-nbd/csi-nbd/pkg/backends/all"
	"github.com/csi-nbd/csi-nbd/pkg/driver"
)

const (
	chartDir   = "../../charts/csi-nbd"
	deployDir  = "../../deploy"
	driverName = "csi-nbd.io"
	namespace  = "csi-nbd"
)

// storageClassParams are the StorageClass parameters csi-nbd knows
// (pkg/driver/params.go), so that a misspelt one in a values file fails.
var storageClassParams = []string{
	"backend", "url", "directory", "bucket", "prefix", "endpoint", "region", "pathStyle",
	"chunkSize", "headerSecret", "connections", "timeout", "cache", "cacheSize",
	"cacheBlockSize", "cacheOnRead", "readahead", "readaheadMax", "cow", "cowBlockSize",
	"readBytesPerSecond", "writeBytesPerSecond", "readIOPS", "writeIOPS", "burst", "fsType",
	"csi.storage.k8s.io/fstype",
	"csi.storage.k8s.io/provisioner-secret-name", "csi.storage.k8s.io/provisioner-secret-namespace",
	"csi.storage.k8s.io/node-stage-secret-name", "csi.storage.k8s.io/node-stage-secret-namespace",
	"csi.storage.k8s.io/controller-expand-secret-name", "csi.storage.k8s.io/controller-expand-secret-namespace",
}

var vacParams = []string{"readBytesPerSecond", "writeBytesPerSecond", "readIOPS", "writeIOPS", "burst"}

// strict rejects unknown and duplicate fields.
var strict = serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()

// foreignKinds are rendered by the chart but not in client-go's scheme
// (their CRDs come from other projects); they are decoded as unstructured.
var foreignKinds = map[string]bool{
	"monitoring.coreos.com/v1, Kind=ServiceMonitor":        true,
	"snapshot.storage.k8s.io/v1, Kind=VolumeSnapshotClass": true,
}

func loadChart(t *testing.T) *chart.Chart {
	t.Helper()
	c, err := loader.Load(chartDir)
	if err != nil {
		t.Fatalf("load chart: %v", err)
	}
	return c
}

// rendered is one release's objects by kind and name.
type rendered struct {
	objs  map[string]runtime.Object // "Kind/name"
	notes string
}

func (r *rendered) get(t *testing.T, kind, name string) runtime.Object {
	t.Helper()
	o, ok := r.objs[kind+"/"+name]
	if !ok {
		t.Fatalf("no %s %q rendered; have %v", kind, name, r.names())
	}
	return o
}

func (r *rendered) names() []string {
	var n []string
	for k := range r.objs {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

func (r *rendered) ofKind(kind string) []runtime.Object {
	var out []runtime.Object
	for _, k := range r.names() {
		if strings.HasPrefix(k, kind+"/") {
			out = append(out, r.objs[k])
		}
	}
	return out
}

// render installs the chart in client-only dry-run mode (schema checks,
// kubeVersion, required/fail included) and decodes the manifest.
func render(t *testing.T, vals map[string]any) (*rendered, error) {
	t.Helper()
	return renderFor(t, "v1.34.4", vals)
}

// renderFor renders for a cluster of the given Kubernetes version.
func renderFor(t *testing.T, kubeVersion string, vals map[string]any) (*rendered, error) {
	t.Helper()
	kv, err := chartutil.ParseKubeVersion(kubeVersion)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &action.Configuration{Log: t.Logf}
	in := action.NewInstall(cfg)
	in.DryRun, in.ClientOnly = true, true
	in.ReleaseName, in.Namespace = "csi-nbd", namespace
	in.KubeVersion = kv
	rel, err := in.Run(loadChart(t), vals)
	if err != nil {
		return nil, err
	}
	r := &rendered{objs: map[string]runtime.Object{}, notes: rel.Info.Notes}
	for name, doc := range releaseutil.SplitManifests(rel.Manifest) {
		obj := decode(t, name, []byte(doc))
		if obj == nil {
			continue
		}
		acc := obj.(interface {
			GetName() string
			GetNamespace() string
		})
		gvk := obj.GetObjectKind().GroupVersionKind()
		key := gvk.Kind + "/" + acc.GetName()
		if _, dup := r.objs[key]; dup {
			t.Errorf("%s rendered twice", key)
		}
		r.objs[key] = obj
	}
	return r, nil
}

func mustRender(t *testing.T, vals map[string]any) *rendered {
	t.Helper()
	r, err := render(t, vals)
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	return r
}

// decode decodes one YAML document strictly; nil for an empty one.
func decode(t *testing.T, where string, doc []byte) runtime.Object {
	t.Helper()
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		t.Fatalf("%s: not YAML: %v\n%s", where, err, doc)
	}
	if string(js) == "null" {
		return nil
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		t.Fatalf("%s: %v\n%s", where, err, doc)
	}
	gvk := u.GroupVersionKind()
	if foreignKinds[gvk.String()] {
		return u
	}
	obj, _, err := strict.Decode(js, nil, nil)
	if err != nil {
		t.Fatalf("%s (%s): %v\n%s", where, gvk, err, doc)
	}
	return obj
}

// valuesFile reads a values file from deploy/helm.
func valuesFile(t *testing.T, names ...string) map[string]any {
	t.Helper()
	out := map[string]any{}
	for _, n := range names {
		v, err := chartutil.ReadValuesFile(filepath.Join(deployDir, "helm", n))
		if err != nil {
			t.Fatal(err)
		}
		out = chartutil.CoalesceTables(v.AsMap(), out)
	}
	return out
}

// fromYAML is a values set written inline.
func fromYAML(t *testing.T, s string) map[string]any {
	t.Helper()
	v, err := chartutil.ReadValues([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return v.AsMap()
}

func container(t *testing.T, spec corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

func hasArg(c corev1.Container, arg string) bool { return slices.Contains(c.Args, arg) }

// checkInvariants holds for every values set.
func checkInvariants(t *testing.T, r *rendered) {
	t.Helper()
	drv := r.get(t, "CSIDriver", driverName).(*storagev1.CSIDriver)
	if drv.Spec.AttachRequired == nil || !*drv.Spec.AttachRequired {
		t.Error("CSIDriver: attachRequired must be true (the single-writer guard)")
	}
	if drv.Spec.PodInfoOnMount == nil || !*drv.Spec.PodInfoOnMount {
		t.Error("CSIDriver: podInfoOnMount must be true")
	}
	if drv.Spec.FSGroupPolicy == nil || *drv.Spec.FSGroupPolicy != storagev1.FileFSGroupPolicy {
		t.Errorf("CSIDriver: fsGroupPolicy %v, want File", drv.Spec.FSGroupPolicy)
	}
	if !slices.Equal(drv.Spec.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent}) {
		t.Errorf("CSIDriver: volumeLifecycleModes %v", drv.Spec.VolumeLifecycleModes)
	}

	ds := r.get(t, "DaemonSet", "csi-nbd-node").(*appsv1.DaemonSet)
	node := container(t, ds.Spec.Template.Spec, "csi-nbd")
	if node.SecurityContext == nil || node.SecurityContext.Privileged == nil || !*node.SecurityContext.Privileged {
		t.Error("node plugin must be privileged")
	}
	if !hasArg(node, "node") || !hasArg(node, "--node-id=$(NODE_NAME)") {
		t.Errorf("node args %q", node.Args)
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range node.VolumeMounts {
		mounts[m.Name] = m
	}
	kubeletDir := "/var/lib/kubelet"
	for _, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == "kubelet-dir" {
			kubeletDir = v.HostPath.Path
		}
	}
	if m := mounts["kubelet-dir"]; m.MountPath != kubeletDir || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		var prop corev1.MountPropagationMode
		if m.MountPropagation != nil {
			prop = *m.MountPropagation
		}
		t.Errorf("kubelet dir mounted at %q with propagation %q: want %s, Bidirectional", m.MountPath, prop, kubeletDir)
	}
	// FUSE+loop mounts in the state directory must outlive the container
	// (fd-store resume) and be visible to the next one.
	if m := mounts["state-dir"]; m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("state dir mounted with propagation %v: want Bidirectional", m.MountPropagation)
	}
	if !hasArg(node, "--kubelet-endpoint="+kubeletDir+"/plugins/"+driverName+"/csi.sock") {
		t.Errorf("node args %q: kubelet endpoint not under %s", node.Args, kubeletDir)
	}
	for _, want := range []string{"dev", "sys", "lib-modules", "state-dir", "registration-dir", "socket-dir"} {
		if _, ok := mounts[want]; !ok {
			t.Errorf("node plugin does not mount %s", want)
		}
	}
	if !mounts["lib-modules"].ReadOnly {
		t.Error("/lib/modules must be read-only")
	}

	dep := r.get(t, "Deployment", "csi-nbd-controller").(*appsv1.Deployment)
	prov := container(t, dep.Spec.Template.Spec, "csi-provisioner")
	if !hasArg(prov, "--extra-create-metadata") {
		t.Errorf("provisioner args %q lack --extra-create-metadata", prov.Args)
	}
	for _, c := range dep.Spec.Template.Spec.Containers {
		if c.Name != "csi-nbd" && !hasArg(c, "--csi-address=/csi/csi.sock") {
			t.Errorf("sidecar %s args %q: not on the driver's socket", c.Name, c.Args)
		}
	}
	if *dep.Spec.Replicas > 1 {
		for _, c := range dep.Spec.Template.Spec.Containers {
			if strings.HasPrefix(c.Name, "csi-") && c.Name != "csi-nbd" && !hasArg(c, "--leader-election") {
				t.Errorf("%s: no leader election with %d replicas", c.Name, *dep.Spec.Replicas)
			}
		}
	}

	// Every pod's ServiceAccount and every binding's role exist (with rbac.create).
	if sas := r.ofKind("ServiceAccount"); len(sas) > 0 {
		for _, sa := range []string{dep.Spec.Template.Spec.ServiceAccountName, ds.Spec.Template.Spec.ServiceAccountName} {
			r.get(t, "ServiceAccount", sa)
		}
		for _, o := range r.ofKind("ClusterRoleBinding") {
			b := o.(*rbacv1.ClusterRoleBinding)
			r.get(t, "ClusterRole", b.RoleRef.Name)
			for _, s := range b.Subjects {
				r.get(t, "ServiceAccount", s.Name)
				if s.Namespace != namespace {
					t.Errorf("%s: subject namespace %q", b.Name, s.Namespace)
				}
			}
		}
		for _, o := range r.ofKind("RoleBinding") {
			r.get(t, "Role", o.(*rbacv1.RoleBinding).RoleRef.Name)
		}
	}

	// Least privilege: no wildcards, and Secrets are only ever read.
	var rules []rbacv1.PolicyRule
	for _, o := range r.ofKind("ClusterRole") {
		rules = append(rules, o.(*rbacv1.ClusterRole).Rules...)
	}
	for _, o := range r.ofKind("Role") {
		rules = append(rules, o.(*rbacv1.Role).Rules...)
	}
	for _, rule := range rules {
		if slices.Contains(rule.Verbs, "*") || slices.Contains(rule.Resources, "*") || slices.Contains(rule.APIGroups, "*") {
			t.Errorf("wildcard rule %+v", rule)
		}
		if slices.Contains(rule.Resources, "secrets") {
			for _, v := range rule.Verbs {
				if v != "get" && v != "list" && v != "watch" {
					t.Errorf("secrets: %s granted", v)
				}
			}
		}
	}

	for _, o := range r.ofKind("StorageClass") {
		sc := o.(*storagev1.StorageClass)
		if sc.Provisioner != driverName {
			t.Errorf("StorageClass %s: provisioner %q", sc.Name, sc.Provisioner)
		}
		for k := range sc.Parameters {
			if !slices.Contains(storageClassParams, k) {
				t.Errorf("StorageClass %s: unknown parameter %q", sc.Name, k)
			}
		}
		if sc.Parameters["backend"] == "memory" && (sc.VolumeBindingMode == nil || *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer) {
			t.Errorf("StorageClass %s: memory volumes need WaitForFirstConsumer", sc.Name)
		}
	}
	for _, o := range r.ofKind("VolumeAttributesClass") {
		vac := o.(*storagev1.VolumeAttributesClass)
		if vac.DriverName != driverName {
			t.Errorf("VolumeAttributesClass %s: driverName %q", vac.Name, vac.DriverName)
		}
		for k := range vac.Parameters {
			if !slices.Contains(vacParams, k) {
				t.Errorf("VolumeAttributesClass %s: unknown parameter %q", vac.Name, k)
			}
		}
	}
	// Namespaced objects go to the release's namespace.
	for k, o := range r.objs {
		if m, ok := o.(interface{ GetNamespace() string }); ok {
			if ns := m.GetNamespace(); ns != "" && ns != namespace {
				t.Errorf("%s in namespace %q", k, ns)
			}
		}
	}
}

func TestDefaults(t *testing.T) {
	r := mustRender(t, nil)
	checkInvariants(t, r)

	ds := r.get(t, "DaemonSet", "csi-nbd-node").(*appsv1.DaemonSet)
	if ds.Spec.UpdateStrategy.Type != appsv1.OnDeleteDaemonSetStrategyType {
		t.Errorf("node updateStrategy %q, want OnDelete", ds.Spec.UpdateStrategy.Type)
	}
	if ps := ds.Spec.Template.Spec; !ps.HostNetwork || ps.PriorityClassName != "system-node-critical" {
		t.Errorf("node pod: hostNetwork %v priorityClassName %q", ps.HostNetwork, ps.PriorityClassName)
	}
	node := container(t, ds.Spec.Template.Spec, "csi-nbd")
	if node.Image != "ghcr.io/csi-nbd/csi-nbd:"+loadChart(t).Metadata.AppVersion {
		t.Errorf("node image %q: want the appVersion tag", node.Image)
	}
	for _, a := range node.Args {
		if strings.HasPrefix(a, "--metrics-address") {
			t.Errorf("metrics off, yet %s", a)
		}
	}

	dep := r.get(t, "Deployment", "csi-nbd-controller").(*appsv1.Deployment)
	var names []string
	for _, c := range dep.Spec.Template.Spec.Containers {
		names = append(names, c.Name)
	}
	want := []string{"csi-nbd", "csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "liveness-probe"}
	if !slices.Equal(names, want) {
		t.Errorf("controller containers %q, want %q", names, want)
	}
	for _, c := range dep.Spec.Template.Spec.Containers {
		if hasArg(c, "--leader-election") {
			t.Errorf("%s: leader election with one replica", c.Name)
		}
	}
	if _, ok := r.objs["Role/csi-nbd-leader-election"]; ok {
		t.Error("leases Role rendered with one replica")
	}

	sc := r.get(t, "StorageClass", "nbd").(*storagev1.StorageClass)
	if sc.Parameters["backend"] != "memory" || !*sc.AllowVolumeExpansion {
		t.Errorf("StorageClass nbd: %+v", sc)
	}
	for _, n := range []string{"nbd-throttled", "nbd-unlimited"} {
		r.get(t, "VolumeAttributesClass", n)
	}

	// The node plugin reads PVs, PVCs and VolumeAttributesClasses and
	// writes Events, nothing else.
	node_ := r.get(t, "ClusterRole", "csi-nbd-node").(*rbacv1.ClusterRole)
	for _, rule := range node_.Rules {
		for _, res := range rule.Resources {
			for _, v := range rule.Verbs {
				ok := (res == "persistentvolumes" || res == "persistentvolumeclaims" || res == "volumeattributesclasses") && slices.Contains([]string{"get", "list", "watch"}, v) ||
					res == "events" && (v == "create" || v == "patch")
				if !ok {
					t.Errorf("node ClusterRole grants %s %s", v, res)
				}
			}
		}
	}
	if !strings.Contains(r.notes, "storageClassName: nbd") {
		t.Errorf("NOTES lack the quickstart:\n%s", r.notes)
	}
}

func TestDeployValues(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(deployDir, "helm", "*.yaml"))
	if err != nil || len(files) < 3 {
		t.Fatalf("deploy/helm values files: %v %v", files, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			r := mustRender(t, valuesFile(t, filepath.Base(f)))
			checkInvariants(t, r)
			// Every class must provision: its parameters pass the
			// driver's own check (an example with a bad value would
			// fail every CreateVolume).
			for _, o := range r.ofKind("StorageClass") {
				sc := o.(*storagev1.StorageClass)
				if err := driver.CheckParameters(sc.Parameters); err != nil {
					t.Errorf("StorageClass %s: %v", sc.Name, err)
				}
			}
		})
	}
	t.Run("s3", func(t *testing.T) {
		r := mustRender(t, valuesFile(t, "s3.yaml"))
		sc := r.get(t, "StorageClass", "nbd").(*storagev1.StorageClass)
		for _, k := range []string{"provisioner", "node-stage", "controller-expand"} {
			if sc.Parameters["csi.storage.k8s.io/"+k+"-secret-name"] != "s3-credentials" ||
				sc.Parameters["csi.storage.k8s.io/"+k+"-secret-namespace"] != "csi-nbd" {
				t.Errorf("StorageClass nbd: no %s secret in %v", k, sc.Parameters)
			}
		}
		if sc.Annotations["storageclass.kubernetes.io/is-default-class"] != "true" {
			t.Error("s3 class should be the default class")
		}
		thr := r.get(t, "StorageClass", "nbd-s3-throttled").(*storagev1.StorageClass)
		if thr.Parameters["readBytesPerSecond"] != "50Mi" || thr.Parameters["bucket"] != "volumes" {
			t.Errorf("nbd-s3-throttled parameters %v", thr.Parameters)
		}
		if _, ok := thr.Annotations["storageclass.kubernetes.io/is-default-class"]; ok {
			t.Error("a listed class inherited isDefault")
		}
	})
	t.Run("http-iso", func(t *testing.T) {
		r := mustRender(t, valuesFile(t, "http-iso.yaml"))
		iso := r.get(t, "StorageClass", "nbd-iso").(*storagev1.StorageClass)
		if *iso.AllowVolumeExpansion {
			t.Error("allowVolumeExpansion: false was lost to the default")
		}
		if iso.Parameters["cow"] != "true" || iso.Parameters["backend"] != "http" {
			t.Errorf("nbd-iso parameters %v", iso.Parameters)
		}
	})
	t.Run("local-images", func(t *testing.T) {
		r := mustRender(t, valuesFile(t, "memory.yaml", "local-images.yaml"))
		checkImages(t, r, "localhost/", corev1.PullNever)
	})
}

// checkImages: every container's image comes from prefix with policy.
func checkImages(t *testing.T, r *rendered, prefix string, policy corev1.PullPolicy) {
	t.Helper()
	var specs []corev1.PodSpec
	for _, o := range r.ofKind("Deployment") {
		specs = append(specs, o.(*appsv1.Deployment).Spec.Template.Spec)
	}
	for _, o := range r.ofKind("DaemonSet") {
		specs = append(specs, o.(*appsv1.DaemonSet).Spec.Template.Spec)
	}
	n := 0
	for _, s := range specs {
		for _, c := range append(s.InitContainers, s.Containers...) {
			n++
			if !strings.HasPrefix(c.Image, prefix) || c.ImagePullPolicy != policy {
				t.Errorf("container %s: image %q policy %q, want %s* %s", c.Name, c.Image, c.ImagePullPolicy, prefix, policy)
			}
		}
	}
	if n == 0 {
		t.Error("no containers")
	}
}

func TestOverrides(t *testing.T) {
	r := mustRender(t, fromYAML(t, `
kubeletDir: /var/lib/k0s/kubelet/
image: {repository: reg.example/csi-nbd, tag: v9, pullPolicy: Always}
controller:
  replicas: 2
  provisioner: {image: {repository: reg.example/prov, tag: p1, pullPolicy: Always}, featureGates: "CrossNamespaceVolumeDataSource=true"}
  attacher: {image: {repository: reg.example/att, tag: a1, pullPolicy: Always}}
  resizer: {image: {repository: reg.example/res, tag: r1, pullPolicy: Always}}
  snapshotter: {image: {repository: reg.example/snap, tag: s1, pullPolicy: Always}}
  livenessProbe: {image: {repository: reg.example/lp, tag: l1, pullPolicy: Always}}
  nodeSelector: {role: infra}
node:
  updateStrategy: {type: RollingUpdate, rollingUpdate: {maxUnavailable: 1}}
  hostNetwork: false
  stateDir: /mnt/csi-nbd
  maxVolumes: 32
  livenessProbe: {image: {repository: reg.example/lp, tag: l1, pullPolicy: Always}}
  tolerations: []
metrics:
  enabled: true
  serviceMonitor: {enabled: true, labels: {release: prom}}
storageClass: {name: fast, isDefault: true, mountOptions: [noatime]}
volumeAttributesClasses: []
volumeSnapshotClass: {create: true}
`))
	checkInvariants(t, r)
	checkImages(t, r, "reg.example/", corev1.PullAlways)

	dep := r.get(t, "Deployment", "csi-nbd-controller").(*appsv1.Deployment)
	for _, c := range dep.Spec.Template.Spec.Containers {
		if c.Name == "csi-nbd" || c.Name == "liveness-probe" {
			continue
		}
		if !hasArg(c, "--leader-election") || !hasArg(c, "--leader-election-namespace=$(NAMESPACE)") {
			t.Errorf("%s: no leader election with 2 replicas: %q", c.Name, c.Args)
		}
	}
	if !hasArg(container(t, dep.Spec.Template.Spec, "csi-provisioner"), "--feature-gates=CrossNamespaceVolumeDataSource=true") {
		t.Error("provisioner feature gates not passed")
	}
	if !hasArg(container(t, dep.Spec.Template.Spec, "csi-nbd"), "--metrics-address=:9808") {
		t.Error("controller metrics address missing")
	}
	if dep.Spec.Template.Spec.NodeSelector["role"] != "infra" {
		t.Error("controller nodeSelector lost")
	}
	r.get(t, "Role", "csi-nbd-leader-election")
	r.get(t, "RoleBinding", "csi-nbd-leader-election")

	ds := r.get(t, "DaemonSet", "csi-nbd-node").(*appsv1.DaemonSet)
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ds.Spec.Template.Spec.HostNetwork {
		t.Errorf("node: strategy %q hostNetwork %v", ds.Spec.UpdateStrategy.Type, ds.Spec.Template.Spec.HostNetwork)
	}
	node := container(t, ds.Spec.Template.Spec, "csi-nbd")
	for _, a := range []string{"--state-dir=/mnt/csi-nbd", "--max-volumes=32", "--metrics-address=:9809",
		"--kubelet-endpoint=/var/lib/k0s/kubelet/plugins/csi-nbd.io/csi.sock"} {
		if !hasArg(node, a) {
			t.Errorf("node args %q lack %s", node.Args, a)
		}
	}
	if len(ds.Spec.Template.Spec.Tolerations) != 0 {
		t.Error("tolerations: [] did not clear the default")
	}

	sc := r.get(t, "StorageClass", "fast").(*storagev1.StorageClass)
	if sc.Annotations["storageclass.kubernetes.io/is-default-class"] != "true" || !slices.Equal(sc.MountOptions, []string{"noatime"}) {
		t.Errorf("StorageClass fast: %+v", sc)
	}
	if len(r.ofKind("VolumeAttributesClass")) != 0 {
		t.Error("volumeAttributesClasses: [] still renders classes")
	}
	for _, c := range []string{"controller", "node"} {
		svc := r.get(t, "Service", "csi-nbd-"+c+"-metrics").(*corev1.Service)
		if svc.Spec.Selector["app.kubernetes.io/component"] != c {
			t.Errorf("metrics Service %s selects %v", c, svc.Spec.Selector)
		}
		sm := r.get(t, "ServiceMonitor", "csi-nbd-"+c).(*unstructured.Unstructured)
		if sm.GetLabels()["release"] != "prom" {
			t.Errorf("ServiceMonitor %s labels %v", c, sm.GetLabels())
		}
	}
	r.get(t, "VolumeSnapshotClass", "nbd")
}

// Without the livenessprobe sidecar, each plugin serves /healthz itself:
// on healthPort, or on the metrics port when metrics are on.
func TestNoLivenessSidecar(t *testing.T) {
	for _, metrics := range []bool{false, true} {
		r := mustRender(t, fromYAML(t, fmt.Sprintf(`
controller: {hostNetwork: true, livenessProbe: {sidecar: false}}
node: {livenessProbe: {sidecar: false}}
metrics: {enabled: %v}
`, metrics)))
		checkInvariants(t, r)
		dep := r.get(t, "Deployment", "csi-nbd-controller").(*appsv1.Deployment)
		if !dep.Spec.Template.Spec.HostNetwork || dep.Spec.Template.Spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
			t.Errorf("controller.hostNetwork: hostNetwork %v dnsPolicy %q", dep.Spec.Template.Spec.HostNetwork, dep.Spec.Template.Spec.DNSPolicy)
		}
		ds := r.get(t, "DaemonSet", "csi-nbd-node").(*appsv1.DaemonSet)
		port := map[bool]string{false: "healthz", true: "metrics"}[metrics]
		for _, tc := range []struct {
			spec       corev1.PodSpec
			addr, port string
			node       bool
		}{
			{dep.Spec.Template.Spec, map[bool]string{false: ":9810", true: ":9808"}[metrics], port, false},
			{ds.Spec.Template.Spec, map[bool]string{false: ":9811", true: ":9809"}[metrics], port, true},
		} {
			for _, c := range tc.spec.Containers {
				if c.Name == "liveness-probe" {
					t.Errorf("metrics %v: a liveness-probe sidecar is still there", metrics)
				}
			}
			c := container(t, tc.spec, "csi-nbd")
			if !hasArg(c, "--metrics-address="+tc.addr) {
				t.Errorf("metrics %v: %q lacks --metrics-address=%s", metrics, c.Args, tc.addr)
			}
			if p := c.LivenessProbe.HTTPGet; p == nil || p.Path != "/healthz" || p.Port.StrVal != tc.port {
				t.Errorf("metrics %v: liveness probe %+v, want /healthz on port %s", metrics, c.LivenessProbe, tc.port)
			}
			if tc.node {
				// The node plugin is ready once registered with the kubelet.
				if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" ||
					c.ReadinessProbe.HTTPGet.Port.StrVal != tc.port {
					t.Errorf("metrics %v: node readiness probe %+v, want /readyz on port %s", metrics, c.ReadinessProbe, tc.port)
				}
			}
			names := map[string]bool{}
			for _, p := range c.Ports {
				if names[p.Name] {
					t.Errorf("metrics %v: port %s twice", metrics, p.Name)
				}
				names[p.Name] = true
			}
			if !names[tc.port] {
				t.Errorf("metrics %v: no container port named %s", metrics, tc.port)
			}
		}
	}
}

// Before 1.34 there is no storage.k8s.io/v1 VolumeAttributesClass to create.
func TestOlderCluster(t *testing.T) {
	r, err := renderFor(t, "v1.33.5", nil)
	if err != nil {
		t.Fatal(err)
	}
	checkInvariants(t, r)
	if n := len(r.ofKind("VolumeAttributesClass")); n != 0 {
		t.Errorf("%d VolumeAttributesClasses for Kubernetes 1.33", n)
	}
	if strings.Contains(r.notes, "volumeAttributesClassName") {
		t.Error("NOTES offer VolumeAttributesClasses the chart did not create")
	}
}

func TestSnapshotterOffDropsItsRights(t *testing.T) {
	r := mustRender(t, fromYAML(t, `controller: {snapshotter: {enabled: false}}`))
	checkInvariants(t, r)
	if _, ok := r.objs["ClusterRole/csi-nbd-snapshotter"]; ok {
		t.Error("snapshotter ClusterRole rendered with the snapshotter off")
	}
	prov := r.get(t, "ClusterRole", "csi-nbd-provisioner").(*rbacv1.ClusterRole)
	for _, rule := range prov.Rules {
		if slices.Contains(rule.APIGroups, "snapshot.storage.k8s.io") {
			t.Errorf("provisioner keeps snapshot rights: %+v", rule)
		}
	}
}

func TestNoRBAC(t *testing.T) {
	r := mustRender(t, fromYAML(t, `{rbac: {create: false}, serviceAccount: {controller: mine, node: mine-too}}`))
	checkInvariants(t, r)
	for _, k := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} {
		if n := len(r.ofKind(k)); n != 0 {
			t.Errorf("%d %s with rbac.create false", n, k)
		}
	}
	dep := r.get(t, "Deployment", "csi-nbd-controller").(*appsv1.Deployment)
	if dep.Spec.Template.Spec.ServiceAccountName != "mine" {
		t.Errorf("controller ServiceAccount %q", dep.Spec.Template.Spec.ServiceAccountName)
	}
}

// Values the chart must refuse, each for a reason its message names.
func TestRejects(t *testing.T) {
	for _, tc := range []struct{ name, values, want string }{
		{"misspelt key", `node: {updateStrategie: {type: OnDelete}}`, "updateStrategie"},
		{"bad strategy", `node: {updateStrategy: {type: Sometimes}}`, "updateStrategy"},
		{"bad backend", `storageClass: {backend: ftp}`, "backend"},
		{"memory bound at once", `storageClass: {backend: memory, volumeBindingMode: Immediate}`, "WaitForFirstConsumer"},
		{"listed memory bound at once", `storageClasses: [{name: m2, volumeBindingMode: Immediate}]`, "WaitForFirstConsumer"},
		{"backend in parameters", `storageClass: {parameters: {backend: s3}}`, "backend"},
		{"secret without namespace", `storageClass: {secretRef: {name: s}}`, "namespace"},
		{"bad VAC parameter", `volumeAttributesClasses: [{name: x, parameters: {readBPS: 1Mi}}]`, "readBPS"},
		{"bad fallback", `node: {fallback: sometimes}`, "fallback"},
		{"bad duration", `node: {timeout: 30}`, "timeout"},
		{"relative kubelet dir", `kubeletDir: var/lib/kubelet`, "kubeletDir"},
		{"no pull policy", `image: {repository: x, pullPolicy: Sometimes}`, "pullPolicy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := render(t, fromYAML(t, tc.values))
			if err == nil {
				t.Fatalf("%s rendered", tc.values)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %q", err, tc.want)
			}
		})
	}
}

// The example manifests decode strictly and use the chart's names.
func TestExamples(t *testing.T) {
	files, err := filepath.Glob(filepath.Join(deployDir, "examples", "*.yaml"))
	if err != nil || len(files) < 4 {
		t.Fatalf("deploy/examples: %v %v", files, err)
	}
	defaults := mustRender(t, nil)
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			rd := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
			n := 0
			for {
				doc, err := rd.Read()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				obj := decode(t, f, doc)
				if obj == nil {
					continue
				}
				n++
				switch o := obj.(type) {
				case *corev1.PersistentVolumeClaim:
					if sc := o.Spec.StorageClassName; sc == nil || *sc != "nbd" {
						t.Errorf("PVC %s: storageClassName %v, want nbd", o.Name, sc)
					}
					if vac := o.Spec.VolumeAttributesClassName; vac != nil {
						if _, ok := defaults.objs["VolumeAttributesClass/"+*vac]; !ok && !bytes.Contains(b, []byte("name: "+*vac)) {
							t.Errorf("PVC %s: VolumeAttributesClass %s is neither the chart's nor in the file", o.Name, *vac)
						}
					}
					for k := range o.Annotations {
						if !strings.HasPrefix(k, driverName+"/") {
							t.Errorf("PVC %s: annotation %s outside %s/", o.Name, k, driverName)
						}
					}
				case *storagev1.VolumeAttributesClass:
					if o.DriverName != driverName {
						t.Errorf("VolumeAttributesClass %s: driverName %q", o.Name, o.DriverName)
					}
					for k := range o.Parameters {
						if !slices.Contains(vacParams, k) {
							t.Errorf("VolumeAttributesClass %s: unknown parameter %q", o.Name, k)
						}
					}
				}
			}
			if n == 0 {
				t.Error("no objects")
			}
		})
	}
}

// The node pod's fd store: a second container sharing a socket directory
// with the plugin, which points --fd-store at it; off, neither is there.
func TestNodeFDStore(t *testing.T) {
	const sock = "/run/csi-nbd-fdstore/fds.sock"
	mounts := func(c corev1.Container) bool {
		for _, m := range c.VolumeMounts {
			if m.Name == "fd-store" && m.MountPath == "/run/csi-nbd-fdstore" {
				return true
			}
		}
		return false
	}
	r := mustRender(t, nil)
	ds := r.get(t, "DaemonSet", "csi-nbd-node").(*appsv1.DaemonSet)
	spec := ds.Spec.Template.Spec
	node := container(t, spec, "csi-nbd")
	store := container(t, spec, "fd-store")
	if !hasArg(node, "--fd-store="+sock) || !mounts(node) {
		t.Errorf("node plugin: args %q, mounts %+v: want --fd-store=%s and the fd-store volume", node.Args, node.VolumeMounts, sock)
	}
	if !slices.Equal(store.Args, []string{"fdstore", "--socket=" + sock}) || !mounts(store) || store.Image != node.Image {
		t.Errorf("fd-store container: %+v", store)
	}
	if sc := store.SecurityContext; sc == nil || (sc.Privileged != nil && *sc.Privileged) || sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Errorf("fd-store container: securityContext %+v, want unprivileged root (the plugin's uid)", sc)
	}
	var vol *corev1.Volume
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == "fd-store" {
			vol = &spec.Volumes[i]
		}
	}
	if vol == nil || vol.EmptyDir == nil {
		t.Errorf("fd-store volume %+v: want an emptyDir (the pod's own)", vol)
	}

	r = mustRender(t, fromYAML(t, `node: {fdStore: {enabled: false}}`))
	checkInvariants(t, r)
	ds = r.get(t, "DaemonSet", "csi-nbd-node").(*appsv1.DaemonSet)
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == "fd-store" {
			t.Error("fd-store container rendered while off")
		}
		for _, a := range c.Args {
			if strings.HasPrefix(a, "--fd-store") {
				t.Errorf("%s: %s while off", c.Name, a)
			}
		}
	}
}
