package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	types := []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_VOLUME_CONDITION,
	}
	caps := make([]*csi.NodeServiceCapability, len(types))
	for i, t := range types {
		caps[i] = &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}}
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             d.cfg.NodeID,
		MaxVolumesPerNode:  d.cfg.MaxVolumesPerNode,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: d.cfg.NodeID}},
	}, nil
}

// nodeVolume parses a volume ID (our IDs are the volume's spec) into the
// spec and the attacher's key for it.
func nodeVolume(id string) (backends.Spec, string, error) {
	spec, err := backends.Parse(id)
	if err != nil {
		return backends.Spec{}, "", status.Errorf(codes.NotFound, "volume %q: %v", id, err)
	}
	return spec, backends.VolumeKey(spec), nil
}

// lockNodeVolume parses the volume ID, checks the capabilities (if any)
// against it, and takes the volume's node lock.
func (d *Driver) lockNodeVolume(id string, caps ...*csi.VolumeCapability) (backends.Spec, string, func(), error) {
	spec, key, err := nodeVolume(id)
	if err != nil {
		return spec, "", nil, err
	}
	if why := checkCaps(spec, caps); why != "" {
		return spec, "", nil, status.Error(codes.InvalidArgument, why)
	}
	unlock, err := d.lock("node/" + key)
	return spec, key, unlock, err
}

// readOnlyOpen asks the backend itself to open read-only when it can (an
// s3 volume then takes no writer's lease, so ReadOnlyMany readers can
// share it with each other and wait for no writer).
func readOnlyOpen(spec backends.Spec) backends.Spec {
	b, ok := backends.LookupBackend(spec.Scheme())
	if !ok || !slices.ContainsFunc(b.Options, func(o backends.Option) bool { return o.Key == "readonly" }) {
		return spec
	}
	opts := maps.Clone(spec.Options)
	opts["readonly"] = "true"
	ro, err := backends.Parse(backends.Spec{Options: opts, URL: spec.URL}.String())
	if err != nil {
		return spec
	}
	return ro
}

func readOnlyMode(c *csi.VolumeCapability) bool {
	switch c.GetAccessMode().GetMode() {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
		return true
	}
	return false
}

func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	staging := req.GetStagingTargetPath()
	capability := req.GetVolumeCapability()
	if err := required(arg{"volume ID", req.GetVolumeId() != ""}, arg{"staging target path", staging != ""},
		arg{"volume capability", capability != nil}); err != nil {
		return nil, err
	}
	spec, key, unlock, err := d.lockNodeVolume(req.GetVolumeId(), capability)
	if err != nil {
		return nil, err
	}
	defer unlock()

	readOnly := readOnlyMode(capability) || readOnlyBackend(spec)
	attachSpec := spec
	if readOnly {
		attachSpec = readOnlyOpen(spec)
	}
	dev, err := d.cfg.Attacher.Attach(ctx, key, attachSpec.String(), req.GetSecrets(), req.GetVolumeContext(), readOnly)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "attaching volume %q: %v", req.GetVolumeId(), err)
	}
	if capability.GetBlock() != nil {
		klog.InfoS("Staged block volume", "volumeID", req.GetVolumeId(), "device", dev)
		return &csi.NodeStageVolumeResponse{}, nil
	}

	if err := os.MkdirAll(staging, 0o750); err != nil {
		return nil, status.Errorf(codes.Internal, "staging path: %v", err)
	}
	notMnt, err := d.cfg.Mounter.IsLikelyNotMountPoint(staging)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "staging path %q: %v", staging, err)
	}
	if !notMnt {
		return &csi.NodeStageVolumeResponse{}, nil // staged before
	}
	fsType := capability.GetMount().GetFsType()
	if fsType == "" {
		fsType = req.GetVolumeContext()[ctxFSType]
	}
	if fsType == "" {
		fsType = "ext4"
	}
	opts := capability.GetMount().GetMountFlags()
	if readOnly {
		opts = append(opts, "ro")
	}
	// SafeFormatAndMount formats only a device with no filesystem on it.
	if err := d.cfg.Mounter.FormatAndMount(dev, staging, fsType, opts); err != nil {
		if derr := d.cfg.Attacher.Detach(ctx, key); derr != nil {
			klog.ErrorS(derr, "Detaching after a failed mount", "volumeID", req.GetVolumeId())
		}
		return nil, status.Errorf(codes.Internal, "formatting and mounting %s on %q: %v", dev, staging, err)
	}
	klog.InfoS("Staged volume", "volumeID", req.GetVolumeId(), "device", dev, "fsType", fsType, "path", staging)
	return &csi.NodeStageVolumeResponse{}, nil
}

func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	staging := req.GetStagingTargetPath()
	if err := required(arg{"volume ID", req.GetVolumeId() != ""}, arg{"staging target path", staging != ""}); err != nil {
		return nil, err
	}
	_, key, unlock, err := d.lockNodeVolume(req.GetVolumeId())
	if status.Code(err) == codes.NotFound {
		return &csi.NodeUnstageVolumeResponse{}, nil // never ours
	} else if err != nil {
		return nil, err
	}
	defer unlock()
	// Unmount (which flushes the filesystem) before the device goes.
	if err := mount.CleanupMountPoint(staging, d.cfg.Mounter, true); err != nil {
		return nil, status.Errorf(codes.Internal, "unmounting %q: %v", staging, err)
	}
	if err := d.cfg.Attacher.Detach(ctx, key); err != nil {
		return nil, status.Errorf(codes.Internal, "detaching volume %q: %v", req.GetVolumeId(), err)
	}
	klog.InfoS("Unstaged volume", "volumeID", req.GetVolumeId())
	return &csi.NodeUnstageVolumeResponse{}, nil
}

