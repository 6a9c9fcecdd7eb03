// Package kube is the node plugin's view of Kubernetes: it watches the
// PersistentVolumes of the volumes staged on this node, their
// VolumeAttributesClasses and their claims' annotations, and applies each
// volume's effective rate limits live.
//
// Where the limits come from, lowest precedence first (pkg/limits merges
// them limit by limit):
//
//  1. the volume spec (StorageClass parameters), given to Track;
//  2. the parameters of the PV's spec.volumeAttributesClassName. The
//     external-resizer writes that field only after the controller's
//     ControllerModifyVolume accepted the class, so the node applies what
//     the controller accepted and never a class it rejected (while a
//     modification is pending or infeasible the PV keeps the old class);
//  3. the claim's csi-nbd.io/* rate annotations.
//
// Every outcome is an Event on the claim: Normal RateLimitsApplied with
// the limits now in force, Warning RateLimitsRejected with the reason (the
// limits in force then stay as they were).
package kube

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	storagelisters "k8s.io/client-go/listers/storage/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
)

// LimitSetter changes an open volume's limits (the rate filter of its
// stack).
type LimitSetter interface {
	SetLimits(volumeID string, l limits.Limits) error
}

// Event reasons.
const (
	ReasonApplied  = "RateLimitsApplied"
	ReasonRejected = "RateLimitsRejected"
)

// Index names.
const (
	byHandle = "csi-nbd.io/volume-handle"
	byClaim  = "csi-nbd.io/claim"
	byClass  = "csi-nbd.io/attributes-class"
)

// tracked is one volume staged on this node.
type tracked struct {
	spec    limits.Layer
	specErr error
	// applied is what the volume's rate filter holds: the spec's limits
	// at open, then whatever SetLimits last succeeded with.
	applied limits.Limits
	// lastWarning keeps a resync from repeating the same Warning.
	lastWarning string
}

// Watcher applies the limits of tracked volumes as their objects change.
type Watcher struct {
	client kubernetes.Interface
	node   string
	driver string
	setter LimitSetter

	factory     informers.SharedInformerFactory
	pvs         cache.SharedIndexInformer
	pvcs        corelisters.PersistentVolumeClaimLister
	classes     storagelisters.VolumeAttributesClassLister
	synced      []cache.InformerSynced
	queue       workqueue.TypedRateLimitingInterface[string]
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder

	mu      sync.Mutex
	volumes map[string]*tracked // by volume ID (the PV's volumeHandle)
}

// New makes a watcher for the PVs of driver (e.g. "csi-nbd.io") on node.
// Run starts it; Track tells it which volumes matter.
func New(client kubernetes.Interface, node, driver string, setter LimitSetter) *Watcher {
	w := &Watcher{client: client, node: node, driver: driver, setter: setter, volumes: map[string]*tracked{}}
	// Claims carry much we never read; keep names and annotations only
	// (a node watches every claim of the cluster).
	w.factory = informers.NewSharedInformerFactoryWithOptions(client, 10*time.Minute,
		informers.WithTransform(stripObject))
	w.pvs = w.factory.Core().V1().PersistentVolumes().Informer()
	pvcInf := w.factory.Core().V1().PersistentVolumeClaims()
	w.pvcs = pvcInf.Lister()
	utilruntime.Must(w.pvs.AddIndexers(cache.Indexers{
		byHandle: func(obj any) ([]string, error) {
			pv, ok := obj.(*corev1.PersistentVolume)
			if !ok {
				return nil, nil
			}
			if h, ok := w.handleOf(pv); ok {
				return []string{h}, nil
			}
			return nil, nil
		},
		byClaim: func(obj any) ([]string, error) {
			pv, ok := obj.(*corev1.PersistentVolume)
			if !ok || pv.Spec.ClaimRef == nil {
				return nil, nil
			}
			return []string{pv.Spec.ClaimRef.Namespace + "/" + pv.Spec.ClaimRef.Name}, nil
		},
		byClass: func(obj any) ([]string, error) {
			pv, ok := obj.(*corev1.PersistentVolume)
			if !ok || pv.Spec.VolumeAttributesClassName == nil {
				return nil, nil
			}
			return []string{*pv.Spec.VolumeAttributesClassName}, nil
		},
	}))
	w.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 2*time.Minute),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "csi-nbd-limits"})

	onPV := func(obj any) {
		if pv, ok := pvOf(obj); ok {
			w.enqueuePV(pv)
		}
	}
	_, _ = w.pvs.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: onPV, UpdateFunc: func(_, obj any) { onPV(obj) }, DeleteFunc: onPV})
	onPVC := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			w.enqueueIndexed(byClaim, key)
		}
	}
	_, _ = pvcInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: onPVC, UpdateFunc: func(_, obj any) { onPVC(obj) }, DeleteFunc: onPVC})
	w.synced = []cache.InformerSynced{w.pvs.HasSynced, pvcInf.Informer().HasSynced}

	w.broadcaster = record.NewBroadcaster()
	w.recorder = w.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: driver + "-node", Host: node})
	return w
}

