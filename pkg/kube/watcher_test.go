package kube_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/csi-nbd/csi-nbd/internal/kubetest"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/memory"
	"github.com/csi-nbd/csi-nbd/pkg/kube"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
)

const driver = "csi-nbd.io"

// recorder is a LimitSetter remembering every call.
type recorder struct {
	mu     sync.Mutex
	calls  []call
	notify chan struct{}
	refuse func(limits.Limits) error
}

type call struct {
	id string
	l  limits.Limits
	at time.Time
}

func (r *recorder) SetLimits(id string, l limits.Limits) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.refuse != nil {
		if err := r.refuse(l); err != nil {
			return err
		}
	}
	r.calls = append(r.calls, call{id, l, time.Now()})
	select {
	case r.notify <- struct{}{}:
	default:
	}
	return nil
}

func (r *recorder) snapshot() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]call(nil), r.calls...)
}

// waitCalls waits until n calls were made and returns them; the bound only
// keeps a broken watcher from hanging the test.
func (r *recorder) waitCalls(t *testing.T, n int) []call {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		if c := r.snapshot(); len(c) >= n {
			return c
		}
		select {
		case <-r.notify:
		case <-deadline:
			t.Fatalf("%d SetLimits calls after a minute, want %d: %+v", len(r.snapshot()), n, r.snapshot())
		}
	}
}