func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	target, staging, capability := req.GetTargetPath(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	if err := required(arg{"volume ID", req.GetVolumeId() != ""}, arg{"target path", target != ""},
		arg{"staging target path", staging != ""}, arg{"volume capability", capability != nil}); err != nil {
		return nil, err
	}
	spec, key, unlock, err := d.lockNodeVolume(req.GetVolumeId(), capability)
	if err != nil {
		return nil, err
	}
	defer unlock()

	opts := []string{"bind"}
	if req.GetReadonly() || readOnlyMode(capability) || readOnlyBackend(spec) {
		opts = append(opts, "ro")
	}
	source := staging
	if capability.GetBlock() != nil {
		dev, ok := d.cfg.Attacher.DevicePath(key)
		if !ok {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %q is not staged on this node", req.GetVolumeId())
		}
		source = dev
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "target path: %v", err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "target path: %v", err)
		}
		f.Close()
	} else {
		if notMnt, err := d.cfg.Mounter.IsLikelyNotMountPoint(staging); err != nil || notMnt {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %q is not staged at %q", req.GetVolumeId(), staging)
		}
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "target path: %v", err)
		}
	}
	notMnt, err := d.cfg.Mounter.IsLikelyNotMountPoint(target)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "target path %q: %v", target, err)
	}
	if !notMnt {
		return &csi.NodePublishVolumeResponse{}, nil
	}
	if err := d.cfg.Mounter.Mount(source, target, "", opts); err != nil {
		return nil, status.Errorf(codes.Internal, "bind-mounting %q on %q: %v", source, target, err)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	target := req.GetTargetPath()
	if err := required(arg{"volume ID", req.GetVolumeId() != ""}, arg{"target path", target != ""}); err != nil {
		return nil, err
	}
	if err := mount.CleanupMountPoint(target, d.cfg.Mounter, true); err != nil {
		return nil, status.Errorf(codes.Internal, "unmounting %q: %v", target, err)
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	p := req.GetVolumePath()
	if err := required(arg{"volume ID", req.GetVolumeId() != ""}, arg{"volume path", p != ""}); err != nil {
		return nil, err
	}
	_, key, err := nodeVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.NotFound, "volume path %q does not exist", p)
	} else if err != nil {
		return nil, status.Errorf(codes.Internal, "volume path %q: %v", p, err)
	}
	cond := &csi.VolumeCondition{Message: "attached and served"}
	if herr := d.cfg.Attacher.Health(key); herr != nil {
		cond = &csi.VolumeCondition{Abnormal: true, Message: herr.Error()}
	}
	if st.Mode()&os.ModeDevice != 0 {
		n, err := blockDeviceSize(p)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume path %q: %v", p, err)
		}
		return &csi.NodeGetVolumeStatsResponse{VolumeCondition: cond, Usage: []*csi.VolumeUsage{
			{Unit: csi.VolumeUsage_BYTES, Total: int64(n)},
		}}, nil
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(p, &fs); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %q: %v", p, err)
	}
	bs := int64(fs.Bsize)
	return &csi.NodeGetVolumeStatsResponse{VolumeCondition: cond, Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(fs.Blocks) * bs, Available: int64(fs.Bavail) * bs, Used: int64(fs.Blocks-fs.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(fs.Files), Available: int64(fs.Ffree), Used: int64(fs.Files - fs.Ffree)},
	}}, nil
}

func blockDeviceSize(p string) (uint64, error) {
	f, err := os.Open(p)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// Seeking to the end works for block devices and needs no ioctl.
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", p, err)
	}
	return uint64(n), nil
}

func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	p := req.GetVolumePath()
	if err := required(arg{"volume ID", req.GetVolumeId() != ""}, arg{"volume path", p != ""}); err != nil {
		return nil, err
	}
	if _, err := os.Stat(p); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume path %q: %v", p, err)
	}
	size, err := volumeSize(req.GetCapacityRange(), 0)
	if err != nil {
		return nil, err
	}
	_, key, unlock, err := d.lockNodeVolume(req.GetVolumeId())
	if err != nil {
		return nil, err
	}
	defer unlock()
	dev, ok := d.cfg.Attacher.DevicePath(key)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "volume %q is not staged on this node", req.GetVolumeId())
	}
	if size > 0 {
		if err := d.cfg.Attacher.Resize(ctx, key, size); err != nil {
			return nil, status.Errorf(codes.Internal, "growing volume %q to %d bytes: %v", req.GetVolumeId(), size, err)
		}
	}
	if req.GetVolumeCapability().GetBlock() == nil {
		mnt := req.GetStagingTargetPath()
		if mnt == "" {
			mnt = p
		}
		if _, err := mount.NewResizeFs(d.cfg.Mounter.Exec).Resize(dev, mnt); err != nil {
			return nil, status.Errorf(codes.Internal, "growing the filesystem on %s: %v", dev, err)
		}
	}
	n, err := blockDeviceSize(dev)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "%s: %v", dev, err)
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: int64(n)}, nil
}
