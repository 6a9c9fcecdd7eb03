package main

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/rate"
	"github.com/csi-nbd/csi-nbd/pkg/driver"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
	"github.com/csi-nbd/csi-nbd/pkg/metrics"
)

// newNodeDriver is an all-in-one driver with the real attacher and
// mounter, called directly (no gRPC) to stage calls half-way.
func newNodeDriver(t *testing.T, dir string) (*driver.Driver, *nodeAttacher) {
	t.Helper()
	att, err := newNodeAttacher(filepath.Join(dir, "state"), "n1", attachFlags{connections: 1, fallback: "auto"})
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.New(driver.Config{Version: "test", Mode: driver.ModeAll, NodeID: "n1", StateDir: filepath.Join(dir, "state"),
		Attacher: att, Mounter: &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}})
	if err != nil {
		t.Fatal(err)
	}
	return d, att
}

var rwoMount = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// Every node call is idempotent and finishes the job when a previous
// attempt stopped half-way (a crash between its steps).
func TestNodeCallsHalfWay(t *testing.T) {
	attachEnv(t)
	ctx := context.Background()
	dir := t.TempDir()
	d, att := newNodeDriver(t, dir)
	defer att.Close()
	id := "size=64Mi;memory:halfway"
	spec, _ := backends.Parse(id)
	key := backends.VolumeKey(spec)
	staging, target := filepath.Join(dir, "staging"), filepath.Join(dir, "target")

	// Stage stopped after attaching, before formatting and mounting.
	if _, err := att.Attach(ctx, key, id, nil, nil, false); err != nil {
		t.Fatal(err)
	}
	stage := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rwoMount}
	for i := 0; i < 2; i++ {
		if _, err := d.NodeStageVolume(ctx, stage); err != nil {
			t.Fatalf("stage #%d: %v", i+1, err)
		}
	}
	pub := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: rwoMount}
	for i := 0; i < 2; i++ {
		if _, err := d.NodePublishVolume(ctx, pub); err != nil {
			t.Fatalf("publish #%d: %v", i+1, err)
		}
	}
	data := bytes.Repeat([]byte("csi-nbd "), 1<<16)
	if err := os.WriteFile(filepath.Join(target, "f"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := d.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.VolumeCondition.Abnormal || st.Usage[0].Used < int64(len(data)) {
		t.Errorf("stats: %v, %v", st, err)
	}
	unpub := &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}
	for i := 0; i < 2; i++ {
		if _, err := d.NodeUnpublishVolume(ctx, unpub); err != nil {
			t.Fatalf("unpublish #%d: %v", i+1, err)
		}
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Errorf("target left behind: %v", err)
	}

	// Unstage stopped after unmounting, before detaching: the data must
	// still be there when the volume is staged again, and a repeated
	// unstage must detach.
	if err := mount.CleanupMountPoint(staging, mount.New(""), true); err != nil {
		t.Fatal(err)
	}
	if _, err := d.NodeStageVolume(ctx, stage); err != nil {
		t.Fatalf("stage after a half unstage: %v", err)
	}
	got, err := os.ReadFile(filepath.Join(staging, "f"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data after re-stage: %d bytes, %v", len(got), err)
	}
	if err := mount.CleanupMountPoint(staging, mount.New(""), true); err != nil {
		t.Fatal(err)
	}
	unstage := &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}
	for i := 0; i < 2; i++ {
		if _, err := d.NodeUnstageVolume(ctx, unstage); err != nil {
			t.Fatalf("unstage #%d: %v", i+1, err)
		}
	}
	if p, ok := att.DevicePath(key); ok {
		t.Errorf("still attached at %s after unstage", p)
	}
}

