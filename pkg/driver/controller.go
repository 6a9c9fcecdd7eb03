package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/limits"
)

// TopologyKey is the topology segment naming a node; memory volumes are
// accessible only on the node holding them.
const TopologyKey = "topology." + DefaultName + "/node"

const (
	defaultSize = 1 << 30
	sizeGranule = 4096 // volumes are whole 4 KiB blocks: the kernel's largest block size
)

func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	types := []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		// attachRequired: Kubernetes then refuses a second node for a
		// ReadWriteOnce volume, and we record who holds it.
		csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
		csi.ControllerServiceCapability_RPC_PUBLISH_READONLY,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		// VolumeAttributesClass: rate limits change on a live volume.
		csi.ControllerServiceCapability_RPC_MODIFY_VOLUME,
	}
	if d.snapshotsSupported() {
		types = append(types,
			csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
			csi.ControllerServiceCapability_RPC_CLONE_VOLUME)
	}
	caps := make([]*csi.ControllerServiceCapability, len(types))
	for i, t := range types {
		caps[i] = &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}}
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// snapshotsSupported: snapshots exist only for backends with an admin
// (s3); declaring them is honest only when one is configured.
func (d *Driver) snapshotsSupported() bool { return len(d.cfg.Admins) > 0 }

// volumeSize picks the size for a capacity range: the required bytes
// rounded up to whole 4 KiB blocks, within the limit.
func volumeSize(r *csi.CapacityRange, dflt uint64) (uint64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, status.Error(codes.InvalidArgument, "capacity range: negative bytes")
	}
	if lim > 0 && req > lim {
		return 0, status.Errorf(codes.InvalidArgument, "capacity range: required %d bytes exceeds the limit %d", req, lim)
	}
	if req == 0 {
		size := dflt
		if lim > 0 && uint64(lim) < size {
			size = uint64(lim) / sizeGranule * sizeGranule
			if size == 0 {
				return 0, status.Errorf(codes.OutOfRange, "capacity range: limit %d bytes is below one %d-byte block", lim, sizeGranule)
			}
		}
		return size, nil
	}
	size := (uint64(req) + sizeGranule - 1) / sizeGranule * sizeGranule
	if lim > 0 && size > uint64(lim) {
		return 0, status.Errorf(codes.OutOfRange, "capacity range: %d bytes rounded up to whole %d-byte blocks exceeds the limit %d", req, sizeGranule, lim)
	}
	return size, nil
}

// readOnlyBackend: volumes that cannot be written (an http origin or a
// data: URI without a cow overlay).
func readOnlyBackend(s backends.Spec) bool {
	switch s.Scheme() {
	case "http", "https", "data":
		cow, _ := s.Bool("cow")
		return !cow
	}
	return false
}

// nodeLocal: volumes whose data lives on one node.
func nodeLocal(s backends.Spec) bool {
	switch s.Scheme() {
	case "memory", "file":
		return true
	}
	return false
}

// checkCaps returns why caps cannot be honoured for s, or "".
func checkCaps(s backends.Spec, caps []*csi.VolumeCapability) string {
	for _, c := range caps {
		if c.GetBlock() == nil && c.GetMount() == nil {
			return "access type must be block or mount"
		}
		if fs := c.GetMount().GetFsType(); fs != "" && fs != "ext4" && fs != "xfs" {
			return fmt.Sprintf("filesystem %q is not supported (ext4, xfs)", fs)
		}
		switch m := c.GetAccessMode().GetMode(); m {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
			if readOnlyBackend(s) {
				return fmt.Sprintf("access mode %s: %s volumes are read-only (add cow for a writable overlay)", m, s.Scheme())
			}
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
		case csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY:
			if nodeLocal(s) {
				return fmt.Sprintf("access mode %s: %s volumes live on one node", m, s.Scheme())
			}
		default:
			// Two writers on one block device corrupt any filesystem we
			// format; we never offer it.
			return fmt.Sprintf("access mode %s is not supported: one writer at a time", m)
		}
	}
	return ""
}

