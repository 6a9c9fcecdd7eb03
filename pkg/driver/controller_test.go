package driver

import (
	"context"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func newController(t *testing.T) *Driver {
	t.Helper()
	d, err := New(Config{Version: "test", Mode: ModeController, StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func mountCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
	}
}

var rwo = mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)

func wantCode(t *testing.T, err error, code codes.Code, what string) {
	t.Helper()
	if status.Code(err) != code {
		t.Errorf("%s: %v; want code %s", what, err, code)
	}
}

func TestVolumeSize(t *testing.T) {
	for _, tc := range []struct {
		req, lim int64
		want     uint64
		code     codes.Code
	}{
		{0, 0, defaultSize, codes.OK},
		{0, 1 << 20, 1 << 20, codes.OK},
		{1, 0, 4096, codes.OK},
		{4097, 0, 8192, codes.OK},
		{4097, 8192, 8192, codes.OK},
		{4097, 5000, 0, codes.OutOfRange},
		{10, 5, 0, codes.InvalidArgument},
		{-1, 0, 0, codes.InvalidArgument},
		{0, 100, 0, codes.OutOfRange},
	} {
		got, err := volumeSize(&csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim}, defaultSize)
		if status.Code(err) != tc.code || got != tc.want {
			t.Errorf("volumeSize(%d, %d) = %d, %v; want %d, %s", tc.req, tc.lim, got, err, tc.want, tc.code)
		}
	}
}

func TestCreateVolumeIdempotentByName(t *testing.T) {
	ctx := context.Background()
	d := newController(t)
	req := &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: []*csi.VolumeCapability{rwo},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, Parameters: map[string]string{"fsType": "xfs"}}
	r1, err := d.CreateVolume(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if r1.Volume.VolumeId != "size=64Mi;memory:pvc-1" || r1.Volume.CapacityBytes != 64<<20 || r1.Volume.VolumeContext[ctxFSType] != "xfs" {
		t.Errorf("volume %v", r1.Volume)
	}
	r2, err := d.CreateVolume(ctx, req)
	if err != nil || r2.Volume.VolumeId != r1.Volume.VolumeId {
		t.Errorf("second create: %v, %v", r2, err)
	}
	// The record survives a restart of the controller.
	d2, err := New(d.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if r3, err := d2.CreateVolume(ctx, req); err != nil || r3.Volume.VolumeId != r1.Volume.VolumeId {
		t.Errorf("create after restart: %v, %v", r3, err)
	}
	req.CapacityRange.RequiredBytes = 128 << 20
	_, err = d2.CreateVolume(ctx, req)
	wantCode(t, err, codes.AlreadyExists, "same name, other size")
	req.CapacityRange.RequiredBytes = 64 << 20
	req.Parameters = map[string]string{"fsType": "ext4"}
	_, err = d2.CreateVolume(ctx, req)
	wantCode(t, err, codes.AlreadyExists, "same name, other parameters")
}

func TestCreateVolumeRejects(t *testing.T) {
	ctx := context.Background()
	d := newController(t)
	for _, tc := range []struct {
		what string
		req  *csi.CreateVolumeRequest
		code codes.Code
		msg  string
	}{
		{"no name", &csi.CreateVolumeRequest{VolumeCapabilities: []*csi.VolumeCapability{rwo}}, codes.InvalidArgument, "name"},
		{"no caps", &csi.CreateVolumeRequest{Name: "v"}, codes.InvalidArgument, "capabilities"},
		{"bad param", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{rwo},
			Parameters: map[string]string{"chunkSize": "3"}}, codes.InvalidArgument, `"chunkSize"`},
		{"multi writer", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{
			mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}}, codes.InvalidArgument, "one writer"},
		{"memory on many nodes", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{
			mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}}, codes.InvalidArgument, "one node"},
	} {
		_, err := d.CreateVolume(ctx, tc.req)
		wantCode(t, err, tc.code, tc.what)
		if err != nil && !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v; want it to mention %s", tc.what, err, tc.msg)
		}
	}
}

