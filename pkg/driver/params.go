package driver

import (
	"fmt"
	"maps"
	"net/url"
	"path"
	"slices"
	"strings"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// StorageClass parameters. Each one maps onto one volume spec option (or
// decides the spec's URL); the README documents them all.
const (
	ParamBackend   = "backend"   // memory (default), s3, http, nbd, file
	ParamURL       = "url"       // http(s) origin, nbd:// export
	ParamDirectory = "directory" // file: one image file per volume in this host directory
	ParamBucket    = "bucket"    // s3
	ParamCache     = "cache"     // the cache filter's mode; s3 defaults to writeback
	ParamPrefix    = "prefix"    // s3: volumes live under PREFIX/VOLUME-NAME
	ParamFSType    = "fsType"    // ext4 (default) or xfs; also csi.storage.k8s.io/fstype

	// PVC and PV names the external-provisioner passes with
	// --extra-create-metadata; kept in the volume context for metrics and
	// events.
	ParamPVCName      = "csi.storage.k8s.io/pvc/name"
	ParamPVCNamespace = "csi.storage.k8s.io/pvc/namespace"
	ParamPVName       = "csi.storage.k8s.io/pv/name"
	ParamFSTypeK8s    = "csi.storage.k8s.io/fstype"
)

// optionParams maps parameters to the spec option they set. Which options
// a backend accepts is the backend's business: the spec parser checks it.
var optionParams = map[string]string{
	"endpoint":            "endpoint",
	"region":              "region",
	"pathStyle":           "path-style",
	"chunkSize":           "chunk",
	"headerSecret":        "header-secret",
	"connections":         "connections",
	"timeout":             "timeout",
	ParamCache:            "cache",
	"cacheSize":           "cache-size",
	"cacheBlockSize":      "cache-block",
	"cacheOnRead":         "cache-on-read",
	"readahead":           "readahead",
	"readaheadMax":        "readahead-max",
	"cow":                 "cow",
	"cowBlockSize":        "cow-block",
	"readBytesPerSecond":  "rate-read",
	"writeBytesPerSecond": "rate-write",
	"readIOPS":            "iops-read",
	"writeIOPS":           "iops-write",
	"burst":               "rate-burst",
}

// backendNames are the values of the backend parameter.
var backendNames = []string{"memory", "s3", "http", "nbd", "file"}

// Context keys of the volume context CreateVolume returns.
const (
	ctxSpec         = "spec"
	ctxFSType       = "fsType"
	ctxPVCName      = "pvcName"
	ctxPVCNamespace = "pvcNamespace"
	ctxPVName       = "pvName"
)

// metadataContext maps the provisioner's extra metadata parameters to
// their volume context keys.
var metadataContext = map[string]string{ParamPVCName: ctxPVCName, ParamPVCNamespace: ctxPVCNamespace, ParamPVName: ctxPVName}

// volumePlan is what CreateVolume makes of a request's parameters.
type volumePlan struct {
	backend string // the backend parameter
	spec    backends.Spec
	fsType  string
	context map[string]string
}

// paramError is an InvalidArgument naming the parameter.
type paramError struct {
	param string
	err   error
}

func (e *paramError) Error() string { return fmt.Sprintf("parameter %q: %v", e.param, e.err) }
func (e *paramError) Unwrap() error { return e.err }

func paramErrorf(param, format string, args ...any) error {
	return &paramError{param, fmt.Errorf(format, args...)}
}

// planVolume turns a volume name, its size and StorageClass parameters
// into the canonical spec. rateAlways adds rate=true so that limits can be
// changed live later even when the class sets none.
func planVolume(name string, size uint64, params map[string]string, rateAlways bool) (*volumePlan, error) {
	p := &volumePlan{fsType: "ext4", context: map[string]string{}}
	backend := params[ParamBackend]
	if backend == "" {
		backend = "memory"
	}
	p.backend = backend
	if !slices.Contains(backendNames, backend) {
		return nil, paramErrorf(ParamBackend, "unknown backend %q (want one of %s)", backend, strings.Join(backendNames, ", "))
	}

	opts := map[string]string{}
	// Parameters that make the URL, and the ones only the node needs.
	used := map[string]bool{ParamBackend: true}
	take := func(k string) string { used[k] = true; return params[k] }
	for param, key := range metadataContext {
		if v := take(param); v != "" {
			p.context[key] = v
		}
	}
	for _, k := range []string{ParamFSType, ParamFSTypeK8s} {
		if v := take(k); v != "" {
			if v != "ext4" && v != "xfs" {
				return nil, paramErrorf(k, "unsupported filesystem %q (want ext4 or xfs)", v)
			}
			p.fsType = v
		}
	}
	p.context[ctxFSType] = p.fsType

	var u string
	switch backend {
	case "memory":
		u = "memory:" + name
		opts["size"] = backends.FormatSize(size)
	case "s3":
		bucket, prefix := take(ParamBucket), strings.Trim(take(ParamPrefix), "/")
		if bucket == "" {
			return nil, paramErrorf(ParamBucket, "required with backend s3")
		}
		if strings.ContainsAny(bucket, "/?#%") {
			return nil, paramErrorf(ParamBucket, "invalid bucket name %q", bucket)
		}
		if strings.ContainsAny(prefix, "?#%") {
			return nil, paramErrorf(ParamPrefix, "invalid prefix %q", prefix)
		}
		u = "s3://" + bucket + "/" + path.Join(prefix, name)
		opts["size"] = backends.FormatSize(size)
		// The s3 backend acknowledges writes from a memory buffer and
		// uploads them on FLUSH: a node plugin that dies in between would
		// lose them, and the flush resent to its successor would succeed.
		// A writeback cache journals acknowledged writes on the node's
		// disk, so a restarted plugin writes them back: the default,
		// unless the class chooses (cache: "off" accepts the risk).
		if _, ok := params[ParamCache]; !ok {
			opts["cache"] = "writeback"
		}
	case "http", "nbd":
		raw := take(ParamURL)
		if raw == "" {
			return nil, paramErrorf(ParamURL, "required with backend %s", backend)
		}
		pu, err := url.Parse(raw)
		if err != nil {
			return nil, paramErrorf(ParamURL, "%v", err)
		}
		want := map[string][]string{"http": {"http", "https"}, "nbd": {"nbd", "nbds", "nbd+unix", "nbds+unix"}}[backend]
		if !slices.Contains(want, pu.Scheme) {
			return nil, paramErrorf(ParamURL, "scheme %q is not one of %s for backend %s", pu.Scheme, strings.Join(want, ", "), backend)
		}
		u = raw
		// Many volumes may share one origin: the name keeps their local
		// state (cow overlay, cache) apart.
		opts["volume"] = name
	case "file":
		dir := take(ParamDirectory)
		if dir == "" || !path.IsAbs(dir) {
			return nil, paramErrorf(ParamDirectory, "an absolute host directory is required with backend file")
		}
		u = "file://" + path.Join(dir, name+".img")
		opts["size"] = backends.FormatSize(size)
	}

	var keys []string
	for k := range params {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if used[k] {
			continue
		}
		opt, ok := optionParams[k]
		if !ok {
			return nil, paramErrorf(k, "unknown parameter (known: %s)", strings.Join(knownParams(), ", "))
		}
		opts[opt] = params[k]
	}
	if rateAlways {
		opts["rate"] = "true"
	}

	spec, err := backends.Parse(backends.Spec{Options: opts, URL: u}.String())
	if err != nil {
		return nil, blameParam(err, params, opts, u)
	}
	p.spec = spec
	p.context[ctxSpec] = spec.String()
	return p, nil
}

// CheckParameters says whether a StorageClass's parameters make a valid
// volume, with the error CreateVolume would give (naming the parameter at
// fault). The CO's own csi.storage.k8s.io/*-secret-* keys are not
// parameters the driver sees, so they are ignored here.
func CheckParameters(params map[string]string) error {
	own := map[string]string{}
	for k, v := range params {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") || !strings.Contains(k, "-secret-") {
			own[k] = v
		}
	}
	_, err := planVolume("pvc-check", 1<<30, own, false)
	return err
}