func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	name := req.GetName()
	if err := required(arg{"name", name != ""}, arg{"volume capabilities", len(req.GetVolumeCapabilities()) > 0}); err != nil {
		return nil, err
	}
	unlock, err := d.lock("volume-name/" + name)
	if err != nil {
		return nil, err
	}
	defer unlock()

	size, err := volumeSize(req.GetCapacityRange(), defaultSize)
	if err != nil {
		return nil, err
	}
	params := req.GetParameters()
	if mp := maps.Clone(req.GetMutableParameters()); len(mp) > 0 {
		// A VolumeAttributesClass given at creation: its limits are the
		// volume's initial ones, over the StorageClass's.
		maps.DeleteFunc(mp, func(k, _ string) bool { return strings.HasPrefix(k, "csi.storage.k8s.io/") })
		if _, err := limits.Parse(mp); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "mutable parameters: %v", err)
		}
		params = maps.Clone(params)
		if params == nil {
			params = map[string]string{}
		}
		maps.Copy(params, mp)
	}
	plan, err := planVolume(name, size, params, d.cfg.RateAlways)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !slices.Contains(d.cfg.Backends, plan.backend) {
		return nil, status.Errorf(codes.InvalidArgument, "parameter %q: backend %q is not enabled on this driver (enabled: %s)",
			ParamBackend, plan.backend, strings.Join(d.cfg.Backends, ", "))
	}
	if why := checkCaps(plan.spec, req.GetVolumeCapabilities()); why != "" {
		return nil, status.Error(codes.InvalidArgument, why)
	}
	spec := plan.spec
	id := spec.String()

	var src *backends.Spec
	var srcID string
	if cs := req.GetVolumeContentSource(); cs != nil {
		s, sid, err := d.contentSource(cs)
		if err != nil {
			return nil, err
		}
		if s.Scheme() != spec.Scheme() || d.cfg.Admins[spec.Scheme()] == nil {
			return nil, status.Errorf(codes.InvalidArgument, "volume content source: %s volumes cannot be made from %s data", spec.Scheme(), s.Scheme())
		}
		src, srcID = &s, sid
	}

	if rec, ok := d.vols.get(name); ok {
		if rec.ID != id || rec.Source != srcID || !maps.Equal(rec.Context, plan.context) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with other parameters, size or source", name)
		}
		return &csi.CreateVolumeResponse{Volume: rec.csiVolume(req.GetVolumeContentSource())}, nil
	}
	if _, other, ok := d.vols.find(func(k string, r volumeRecord) bool { return r.ID == id && k != name }); ok {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q already uses the same backend location", other.ID)
	}

	capacity := int64(size)
	switch {
	case readOnlyBackend(spec) || spec.Scheme() == "nbd" || spec.Scheme() == "nbds":
		// The origin decides the size: open it to learn it, which also
		// proves it is reachable with these secrets.
		n, err := probeSize(ctx, spec, req.GetSecrets())
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "volume %q: %v", name, err)
		}
		if req.GetCapacityRange().GetRequiredBytes() > int64(n) {
			return nil, status.Errorf(codes.OutOfRange, "volume %q: the origin holds %d bytes, less than the %d required", name, n, req.GetCapacityRange().GetRequiredBytes())
		}
		capacity = int64(n)
	}
	if a := d.cfg.Admins[spec.Scheme()]; a != nil {
		if err := a.Create(ctx, spec, src, req.GetSecrets()); err != nil {
			return nil, status.Errorf(codes.Internal, "creating volume %q: %v", name, err)
		}
	}

	rec := volumeRecord{ID: id, Capacity: capacity, Params: params, Source: srcID, Context: plan.context}
	if nodeLocal(spec) {
		rec.Topology = d.pickTopology(req.GetAccessibilityRequirements())
	}
	if err := d.vols.update(name, func(volumeRecord, bool) (volumeRecord, bool, error) { return rec, true, nil }); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	klog.InfoS("Created volume", "name", name, "volumeID", id, "capacity", capacity)
	return &csi.CreateVolumeResponse{Volume: rec.csiVolume(req.GetVolumeContentSource())}, nil
}