// stripObject keeps of a claim only what the watcher reads.
func stripObject(obj any) (any, error) {
	pvc, ok := obj.(*corev1.PersistentVolumeClaim)
	if !ok {
		return obj, nil
	}
	return &corev1.PersistentVolumeClaim{
		TypeMeta: pvc.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{Name: pvc.Name, Namespace: pvc.Namespace, UID: pvc.UID,
			ResourceVersion: pvc.ResourceVersion, Annotations: pvc.Annotations},
	}, nil
}

func pvOf(obj any) (*corev1.PersistentVolume, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	pv, ok := obj.(*corev1.PersistentVolume)
	return pv, ok
}

// handleOf is a PV's volume handle if the PV is the watched driver's.
func (w *Watcher) handleOf(pv *corev1.PersistentVolume) (string, bool) {
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != w.driver {
		return "", false
	}
	return pv.Spec.CSI.VolumeHandle, true
}

// enqueuePV queues a PV's volume if it is the driver's and tracked here.
func (w *Watcher) enqueuePV(pv *corev1.PersistentVolume) {
	if h, ok := w.handleOf(pv); ok {
		w.enqueue(h)
	}
}

// enqueue queues a volume if it is tracked here.
func (w *Watcher) enqueue(volumeID string) {
	w.mu.Lock()
	_, ok := w.volumes[volumeID]
	w.mu.Unlock()
	if ok {
		w.queue.Add(volumeID)
	}
}

// enqueueIndexed queues the tracked volumes of the PVs under an index key.
func (w *Watcher) enqueueIndexed(index, key string) {
	objs, err := w.pvs.GetIndexer().ByIndex(index, key)
	if err != nil {
		return
	}
	for _, o := range objs {
		if pv, ok := o.(*corev1.PersistentVolume); ok {
			w.enqueuePV(pv)
		}
	}
}

// Track makes the watcher keep volumeID's limits up to date from now on.
// The volume's stack must be open with the spec's own limits (the rate
// filter's options), which is what the watcher assumes is in force.
// volumeContext is the CSI volume context (unused for now: the PV is found
// by its volume handle). Tracking a volume again is a no-op.
func (w *Watcher) Track(volumeID string, volumeContext map[string]string) {
	w.mu.Lock()
	if _, ok := w.volumes[volumeID]; !ok {
		t := &tracked{}
		spec, err := backends.Parse(volumeID)
		if err == nil {
			t.spec, err = limits.FromSpecOptions(spec.Options)
		}
		t.specErr = err
		t.applied = limits.Merge(t.spec)
		w.volumes[volumeID] = t
	}
	w.mu.Unlock()
	w.queue.Add(volumeID)
}

// Untrack forgets a volume (unstaged, or closed).
func (w *Watcher) Untrack(volumeID string) {
	w.mu.Lock()
	delete(w.volumes, volumeID)
	w.mu.Unlock()
	w.queue.Forget(volumeID)
}