// blameParam finds which parameter made the spec invalid, so the error
// names what the user wrote rather than our option key: each option is
// tried alone on top of the options the driver itself set.
func blameParam(err error, params, opts map[string]string, u string) error {
	base := map[string]string{}
	for _, k := range []string{"size", "volume", "rate"} {
		if v, ok := opts[k]; ok {
			base[k] = v
		}
	}
	if _, berr := backends.Parse(backends.Spec{Options: base, URL: u}.String()); berr != nil {
		for _, k := range []string{ParamURL, ParamBucket, ParamDirectory} {
			if _, ok := params[k]; ok {
				return &paramError{k, berr}
			}
		}
		return fmt.Errorf("invalid volume: %w", berr)
	}
	for _, param := range slices.Sorted(maps.Keys(optionParams)) {
		v, ok := params[param]
		if !ok {
			continue
		}
		one := maps.Clone(base)
		one[optionParams[param]] = v
		if _, perr := backends.Parse(backends.Spec{Options: one, URL: u}.String()); perr != nil {
			return &paramError{param, perr}
		}
	}
	return fmt.Errorf("parameters make an invalid volume: %w", err)
}

func knownParams() []string {
	ks := []string{ParamBackend, ParamURL, ParamDirectory, ParamBucket, ParamPrefix, ParamFSType}
	for k := range optionParams {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
