package driver

import (
	"errors"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/all"
)

func TestPlanVolume(t *testing.T) {
	for _, tc := range []struct {
		name   string
		params map[string]string
		spec   string
		fs     string
	}{
		{"default memory", nil, "size=2Gi;memory:pvc-1", "ext4"},
		{"memory xfs", map[string]string{"backend": "memory", "fsType": "xfs"}, "size=2Gi;memory:pvc-1", "xfs"},
		{"k8s fstype", map[string]string{"csi.storage.k8s.io/fstype": "xfs"}, "size=2Gi;memory:pvc-1", "xfs"},
		{"pvc metadata ignored by the spec", map[string]string{
			"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "ns", "csi.storage.k8s.io/pv/name": "pvc-1",
		}, "size=2Gi;memory:pvc-1", "ext4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := planVolume("pvc-1", 2<<30, tc.params, false)
			if err != nil {
				t.Fatal(err)
			}
			if got := p.spec.String(); got != tc.spec {
				t.Errorf("spec %q, want %q", got, tc.spec)
			}
			if p.fsType != tc.fs || p.context[ctxFSType] != tc.fs || p.context[ctxSpec] != tc.spec {
				t.Errorf("context %v", p.context)
			}
		})
	}
}

func TestPlanVolumeMetadataInContext(t *testing.T) {
	p, err := planVolume("pvc-1", 1<<20, map[string]string{
		"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "ns", "csi.storage.k8s.io/pv/name": "pvc-1",
	}, true)
	if err != nil {
		t.Fatal(err)
	}
	if p.context[ctxPVCName] != "data" || p.context[ctxPVCNamespace] != "ns" || p.context[ctxPVName] != "pvc-1" {
		t.Errorf("context %v", p.context)
	}
	if v, _ := p.spec.Value("rate"); v != "true" {
		t.Errorf("rateAlways did not enable the rate filter: %q", p.spec)
	}
}

func TestPlanVolumeErrorsNameTheParameter(t *testing.T) {
	for _, tc := range []struct {
		params map[string]string
		param  string
		want   string
	}{
		{map[string]string{"backend": "floppy"}, "backend", "unknown backend"},
		{map[string]string{"color": "blue"}, "color", "unknown parameter"},
		{map[string]string{"fsType": "ntfs"}, "fsType", "unsupported filesystem"},
		{map[string]string{"csi.storage.k8s.io/fstype": "vfat"}, "csi.storage.k8s.io/fstype", "unsupported filesystem"},
		{map[string]string{"backend": "s3"}, "bucket", "required"},
		{map[string]string{"backend": "s3", "bucket": "a/b"}, "bucket", "invalid bucket"},
		{map[string]string{"backend": "http"}, "url", "required"},
		{map[string]string{"backend": "http", "url": "ftp://x/y"}, "url", "scheme"},
		{map[string]string{"backend": "nbd", "url": "http://x/y"}, "url", "scheme"},
		{map[string]string{"backend": "file", "directory": "rel/dir"}, "directory", "absolute"},
		{map[string]string{"cache": "writeback", "cacheBlockSize": "3Ki"}, "cacheBlockSize", "cache-block"},
		{map[string]string{"cache": "sometimes"}, "cache", "cache"},
		{map[string]string{"readIOPS": "-5"}, "readIOPS", "iops-read"},
		{map[string]string{"readahead": "true", "readaheadMax": "1"}, "readaheadMax", "readahead-max"},
		{map[string]string{"cow": "true", "cowBlockSize": "1000"}, "cowBlockSize", "cow-block"},
	} {
		_, err := planVolume("pvc-1", 1<<30, tc.params, false)
		var pe *paramError
		if !errors.As(err, &pe) || pe.param != tc.param || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), `"`+tc.param+`"`) {
			t.Errorf("params %v: error %v; want one naming %q with %q", tc.params, err, tc.param, tc.want)
		}
	}
}

func TestReadOnlyOpen(t *testing.T) {
	for in, want := range map[string]string{
		"size=1Gi,endpoint=http://127.0.0.1:9/,path-style=true;s3://bkt/p/v": "endpoint=http://127.0.0.1:9/,path-style=true,readonly=true,size=1Gi;s3://bkt/p/v",
		"size=2Gi;memory:x": "size=2Gi;memory:x", // no such option: unchanged
	} {
		s, err := backends.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := readOnlyOpen(s).String(); got != want {
			t.Errorf("readOnlyOpen(%q) = %q; want %q", in, got, want)
		}
	}
}