// Run watches until ctx ends. Volumes tracked before Run are handled once
// the caches have synced.
func (w *Watcher) Run(ctx context.Context) error {
	defer utilruntime.HandleCrash()
	w.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: w.client.CoreV1().Events("")})
	defer w.broadcaster.Shutdown()
	defer w.queue.ShutDown()
	if err := w.watchClasses(); err != nil {
		return err
	}
	w.factory.Start(ctx.Done())
	defer w.factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), w.synced...) {
		return fmt.Errorf("kube: caches of PVs, PVCs and VolumeAttributesClasses not synced: %w", context.Cause(ctx))
	}
	klog.InfoS("Watching volume limits", "driver", w.driver, "node", w.node)
	go func() {
		for w.next(ctx) {
		}
	}()
	<-ctx.Done()
	return nil
}

// watchClasses adds the VolumeAttributesClass informer if the API server
// serves storage.k8s.io/v1 VolumeAttributesClasses (Kubernetes 1.34 and
// later); on older clusters the annotations still work.
func (w *Watcher) watchClasses() error {
	rl, err := w.client.Discovery().ServerResourcesForGroupVersion(storagev1.SchemeGroupVersion.String())
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("kube: discovering %s: %w", storagev1.SchemeGroupVersion, err)
	}
	served := false
	if rl != nil {
		for _, r := range rl.APIResources {
			served = served || r.Name == "volumeattributesclasses"
		}
	}
	if !served {
		klog.InfoS("VolumeAttributesClasses are not served; rate limits come from the volume spec and PVC annotations only",
			"groupVersion", storagev1.SchemeGroupVersion.String())
		return nil
	}
	vacInf := w.factory.Storage().V1().VolumeAttributesClasses()
	w.classes = vacInf.Lister()
	onVAC := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			w.enqueueIndexed(byClass, key)
		}
	}
	_, _ = vacInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: onVAC, UpdateFunc: func(_, obj any) { onVAC(obj) }, DeleteFunc: onVAC})
	w.synced = append(w.synced, vacInf.Informer().HasSynced)
	return nil
}

func (w *Watcher) next(ctx context.Context) bool {
	id, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(id)
	if err := w.sync(ctx, id); err != nil {
		klog.V(2).InfoS("Volume limits not applied, will retry", "volumeID", id, "err", err)
		w.queue.AddRateLimited(id)
		return true
	}
	w.queue.Forget(id)
	return true
}

// sync computes a volume's effective limits and applies them if they
// changed.
func (w *Watcher) sync(ctx context.Context, id string) error {
	w.mu.Lock()
	t, ok := w.volumes[id]
	var spec limits.Layer
	var specErr error
	if ok {
		spec, specErr = t.spec, t.specErr
	}
	w.mu.Unlock()
	if !ok {
		return nil
	}

	pv, err := w.pvOf(id)
	if err != nil {
		return err
	}
	var pvc *corev1.PersistentVolumeClaim
	if pv != nil && pv.Spec.ClaimRef != nil {
		c, err := w.pvcs.PersistentVolumeClaims(pv.Spec.ClaimRef.Namespace).Get(pv.Spec.ClaimRef.Name)
		if err == nil && (pv.Spec.ClaimRef.UID == "" || c.UID == pv.Spec.ClaimRef.UID) {
			pvc = c
		}
	}

	l, why, err := w.effective(pv, pvc, spec, specErr)
	if err != nil {
		w.warn(id, pv, pvc, why)
		return err
	}
	if why != "" {
		w.warn(id, pv, pvc, why)
		return nil
	}

	w.mu.Lock()
	t, ok = w.volumes[id]
	same := ok && t.applied == l
	w.mu.Unlock()
	if !ok || same {
		return nil
	}
	if err := w.setter.SetLimits(id, l); err != nil {
		w.warn(id, pv, pvc, fmt.Sprintf("the volume refused limits %s: %v", l, err))
		return err
	}
	w.mu.Lock()
	if t, ok := w.volumes[id]; ok {
		t.applied, t.lastWarning = l, ""
	}
	w.mu.Unlock()
	klog.InfoS("Applied volume limits", "volumeID", id, "limits", l.String())
	if ref := objectRef(pv, pvc); ref != nil {
		w.recorder.Eventf(ref, corev1.EventTypeNormal, ReasonApplied, "Rate limits on node %s: %s", w.node, l)
	}
	return nil
}

