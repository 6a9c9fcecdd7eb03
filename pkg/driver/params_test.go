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
		{"s3 with every s3 parameter", map[string]string{
			"backend": "s3", "bucket": "vols", "prefix": "/team/a/", "endpoint": "http://127.0.0.1:9000",
			"region": "eu-west-1", "pathStyle": "true", "chunkSize": "1Mi",
		}, "cache=writeback,chunk=1Mi,endpoint=http://127.0.0.1:9000,path-style=true,region=eu-west-1,size=2Gi;s3://vols/team/a/pvc-1", "ext4"},
		{"s3 with the cache turned off", map[string]string{"backend": "s3", "bucket": "vols", "cache": "off"},
			"size=2Gi;s3://vols/pvc-1", "ext4"},
		{"http origin with filters", map[string]string{
			"backend": "http", "url": "https://example.com/disk.iso?x=1", "headerSecret": "auth", "timeout": "10s",
			"cow": "true", "cowBlockSize": "128Ki", "readahead": "true", "readaheadMax": "8Mi",
			"cache": "writethrough", "cacheSize": "2Gi", "cacheBlockSize": "256Ki", "cacheOnRead": "false",
		}, "cache=writethrough,cache-block=256Ki,cache-on-read=false,cache-size=2Gi,cow=true,cow-block=128Ki,header-secret=auth," +
			"readahead=true,readahead-max=8Mi,timeout=10s,volume=pvc-1;https://example.com/disk.iso?x=1", "ext4"},
		{"nbd remote", map[string]string{"backend": "nbd", "url": "nbd://127.0.0.1:10809/exp", "connections": "4"},
			"connections=4,volume=pvc-1;nbd://127.0.0.1:10809/exp", "ext4"},
		{"file with rate limits", map[string]string{
			"backend": "file", "directory": "/var/lib/vols", "readBytesPerSecond": "10Mi", "writeBytesPerSecond": "5Mi",
			"readIOPS": "100", "writeIOPS": "50", "burst": "200ms",
		}, "iops-read=100,iops-write=50,rate-burst=200ms,rate-read=10Mi,rate-write=5Mi,size=2Gi;file:///var/lib/vols/pvc-1.img", "ext4"},
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