func (r volumeRecord) csiVolume(src *csi.VolumeContentSource) *csi.Volume {
	v := &csi.Volume{VolumeId: r.ID, CapacityBytes: r.Capacity, VolumeContext: maps.Clone(r.Context), ContentSource: src}
	if r.Topology != nil {
		v.AccessibleTopology = []*csi.Topology{{Segments: maps.Clone(r.Topology)}}
	}
	return v
}

// pickTopology places a node-local volume: the first preferred, else
// requisite, segment naming a node; in all-in-one mode, our node.
func (d *Driver) pickTopology(req *csi.TopologyRequirement) map[string]string {
	for _, t := range append(slices.Clone(req.GetPreferred()), req.GetRequisite()...) {
		if n := t.GetSegments()[TopologyKey]; n != "" {
			return map[string]string{TopologyKey: n}
		}
	}
	if d.cfg.Mode == ModeAll {
		return map[string]string{TopologyKey: d.cfg.NodeID}
	}
	return nil
}

// contentSource resolves a snapshot or volume source to its spec.
func (d *Driver) contentSource(cs *csi.VolumeContentSource) (backends.Spec, string, error) {
	var id string
	switch {
	case cs.GetSnapshot() != nil:
		id = cs.GetSnapshot().GetSnapshotId()
		if _, _, ok := d.snaps.find(func(_ string, r snapshotRecord) bool { return r.ID == id }); !ok {
			return backends.Spec{}, "", status.Errorf(codes.NotFound, "snapshot %q not found", id)
		}
	case cs.GetVolume() != nil:
		id = cs.GetVolume().GetVolumeId()
		if _, _, ok := d.vols.find(func(_ string, r volumeRecord) bool { return r.ID == id }); !ok {
			return backends.Spec{}, "", status.Errorf(codes.NotFound, "source volume %q not found", id)
		}
	default:
		return backends.Spec{}, "", status.Error(codes.InvalidArgument, "volume content source: neither a snapshot nor a volume")
	}
	s, err := backends.Parse(id)
	if err != nil {
		return backends.Spec{}, "", status.Errorf(codes.NotFound, "content source %q: %v", id, err)
	}
	return s, id, nil
}

// probeSize opens a read-only origin briefly to learn its size.
func probeSize(ctx context.Context, s backends.Spec, secrets map[string]string) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	dev, err := backends.Open(ctx, s, backends.Env{Secrets: secrets})
	if err != nil {
		return 0, err
	}
	n := dev.Size()
	return n, dev.Close()
}