// waitEvent waits for an event on the claim with reason whose message
// contains substr.
func waitEvent(t *testing.T, cs kubernetes.Interface, ns, claim, reason, substr string) corev1.Event {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	var seen []string
	for time.Now().Before(deadline) {
		evs, err := cs.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		seen = seen[:0]
		for _, e := range evs.Items {
			if e.InvolvedObject.Kind != "PersistentVolumeClaim" || e.InvolvedObject.Name != claim {
				continue
			}
			seen = append(seen, e.Reason+": "+e.Message)
			if e.Reason == reason && strings.Contains(e.Message, substr) {
				return e
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("no %s event with %q on %s/%s; events: %q", reason, substr, ns, claim, seen)
	return corev1.Event{}
}

func TestWatcherAppliesClassAndAnnotations(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.Start(t)
	cs := srv.Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}

	const ns, claim, pvName = "apps", "data", "pvc-1234"
	// The StorageClass gave the volume a read limit of 50Mi/s and a burst
	// of 1s: the spec's own layer.
	volumeID := backends.Spec{Options: map[string]string{"rate-burst": "1s", "rate-read": "50Mi", "size": "1Gi"}, URL: "memory:" + pvName}.String()
	for _, vac := range []*storagev1.VolumeAttributesClass{
		{ObjectMeta: metav1.ObjectMeta{Name: "fast"}, DriverName: driver,
			Parameters: map[string]string{"readBytesPerSecond": "100Mi", "writeIOPS": "500"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "slow"}, DriverName: driver,
			Parameters: map[string]string{"readBytesPerSecond": "10Mi", "burst": "200ms"}},
		{ObjectMeta: metav1.ObjectMeta{Name: "foreign"}, DriverName: "other.example.com",
			Parameters: map[string]string{"readBytesPerSecond": "1"}},
	} {
		_, err := cs.StorageV1().VolumeAttributesClasses().Create(ctx, vac, metav1.CreateOptions{})
		must(err)
	}
	createVolume(t, cs, ns, claim, pvName, volumeID)
	// Another driver's PV with the same handle must not matter.
	_, err := cs.CoreV1().PersistentVolumes().Create(ctx, &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: "aaa-foreign"},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:                  corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes:               []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			VolumeAttributesClassName: ptr("foreign"),
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: "other.example.com", VolumeHandle: volumeID}},
		},
	}, metav1.CreateOptions{})
	must(err)

	rec := &recorder{notify: make(chan struct{}, 1)}
	w := kube.New(cs, "node-1", driver, rec)
	w.Track(volumeID, map[string]string{"pvcName": claim, "pvcNamespace": ns, "pvName": pvName})
	w.Track("size=1Gi;memory:elsewhere", nil) // tracked, but no PV: never touched
	runErr := make(chan error, 1)
	go func() { runErr <- w.Run(ctx) }()

	setClass := func(name string) time.Time {
		t.Helper()
		patch := fmt.Sprintf(`{"spec":{"volumeAttributesClassName":%q}}`, name)
		at := time.Now() // the watch event may arrive before the answer
		_, err := cs.CoreV1().PersistentVolumes().Patch(ctx, pvName, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
		must(err)
		return at
	}
	annotate := func(ann map[string]*string) time.Time {
		t.Helper()
		b, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
		must(err)
		at := time.Now()
		_, err = cs.CoreV1().PersistentVolumeClaims(ns).Patch(ctx, claim, types.MergePatchType, b, metav1.PatchOptions{})
		must(err)
		return at
	}
	var want []limits.Limits
	step := func(what string, changed time.Time, l limits.Limits) {
		t.Helper()
		want = append(want, l)
		calls := rec.waitCalls(t, len(want))
		last := calls[len(calls)-1]
		if last.id != volumeID || last.l != l {
			t.Fatalf("%s: SetLimits(%q, %+v); want %+v", what, last.id, last.l, l)
		}
		t.Logf("%s: applied %v after the change", what, last.at.Sub(changed).Round(time.Millisecond))
	}

	// The spec's own limits are in force at open: nothing to apply until a
	// class or an annotation says otherwise.
	at := setClass("fast")
	step("class fast", at, limits.Limits{ReadBytesPerSec: 100 << 20, WriteIOPS: 500, Burst: time.Second})
	waitEvent(t, cs, ns, claim, kube.ReasonApplied, "read 100Mi/s, write unlimited, read IOPS unlimited, write IOPS 500/s, burst 1s")

	// A limit the new class leaves out falls back to the spec's.
	at = setClass("slow")
	step("class slow", at, limits.Limits{ReadBytesPerSec: 10 << 20, Burst: 200 * time.Millisecond})

	at = annotate(map[string]*string{limits.AnnReadBytes: ptr("20Mi"), limits.AnnWriteIOPS: ptr("30")})
	step("annotations", at, limits.Limits{ReadBytesPerSec: 20 << 20, WriteIOPS: 30, Burst: 200 * time.Millisecond})
	waitEvent(t, cs, ns, claim, kube.ReasonApplied, "read 20Mi/s, write unlimited, read IOPS unlimited, write IOPS 30/s, burst 200ms")

	// A bad annotation changes nothing and says why.
	annotate(map[string]*string{limits.AnnWriteIOPS: ptr("lots")})
	waitEvent(t, cs, ns, claim, kube.ReasonRejected, `annotation "csi-nbd.io/write-iops": invalid integer "lots"`)
	// Removing it: the class's and the remaining annotation's limits.
	at = annotate(map[string]*string{limits.AnnWriteIOPS: nil})
	step("bad annotation removed", at, limits.Limits{ReadBytesPerSec: 20 << 20, Burst: 200 * time.Millisecond})

	// A class of another driver is refused, limits stay.
	setClass("foreign")
	waitEvent(t, cs, ns, claim, kube.ReasonRejected, `VolumeAttributesClass "foreign" is for driver "other.example.com"`)
	at = setClass("fast")
	step("class fast under annotations", at, limits.Limits{ReadBytesPerSec: 20 << 20, WriteIOPS: 500, Burst: time.Second})

	// The volume refusing limits is reported too (and retried).
	rec.mu.Lock()
	rec.refuse = func(l limits.Limits) error {
		if l.WriteBytesPerSec == 7 {
			return fmt.Errorf("rate: WriteBytesPerSec 7 is silly: %w", backends.ErrInvalid)
		}
		return nil
	}
	rec.mu.Unlock()
	annotate(map[string]*string{limits.AnnWriteBytes: ptr("7")})
	waitEvent(t, cs, ns, claim, kube.ReasonRejected, "WriteBytesPerSec 7 is silly")
	at = annotate(map[string]*string{limits.AnnWriteBytes: ptr("8"), limits.AnnReadBytes: nil})
	step("annotation fixed", at, limits.Limits{ReadBytesPerSec: 100 << 20, WriteBytesPerSec: 8, WriteIOPS: 500, Burst: time.Second})

	// After Untrack the volume is left alone. A second volume's change,
	// made after the first's, marks when the first has been seen (one
	// informer delivers claim events in order).
	createVolume(t, cs, "other", "data2", "pvc-2", "size=1Gi;memory:pvc-2")
	w.Track("size=1Gi;memory:pvc-2", nil)
	w.Untrack(volumeID)
	annotate(map[string]*string{limits.AnnWriteBytes: ptr("9")})
	_, err = cs.CoreV1().PersistentVolumeClaims("other").Patch(ctx, "data2", types.MergePatchType,
		[]byte(`{"metadata":{"annotations":{"csi-nbd.io/read-iops":"5"}}}`), metav1.PatchOptions{})
	must(err)
	calls := rec.waitCalls(t, len(want)+1)
	if last := calls[len(calls)-1]; last.id != "size=1Gi;memory:pvc-2" || last.l != (limits.Limits{ReadIOPS: 5}) {
		t.Errorf("second volume: SetLimits(%q, %+v)", last.id, last.l)
	}
	want = append(want, limits.Limits{ReadIOPS: 5})

	cancel()
	if err := <-runErr; err != nil {
		t.Fatal(err)
	}
	calls = rec.snapshot()
	if len(calls) != len(want) {
		t.Errorf("%d SetLimits calls, want exactly %d (one per change): %+v", len(calls), len(want), calls)
	}
}