func TestPublishOneWriterAtATime(t *testing.T) {
	ctx := context.Background()
	d := newController(t)
	r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: []*csi.VolumeCapability{rwo}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	pub := func(node string, ro bool) error {
		_, err := d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: rwo, Readonly: ro})
		return err
	}
	if err := pub("a", false); err != nil {
		t.Fatal(err)
	}
	if err := pub("a", false); err != nil {
		t.Errorf("idempotent publish: %v", err)
	}
	wantCode(t, pub("a", true), codes.AlreadyExists, "republish with other readonly")
	wantCode(t, pub("b", false), codes.FailedPrecondition, "second writer")
	wantCode(t, pub("b", true), codes.FailedPrecondition, "reader beside a writer")
	_, err = d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.FailedPrecondition, "delete while published")
	if _, err := d.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "a"}); err != nil {
		t.Errorf("idempotent unpublish: %v", err)
	}
	if err := pub("b", false); err != nil {
		t.Errorf("writer after the first left: %v", err)
	}
	_, err = d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: "size=1Gi;memory:nope", NodeId: "a", VolumeCapability: rwo})
	wantCode(t, err, codes.NotFound, "unknown volume")
	_, err = d.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{VolumeId: "garbage", NodeId: "a", VolumeCapability: rwo})
	wantCode(t, err, codes.NotFound, "garbage volume ID")
}

func TestDeleteAndExpand(t *testing.T) {
	ctx := context.Background()
	d := newController(t)
	r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: []*csi.VolumeCapability{rwo},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	id := r.Volume.VolumeId
	e, err := d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 2 << 20}})
	if err != nil || e.CapacityBytes != 2<<20 || !e.NodeExpansionRequired {
		t.Errorf("expand: %v, %v", e, err)
	}
	for i := 0; i < 2; i++ {
		if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Errorf("delete #%d: %v", i+1, err)
		}
	}
	if _, err := d.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "not a spec"}); err != nil {
		t.Errorf("delete of a foreign ID: %v", err)
	}
	_, err = d.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}})
	wantCode(t, err, codes.NotFound, "expand a deleted volume")
	// The name is free again.
	if _, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: []*csi.VolumeCapability{rwo}}); err != nil {
		t.Errorf("re-create: %v", err)
	}
}

func TestBackendsAllowList(t *testing.T) {
	d, err := New(Config{Version: "test", Mode: ModeController, StateDir: t.TempDir(), Backends: []string{"s3"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = d.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{rwo}})
	wantCode(t, err, codes.InvalidArgument, "memory volume on an s3-only driver")
	if err == nil || !strings.Contains(err.Error(), `"backend"`) {
		t.Errorf("error %v does not name the parameter", err)
	}
	if _, err := New(Config{Version: "test", Mode: ModeController, StateDir: t.TempDir(), Backends: []string{"tape"}}); err == nil {
		t.Error("unknown backend accepted")
	}
}

func TestCreateVolumeWithAttributesClass(t *testing.T) {
	ctx := context.Background()
	d := newController(t)
	req := &csi.CreateVolumeRequest{Name: "pvc-1", VolumeCapabilities: []*csi.VolumeCapability{rwo},
		Parameters:        map[string]string{"readBytesPerSecond": "10Mi"},
		MutableParameters: map[string]string{"readBytesPerSecond": "20Mi", "writeIOPS": "100"}}
	r, err := d.CreateVolume(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if want := "iops-write=100,rate-read=20Mi;memory:pvc-1"; r.Volume.VolumeId != want {
		t.Errorf("volume %q; want the class's limits over the StorageClass's: %q", r.Volume.VolumeId, want)
	}
	req.Name = "pvc-2"
	req.MutableParameters = map[string]string{"readIOPS": "lots"}
	_, err = d.CreateVolume(ctx, req)
	wantCode(t, err, codes.InvalidArgument, "bad mutable parameter")
	if err == nil || !strings.Contains(err.Error(), "readIOPS") {
		t.Errorf("error %v does not name readIOPS", err)
	}
}