// effective merges the layers. A layer that cannot be read leaves the
// limits in force alone: why says what is wrong, and err is set too when a
// retry may help (an object not in the cache yet).
func (w *Watcher) effective(pv *corev1.PersistentVolume, pvc *corev1.PersistentVolumeClaim, spec limits.Layer, specErr error) (l limits.Limits, why string, err error) {
	if specErr != nil {
		return l, fmt.Sprintf("volume spec: %v", specErr), nil
	}
	layers := []limits.Layer{spec}
	if pv != nil && pv.Spec.VolumeAttributesClassName != nil && *pv.Spec.VolumeAttributesClassName != "" {
		name := *pv.Spec.VolumeAttributesClassName
		if w.classes == nil {
			return l, fmt.Sprintf("the PV names VolumeAttributesClass %q, but the API server serves none", name), nil
		}
		vac, err := w.classes.Get(name)
		switch {
		case apierrors.IsNotFound(err):
			why := fmt.Sprintf("VolumeAttributesClass %q not found", name)
			return l, why, errors.New(why)
		case err != nil:
			return l, fmt.Sprintf("VolumeAttributesClass %q: %v", name, err), err
		case vac.DriverName != w.driver:
			return l, fmt.Sprintf("VolumeAttributesClass %q is for driver %q, not %q", name, vac.DriverName, w.driver), nil
		}
		layer, err := limits.ParseLayer(vac.Parameters)
		if err != nil {
			return l, fmt.Sprintf("VolumeAttributesClass %q: %v", name, err), nil
		}
		layers = append(layers, layer)
	}
	if pvc != nil {
		layer, err := limits.FromAnnotations(pvc.Annotations)
		if err != nil {
			return l, fmt.Sprintf("PVC %s/%s: %v", pvc.Namespace, pvc.Name, err), nil
		}
		layers = append(layers, layer)
	}
	return limits.Merge(layers...), "", nil
}

// pvOf finds the PV of a volume handle; nil if there is none (a volume
// staged outside Kubernetes' PV machinery keeps its spec's limits).
func (w *Watcher) pvOf(id string) (*corev1.PersistentVolume, error) {
	objs, err := w.pvs.GetIndexer().ByIndex(byHandle, id)
	if err != nil {
		return nil, err
	}
	var pv *corev1.PersistentVolume
	for _, o := range objs {
		p := o.(*corev1.PersistentVolume)
		if pv == nil || p.Name < pv.Name { // two PVs, one handle: be deterministic
			pv = p
		}
	}
	return pv, nil
}

// warn records a Warning once per distinct reason.
func (w *Watcher) warn(id string, pv *corev1.PersistentVolume, pvc *corev1.PersistentVolumeClaim, why string) {
	w.mu.Lock()
	t, ok := w.volumes[id]
	repeat := ok && t.lastWarning == why
	if ok {
		t.lastWarning = why
	}
	w.mu.Unlock()
	if repeat || !ok {
		return
	}
	klog.InfoS("Volume limits rejected", "volumeID", id, "reason", why)
	if ref := objectRef(pv, pvc); ref != nil {
		w.recorder.Eventf(ref, corev1.EventTypeWarning, ReasonRejected, "Rate limits not changed on node %s: %s", w.node, why)
	}
}

// objectRef is the claim events go to (the PV if there is no claim).
func objectRef(pv *corev1.PersistentVolume, pvc *corev1.PersistentVolumeClaim) *corev1.ObjectReference {
	switch {
	case pvc != nil:
		return &corev1.ObjectReference{Kind: "PersistentVolumeClaim", APIVersion: "v1",
			Namespace: pvc.Namespace, Name: pvc.Name, UID: pvc.UID, ResourceVersion: pvc.ResourceVersion}
	case pv != nil && pv.Spec.ClaimRef != nil:
		r := *pv.Spec.ClaimRef
		r.Kind, r.APIVersion = "PersistentVolumeClaim", "v1"
		return &r
	case pv != nil:
		return &corev1.ObjectReference{Kind: "PersistentVolume", APIVersion: "v1", Name: pv.Name, UID: pv.UID}
	}
	return nil
}