// Limits set through the node's LimitSetter (what the PV watcher calls)
// reach the rate filter of the served stack, and the stack is wrapped for
// metrics.
func TestNodeSetLimitsLive(t *testing.T) {
	attachEnv(t)
	ctx := context.Background()
	dir := t.TempDir()
	_, att := newNodeDriver(t, dir)
	defer att.Close()
	id := "rate=true,size=16Mi;memory:limits"
	spec, _ := backends.Parse(id)
	key := backends.VolumeKey(spec)
	if _, err := att.Attach(ctx, key, spec.String(), nil, map[string]string{"pvName": "pv-1"}, false); err != nil {
		t.Fatal(err)
	}
	defer att.Detach(ctx, key)
	want := limits.Limits{ReadBytesPerSec: 10 << 20, WriteIOPS: 100}
	if err := att.SetLimits(spec.String(), want); err != nil {
		t.Fatal(err)
	}
	dev, _ := att.m.Device(key)
	rd, ok := rate.Find(dev)
	if !ok {
		t.Fatal("no rate filter found in the served stack")
	}
	if got := rd.Limits(); got.ReadBytesPerSec != want.ReadBytesPerSec || got.WriteIOPS != want.WriteIOPS || got.WriteBytesPerSec != 0 {
		t.Errorf("limits in force %+v; want %+v", got, want)
	}
	if _, ok := dev.(interface{ Unwrap() backends.Device }); !ok {
		t.Errorf("served stack %T is not wrapped for metrics", dev)
	}
	// What goes through the served stack shows in the node's metrics,
	// labelled with the volume and its PV, with the limits in force.
	if err := dev.WriteAt(ctx, make([]byte, 8192), 0, false); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	metrics.Handler(metrics.HandlerOptions{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	for _, want := range []string{
		`csi_nbd_volume_bytes_total{op="write",pv="pv-1",pvc="",pvc_namespace="",volume="` + key + `"} 8192`,
		`csi_nbd_volume_limit{limit="read_bytes_per_second",pv="pv-1",pvc="",pvc_namespace="",volume="` + key + `"} 1.048576e+07`,
		`csi_nbd_volume_attach_state{pv="pv-1",pvc="",pvc_namespace="",state="attached",volume="` + key + `"} 1`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	if err := att.SetLimits("size=16Mi;memory:not-attached", want); err == nil {
		t.Error("limits set on a volume that is not attached")
	}
	if err := att.SetLimits(id, limits.Limits{ReadIOPS: -1}); err == nil {
		t.Error("negative limit accepted")
	}
}

// An s3 volume's writer lease keeps a second node from writing while the
// first holds it, even if the controller's bookkeeping were bypassed;
// readers (ReadOnlyMany) take no lease and share it.
func TestNodeS3OneWriterManyReaders(t *testing.T) {
	attachEnv(t)
	gw := testserver.StartVersitygw(t)
	gw.CreateBucket("lease")
	ctx := context.Background()
	id := "endpoint=" + gw.Endpoint() + ",path-style=true,size=16Mi;s3://lease/vols/pvc-1"
	spec, err := backends.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	id = spec.String()
	newNode := func(name string) *driver.Driver {
		dir := t.TempDir()
		att, err := newNodeAttacher(filepath.Join(dir, "state"), name, attachFlags{connections: 1, fallback: "auto"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { att.Close() })
		d, err := driver.New(driver.Config{Version: "test", Mode: driver.ModeNode, NodeID: name, StateDir: filepath.Join(dir, "state"),
			Attacher: att, Mounter: &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	block := func(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
		return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	}
	a, b, c := newNode("node-a"), newNode("node-b"), newNode("node-c")
	stage := func(d *driver.Driver, mode csi.VolumeCapability_AccessMode_Mode) error {
		_, err := d.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: t.TempDir(),
			VolumeCapability: block(mode), Secrets: gw.Secrets()})
		return err
	}
	if err := stage(a, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER); err != nil {
		t.Fatal(err)
	}
	err = stage(b, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	if err == nil || !strings.Contains(err.Error(), "node-a") {
		t.Errorf("second writer: %v; want a refusal naming the lease holder node-a", err)
	}
	if err := stage(c, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY); err != nil {
		t.Errorf("reader beside the writer: %v", err)
	}
}