func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if err := required(arg{"volume ID", id != ""}); err != nil {
		return nil, err
	}
	unlock, err := d.lock("volume/" + id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	name, rec, known := d.vols.find(func(_ string, r volumeRecord) bool { return r.ID == id })
	if known && len(rec.Published) > 0 {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q is still published to %s", id, strings.Join(slices.Sorted(maps.Keys(rec.Published)), ", "))
	}
	if err := d.deleteState(ctx, "volume", id, req.GetSecrets()); err != nil {
		return nil, err
	}
	if known {
		if err := d.vols.remove(name); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	klog.InfoS("Deleted volume", "volumeID", id)
	return &csi.DeleteVolumeResponse{}, nil
}

// lookupVolume finds a volume the controller made (or, for backends with
// their own state, one whose state exists: the controller's record may
// have been lost with its pod).
func (d *Driver) lookupVolume(ctx context.Context, id string, secrets map[string]string) (string, volumeRecord, backends.Spec, error) {
	spec, perr := backends.Parse(id)
	if name, rec, ok := d.vols.find(func(_ string, r volumeRecord) bool { return r.ID == id }); ok && perr == nil {
		return name, rec, spec, nil
	}
	if perr == nil {
		if a := d.cfg.Admins[spec.Scheme()]; a != nil {
			ok, err := a.Exists(ctx, spec, secrets)
			if err != nil {
				return "", volumeRecord{}, spec, status.Errorf(codes.Unavailable, "volume %q: %v", id, err)
			}
			if ok {
				return "", volumeRecord{ID: id}, spec, nil
			}
		}
	}
	return "", volumeRecord{}, spec, status.Errorf(codes.NotFound, "volume %q not found", id)
}

func (d *Driver) ControllerPublishVolume(ctx context.Context, req *csi.ControllerPublishVolumeRequest) (*csi.ControllerPublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	if err := required(arg{"volume ID", id != ""}, arg{"node ID", node != ""}, arg{"volume capability", req.GetVolumeCapability() != nil}); err != nil {
		return nil, err
	}
	unlock, err := d.lock("volume/" + id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	name, rec, spec, err := d.lookupVolume(ctx, id, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	if d.cfg.Mode == ModeAll && node != d.cfg.NodeID {
		return nil, status.Errorf(codes.NotFound, "node %q not found (this all-in-one driver is node %q)", node, d.cfg.NodeID)
	}
	if why := checkCaps(spec, []*csi.VolumeCapability{req.GetVolumeCapability()}); why != "" {
		return nil, status.Error(codes.InvalidArgument, why)
	}
	if n := rec.Topology[TopologyKey]; n != "" && n != node {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %q lives on node %q, not %q", id, n, node)
	}
	readOnly := req.GetReadonly() || readOnlyBackend(spec) ||
		req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY ||
		req.GetVolumeCapability().GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	if ro, ok := rec.Published[node]; ok {
		if ro != readOnly {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q is already published to node %q with readonly=%v", id, node, ro)
		}
		return &csi.ControllerPublishVolumeResponse{}, nil
	}
	// One writer at a time, anywhere: a second writer, or a writer
	// beside readers, would see (or cause) torn data.
	for n, ro := range rec.Published {
		if !ro || !readOnly {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %q is published to node %q%s; one writer at a time", id, n, map[bool]string{false: " read-write", true: ""}[ro])
		}
	}
	if name == "" {
		// Known only from the backend's own state: nothing to record
		// against; the backend's lease still guards writers.
		return &csi.ControllerPublishVolumeResponse{}, nil
	}
	err = d.vols.update(name, func(r volumeRecord, _ bool) (volumeRecord, bool, error) {
		r.Published = maps.Clone(r.Published)
		if r.Published == nil {
			r.Published = map[string]bool{}
		}
		r.Published[node] = readOnly
		return r, true, nil
	})
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.ControllerPublishVolumeResponse{}, nil
}

func (d *Driver) ControllerUnpublishVolume(ctx context.Context, req *csi.ControllerUnpublishVolumeRequest) (*csi.ControllerUnpublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	if err := required(arg{"volume ID", id != ""}); err != nil {
		return nil, err
	}
	unlock, err := d.lock("volume/" + id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	name, _, ok := d.vols.find(func(_ string, r volumeRecord) bool { return r.ID == id })
	if !ok {
		return &csi.ControllerUnpublishVolumeResponse{}, nil
	}
	err = d.vols.update(name, func(r volumeRecord, _ bool) (volumeRecord, bool, error) {
		r.Published = maps.Clone(r.Published)
		if node == "" {
			r.Published = nil
		} else {
			delete(r.Published, node)
		}
		return r, true, nil
	})
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.ControllerUnpublishVolumeResponse{}, nil
}

func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if err := required(arg{"volume ID", id != ""}, arg{"volume capabilities", len(req.GetVolumeCapabilities()) > 0}); err != nil {
		return nil, err
	}
	_, _, spec, err := d.lookupVolume(ctx, id, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	if why := checkCaps(spec, req.GetVolumeCapabilities()); why != "" {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: why}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

func (d *Driver) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if err := required(arg{"volume ID", id != ""}, arg{"capacity range", req.GetCapacityRange() != nil}); err != nil {
		return nil, err
	}
	unlock, err := d.lock("volume/" + id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	name, rec, spec, err := d.lookupVolume(ctx, id, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	if readOnlyBackend(spec) || spec.Scheme() == "nbd" || spec.Scheme() == "nbds" {
		return nil, status.Errorf(codes.InvalidArgument, "%s volumes take their size from the origin and cannot be expanded", spec.Scheme())
	}
	size, err := volumeSize(req.GetCapacityRange(), 0)
	if err != nil {
		return nil, err
	}
	if int64(size) <= rec.Capacity {
		return &csi.ControllerExpandVolumeResponse{CapacityBytes: rec.Capacity, NodeExpansionRequired: false}, nil
	}
	if a := d.cfg.Admins[spec.Scheme()]; a != nil {
		if err := a.Expand(ctx, spec, size, req.GetSecrets()); err != nil {
			return nil, status.Errorf(codes.Internal, "expanding volume %q: %v", id, err)
		}
	}
	if name != "" {
		err := d.vols.update(name, func(r volumeRecord, _ bool) (volumeRecord, bool, error) {
			r.Capacity = int64(size)
			return r, true, nil
		})
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	// The node grows the block device (and the filesystem) of a volume in
	// use; a volume in use nowhere picks the size up when staged.
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: int64(size), NodeExpansionRequired: true}, nil
}

func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	name, srcID := req.GetName(), req.GetSourceVolumeId()
	if err := required(arg{"snapshot name", name != ""}, arg{"source volume ID", srcID != ""}); err != nil {
		return nil, err
	}
	unlock, err := d.lock("snapshot-name/" + name)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if rec, ok := d.snaps.get(name); ok {
		if rec.SourceID != srcID {
			return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists for another volume", name)
		}
		return &csi.CreateSnapshotResponse{Snapshot: rec.csiSnapshot()}, nil
	}
	_, vol, spec, err := d.lookupVolume(ctx, srcID, req.GetSecrets())
	if err != nil {
		return nil, err
	}
	a := d.cfg.Admins[spec.Scheme()]
	if a == nil {
		return nil, status.Errorf(codes.InvalidArgument, "%s volumes cannot be snapshotted", spec.Scheme())
	}
	snap, err := snapshotSpec(spec, name)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if err := a.Snapshot(ctx, spec, snap, req.GetSecrets()); err != nil {
		return nil, status.Errorf(codes.Internal, "snapshot %q of %q: %v", name, srcID, err)
	}
	rec := snapshotRecord{ID: snap.String(), SourceID: srcID, Size: vol.Capacity, Created: time.Now().UTC()}
	if err := d.snaps.update(name, func(snapshotRecord, bool) (snapshotRecord, bool, error) { return rec, true, nil }); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.CreateSnapshotResponse{Snapshot: rec.csiSnapshot()}, nil
}

// snapshotSpec names a snapshot of volume spec: the same backend options,
// its objects beside the volume's under a snapshots/ prefix.
func snapshotSpec(spec backends.Spec, name string) (backends.Spec, error) {
	u := spec.URL
	i := strings.LastIndexByte(u, '/')
	if i < 0 || !strings.Contains(u, "://") {
		return backends.Spec{}, errors.New("volume URL has no path")
	}
	snap := backends.Spec{Options: maps.Clone(spec.Options), URL: u[:i] + "/snapshots/" + name}
	return backends.Parse(snap.String())
}

func (r snapshotRecord) csiSnapshot() *csi.Snapshot {
	return &csi.Snapshot{SnapshotId: r.ID, SourceVolumeId: r.SourceID, SizeBytes: r.Size,
		CreationTime: timestamppb.New(r.Created), ReadyToUse: true}
}

func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if err := required(arg{"snapshot ID", id != ""}); err != nil {
		return nil, err
	}
	unlock, err := d.lock("snapshot/" + id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	name, _, known := d.snaps.find(func(_ string, r snapshotRecord) bool { return r.ID == id })
	if err := d.deleteState(ctx, "snapshot", id, req.GetSecrets()); err != nil {
		return nil, err
	}
	if known {
		if err := d.snaps.remove(name); err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

// deleteState removes the backend state behind id, a volume's or a
// snapshot's spec, through its scheme's admin. An ID that is no spec was
// never ours: there is nothing to delete.
func (d *Driver) deleteState(ctx context.Context, what, id string, secrets map[string]string) error {
	spec, err := backends.Parse(id)
	if err != nil {
		klog.V(2).InfoS("Delete of an unknown ID", "kind", what, "id", id, "err", err)
		return nil
	}
	if a := d.cfg.Admins[spec.Scheme()]; a != nil {
		if err := a.Delete(ctx, spec, secrets); err != nil {
			return status.Errorf(codes.Internal, "deleting %s %q: %v", what, id, err)
		}
	}
	return nil
}
