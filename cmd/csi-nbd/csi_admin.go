package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/s3"
	"github.com/csi-nbd/csi-nbd/pkg/driver"
)

// volumeAdmins are the controller's hands on backends with state of their
// own; the others need nothing at create or delete.
func volumeAdmins() map[string]driver.VolumeAdmin {
	return map[string]driver.VolumeAdmin{"s3": s3Admin{}}
}

// s3Admin adapts package s3's volume lifecycle to the driver. The
// controller opens no device, so it holds no lease; Delete still refuses
// while a node's lease is live.
type s3Admin struct{}

func s3Env(secrets map[string]string) backends.Env {
	return backends.Env{Secrets: secrets, Owner: "csi-nbd-controller"}
}

func (s3Admin) Create(ctx context.Context, spec backends.Spec, src *backends.Spec, secrets map[string]string) error {
	if src != nil {
		return s3.CopyFrom(ctx, spec, *src, s3Env(secrets))
	}
	return s3.Create(ctx, spec, s3Env(secrets))
}

func (s3Admin) Delete(ctx context.Context, spec backends.Spec, secrets map[string]string) error {
	return s3.Delete(ctx, spec, s3Env(secrets))
}

func (s3Admin) Exists(ctx context.Context, spec backends.Spec, secrets map[string]string) (bool, error) {
	return s3.Exists(ctx, spec, s3Env(secrets))
}

func (s3Admin) Expand(ctx context.Context, spec backends.Spec, size uint64, secrets map[string]string) error {
	return s3.Expand(ctx, spec, s3Env(secrets), size)
}

func (s3Admin) Snapshot(ctx context.Context, spec, snap backends.Spec, secrets map[string]string) error {
	loc, err := s3.ParseURL(snap.URL)
	if err != nil {
		return fmt.Errorf("snapshot location: %w", err)
	}
	src, err := s3.ParseURL(spec.URL)
	if err != nil {
		return err
	}
	if loc.Bucket != src.Bucket {
		return fmt.Errorf("snapshot %s must be in the volume's bucket %s", snap.URL, src.Bucket)
	}
	return s3.Snapshot(ctx, spec, strings.Trim(loc.Prefix, "/"), s3Env(secrets))
}
