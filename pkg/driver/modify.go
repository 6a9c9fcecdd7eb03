package driver

import (
	"context"
	"maps"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
)

// ControllerModifyVolume accepts or rejects a VolumeAttributesClass's
// mutable parameters: the rate limits (pkg/limits). It changes nothing
// itself. The external-resizer writes the class into the PV only after
// this call succeeds, and the node plugin watches its PVs and applies the
// class's limits live (pkg/kube); so validating here is what keeps the
// node from ever seeing limits it would refuse. The bounds are the rate
// filter's.
//
// The node applies the current class's limits over the StorageClass
// values: a limit the class leaves out falls back to the StorageClass's,
// not to an earlier class's, so the limits in force follow from the
// objects alone (and survive a node restart).
func (d *Driver) ControllerModifyVolume(ctx context.Context, req *csi.ControllerModifyVolumeRequest) (*csi.ControllerModifyVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume ID is required")
	}
	params := maps.Clone(req.GetMutableParameters())
	// The external-resizer's --extra-modify-metadata adds the PV and PVC
	// names under this prefix; they are not limits.
	maps.DeleteFunc(params, func(k, _ string) bool { return strings.HasPrefix(k, "csi.storage.k8s.io/") })
	l, err := limits.Parse(params)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "mutable parameters: %v", err)
	}
	unlock, err := d.lock("volume/" + id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	_, _, spec, err := d.lookupVolume(ctx, id, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	if !hasRateFilter(spec) {
		return nil, status.Errorf(codes.InvalidArgument,
			"volume %q was made without the rate filter, so its limits cannot change live (recreate it with the driver's rate filter always on, or with a limit in its StorageClass)", id)
	}
	klog.InfoS("Accepted volume limits", "volumeID", id, "limits", l.String())
	return &csi.ControllerModifyVolumeResponse{}, nil
}

// hasRateFilter tells whether a volume's stack has the rate filter: the
// driver adds rate=true to every volume by default, and any limit option
// turns it on.
func hasRateFilter(s backends.Spec) bool {
	if s.Options["rate"] == "true" {
		return true
	}
	l, err := limits.FromSpecOptions(s.Options)
	return err == nil && l.Set != 0
}
