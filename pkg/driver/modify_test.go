package driver

import (
	"context"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	_ "github.com/csi-nbd/csi-nbd/pkg/backends/rate" // the rate filter, whose keys the specs below use
)

func TestControllerModifyVolume(t *testing.T) {
	ctx := context.Background()
	d, err := New(Config{Version: "test", Mode: ModeController, StateDir: t.TempDir(), RateAlways: true})
	if err != nil {
		t.Fatal(err)
	}
	create := func(name string, params map[string]string) string {
		t.Helper()
		r, err := d.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{rwo},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}, Parameters: params})
		if err != nil {
			t.Fatal(err)
		}
		return r.Volume.VolumeId
	}
	id := create("pvc-1", nil)
	modify := func(id string, params map[string]string) error {
		_, err := d.ControllerModifyVolume(ctx, &csi.ControllerModifyVolumeRequest{VolumeId: id, MutableParameters: params})
		return err
	}

	if err := modify(id, map[string]string{"readBytesPerSecond": "10Mi", "writeBytesPerSecond": "5Mi",
		"readIOPS": "100", "writeIOPS": "0", "burst": "200ms",
		"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "default"}); err != nil {
		t.Errorf("valid limits: %v", err)
	}
	if err := modify(id, map[string]string{"readBytesPerSecond": "10Mi"}); err != nil {
		t.Errorf("again, fewer keys: %v", err)
	}
	if err := modify(id, nil); err != nil {
		t.Errorf("no parameters: %v", err)
	}

	for _, tc := range []struct {
		what   string
		id     string
		params map[string]string
		code   codes.Code
		msg    string
	}{
		{"no ID", "", map[string]string{"readIOPS": "1"}, codes.InvalidArgument, "volume ID"},
		{"unknown key", id, map[string]string{"readIOPS": "1", "iops": "5"}, codes.InvalidArgument, `"iops"`},
		{"bad quantity", id, map[string]string{"writeBytesPerSecond": "lots"}, codes.InvalidArgument, `"writeBytesPerSecond"`},
		{"bad burst", id, map[string]string{"burst": "5h"}, codes.InvalidArgument, `"burst"`},
		// Bad parameters are refused before the volume is looked up.
		{"bad key, unknown volume", "size=1Mi;memory:nope", map[string]string{"x": "1"}, codes.InvalidArgument, `"x"`},
		{"unknown volume", "size=1Mi;memory:nope", map[string]string{"readIOPS": "1"}, codes.NotFound, "not found"},
		{"garbage ID", "garbage", map[string]string{"readIOPS": "1"}, codes.NotFound, "not found"},
	} {
		err := modify(tc.id, tc.params)
		wantCode(t, err, tc.code, tc.what)
		if err != nil && !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v; want it to mention %s", tc.what, err, tc.msg)
		}
	}

	// A volume made without the rate filter cannot take limits live.
	d.cfg.RateAlways = false
	plain := create("pvc-2", nil)
	err = modify(plain, map[string]string{"readIOPS": "1"})
	wantCode(t, err, codes.InvalidArgument, "volume without the rate filter")
	if err != nil && !strings.Contains(err.Error(), "rate filter") {
		t.Errorf("volume without the rate filter: %v", err)
	}
	// One whose StorageClass set a limit has it.
	limited := create("pvc-3", map[string]string{"readIOPS": "50"})
	if err := modify(limited, map[string]string{"readIOPS": "100"}); err != nil {
		t.Errorf("volume with a StorageClass limit: %v", err)
	}
}