// createVolume makes a namespace, a claim and its bound PV of our driver.
func createVolume(t *testing.T, cs kubernetes.Interface, ns, claim, pvName, volumeID string) {
	t.Helper()
	ctx := context.Background()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		must(err)
	}
	pvc, err := cs.CoreV1().PersistentVolumeClaims(ns).Create(ctx, &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: claim},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: new(string),
			VolumeName:       pvName,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")}},
		},
	}, metav1.CreateOptions{})
	must(err)
	_, err = cs.CoreV1().PersistentVolumes().Create(ctx, &corev1.PersistentVolume{
		ObjectMeta: metav1.ObjectMeta{Name: pvName},
		Spec: corev1.PersistentVolumeSpec{
			Capacity:    corev1.ResourceList{corev1.ResourceStorage: resource.MustParse("1Gi")},
			AccessModes: []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			ClaimRef:    &corev1.ObjectReference{Kind: "PersistentVolumeClaim", APIVersion: "v1", Namespace: ns, Name: claim, UID: pvc.UID},
			PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
				Driver: driver, VolumeHandle: volumeID,
				VolumeAttributes: map[string]string{"pvcName": claim, "pvcNamespace": ns, "pvName": pvName},
			}},
		},
	}, metav1.CreateOptions{})
	must(err)
}

func ptr[T any](v T) *T { return &v }

// TestWatcherWithoutClasses: on an API server without
// VolumeAttributesClasses the annotations still apply.
func TestWatcherWithoutClasses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts etcd and kube-apiserver")
	}
	srv := kubetest.Start(t, "--runtime-config=storage.k8s.io/v1/volumeattributesclasses=false")
	// Through a kubeconfig file, as with --kubeconfig.
	cs, err := kube.NewClient(srv.Kubeconfig(t), "csi-nbd-test")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	volumeID := "size=1Gi;memory:pvc-1"
	createVolume(t, cs, "apps", "data", "pvc-1", volumeID)

	rec := &recorder{notify: make(chan struct{}, 1)}
	w := kube.New(cs, "node-1", driver, rec)
	w.Track(volumeID, nil)
	runErr := make(chan error, 1)
	go func() { runErr <- w.Run(ctx) }()
	_, err = cs.CoreV1().PersistentVolumeClaims("apps").Patch(ctx, "data", types.MergePatchType,
		[]byte(`{"metadata":{"annotations":{"csi-nbd.io/read-iops":"250","csi-nbd.io/burst":"50ms"}}}`), metav1.PatchOptions{})
	if err != nil {
		t.Fatal(err)
	}
	calls := rec.waitCalls(t, 1)
	if want := (limits.Limits{ReadIOPS: 250, Burst: 50 * time.Millisecond}); calls[0].id != volumeID || calls[0].l != want {
		t.Errorf("SetLimits(%q, %+v); want %+v", calls[0].id, calls[0].l, want)
	}
	waitEvent(t, cs, "apps", "data", kube.ReasonApplied, "read IOPS 250/s")
	cancel()
	if err := <-runErr; err != nil {
		t.Fatal(err)
	}
}

func TestNewClientNamesTheFile(t *testing.T) {
	_, err := kube.NewClient("/nonexistent/kubeconfig", "")
	if err == nil || !strings.Contains(err.Error(), `"/nonexistent/kubeconfig"`) {
		t.Errorf("NewClient of a missing file: %v", err)
	}
}
