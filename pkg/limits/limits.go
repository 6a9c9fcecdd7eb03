// Package limits parses a volume's rate limits from the three places a user
// can set them and merges them into the limits in force:
//
//  1. the volume spec (StorageClass parameters, fixed at creation), lowest;
//  2. the VolumeAttributesClass the controller accepted
//     (ControllerModifyVolume's mutable parameters);
//  3. PVC annotations (csi-nbd.io/read-bytes-per-second, …), highest — for
//     clusters without VolumeAttributesClass, or a quick override.
//
// Precedence is per limit: a higher layer overrides only the limits it
// names, so an annotation setting read-bytes-per-second keeps the class's
// write limit. An explicit 0 is a value ("unlimited") and overrides too.
//
// The parameter keys and their grammar are the StorageClass's:
//
//	readBytesPerSecond   bytes per second as a quantity (10Mi, 500k, 1G)
//	writeBytesPerSecond  bytes per second
//	readIOPS             read operations per second, an integer
//	writeIOPS            write operations per second
//	burst                how much traffic may pass at once after idle, as a
//	                     duration of traffic at the limit (200ms)
//
// The bounds are the rate filter's, so the controller accepts exactly what
// the node can apply.
package limits

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/rate"
)

// Parameter keys (StorageClass, VolumeAttributesClass).
const (
	KeyReadBytes  = "readBytesPerSecond"
	KeyWriteBytes = "writeBytesPerSecond"
	KeyReadIOPS   = "readIOPS"
	KeyWriteIOPS  = "writeIOPS"
	KeyBurst      = "burst"
)

// Annotation keys on a PVC.
const (
	AnnotationPrefix   = "csi-nbd.io/"
	AnnReadBytes       = AnnotationPrefix + "read-bytes-per-second"
	AnnWriteBytes      = AnnotationPrefix + "write-bytes-per-second"
	AnnReadIOPS        = AnnotationPrefix + "read-iops"
	AnnWriteIOPS       = AnnotationPrefix + "write-iops"
	AnnBurst           = AnnotationPrefix + "burst"
	annotationRateKeys = "read-bytes-per-second, write-bytes-per-second, read-iops, write-iops, burst"
)

// Spec option keys of the rate filter (pkg/backends/rate), which the
// driver sets from the StorageClass parameters above.
const (
	OptReadBytes  = rate.KeyReadRate
	OptWriteBytes = rate.KeyWriteRate
	OptReadIOPS   = rate.KeyReadIOPS
	OptWriteIOPS  = rate.KeyWriteIOPS
	OptBurst      = rate.KeyBurst
)

// Bounds, the rate filter's: beyond them a value is surely a typo, and the
// filter would refuse it.
const (
	MaxBytesPerSec = rate.MaxBytesPerSec
	MaxIOPS        = rate.MaxIOPS
	MaxBurst       = rate.MaxBurst
)

// Limits are a volume's rate limits, the rate filter's own type. Zero
// means unlimited; a zero Burst means the rate filter's default.
type Limits = rate.Limits

// Fields is a set of limits, by bit.
type Fields uint8

const (
	FieldReadBytes Fields = 1 << iota
	FieldWriteBytes
	FieldReadIOPS
	FieldWriteIOPS
	FieldBurst
)

// Layer is the limits one source sets: only the fields in Set count.
type Layer struct {
	Limits
	Set Fields
}

// kind of a field's value.
type kind int

const (
	bytesPerSec kind = iota
	opsPerSec
	duration
)

type field struct {
	bit             Fields
	param, ann, opt string
	kind            kind
	get             func(*Limits) *int64
}

var fields = []field{
	{FieldReadBytes, KeyReadBytes, AnnReadBytes, OptReadBytes, bytesPerSec, func(l *Limits) *int64 { return &l.ReadBytesPerSec }},
	{FieldWriteBytes, KeyWriteBytes, AnnWriteBytes, OptWriteBytes, bytesPerSec, func(l *Limits) *int64 { return &l.WriteBytesPerSec }},
	{FieldReadIOPS, KeyReadIOPS, AnnReadIOPS, OptReadIOPS, opsPerSec, func(l *Limits) *int64 { return &l.ReadIOPS }},
	{FieldWriteIOPS, KeyWriteIOPS, AnnWriteIOPS, OptWriteIOPS, opsPerSec, func(l *Limits) *int64 { return &l.WriteIOPS }},
	{FieldBurst, KeyBurst, AnnBurst, OptBurst, duration, func(l *Limits) *int64 { return (*int64)(&l.Burst) }},
}

// Parse reads StorageClass or VolumeAttributesClass parameters. Every key
// must be one of the five limit keys; errors name the key.
func Parse(params map[string]string) (Limits, error) {
	l, err := ParseLayer(params)
	return l.Limits, err
}

// ParseLayer is Parse, also telling which limits the parameters set.
func ParseLayer(params map[string]string) (Layer, error) {
	return parse(params, func(f field) string { return f.param }, "parameter",
		strings.Join([]string{KeyReadBytes, KeyWriteBytes, KeyReadIOPS, KeyWriteIOPS, KeyBurst}, ", "), false)
}

// FromAnnotations reads the five rate annotations of a PVC; all other
// annotations (ours included: the prefix is shared with other features) are
// ignored. Layer.Set is 0 when none is present.
func FromAnnotations(ann map[string]string) (Layer, error) {
	return parse(ann, func(f field) string { return f.ann }, "annotation", annotationRateKeys, true)
}

// FromSpecOptions reads the rate filter options of a volume spec (the
// StorageClass values as the driver wrote them). Other options are
// ignored.
func FromSpecOptions(opts map[string]string) (Layer, error) {
	return parse(opts, func(f field) string { return f.opt }, "option", "", true)
}

func parse(m map[string]string, key func(field) string, what, known string, others bool) (Layer, error) {
	var l Layer
	byKey := make(map[string]field, len(fields))
	for _, f := range fields {
		byKey[key(f)] = f
	}
	// Sorted, so the error for several bad keys is always the same one.
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		f, ok := byKey[k]
		if !ok {
			if others {
				continue
			}
			return Layer{}, fmt.Errorf("%s %q: unknown (want some of %s)", what, k, known)
		}
		n, err := parseValue(f.kind, m[k])
		if err != nil {
			return Layer{}, fmt.Errorf("%s %q: %w", what, k, err)
		}
		*f.get(&l.Limits) = n
		l.Set |= f.bit
	}
	return l, nil
}

func parseValue(k kind, v string) (int64, error) {
	switch k {
	case bytesPerSec:
		n, err := backends.ParseSize(v)
		if err != nil {
			return 0, fmt.Errorf("%w (bytes per second, e.g. 10Mi)", err)
		}
		if n > MaxBytesPerSec {
			return 0, fmt.Errorf("%s bytes per second is above the maximum %s", v, backends.FormatSize(MaxBytesPerSec))
		}
		return int64(n), nil
	case opsPerSec:
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("invalid integer %q (operations per second)", v)
		}
		if n < 0 || n > MaxIOPS {
			return 0, fmt.Errorf("%d is not between 0 (unlimited) and %d", n, MaxIOPS)
		}
		return n, nil
	default:
		d, err := time.ParseDuration(v)
		if err != nil {
			return 0, fmt.Errorf("invalid duration %q (e.g. 200ms)", v)
		}
		if d <= 0 || d > MaxBurst {
			return 0, fmt.Errorf("%v is not above 0 and at most %v", d, MaxBurst)
		}
		return int64(d), nil
	}
}

// Merge lays layers over each other, lowest first: each limit comes from
// the last layer that sets it; limits no layer sets are 0 (unlimited, or
// the default burst).
func Merge(layers ...Layer) Limits {
	var out Limits
	for _, l := range layers {
		for _, f := range fields {
			if l.Set&f.bit != 0 {
				*f.get(&out) = *f.get(&l.Limits)
			}
		}
	}
	return out
}

// Params writes l as parameters in canonical form, leaving out the limits
// that are 0: Parse(Params(l)) == l.
func Params(l Limits) map[string]string {
	p := map[string]string{}
	for _, f := range fields {
		n := *f.get(&l)
		if n == 0 {
			continue
		}
		switch f.kind {
		case bytesPerSec:
			p[f.param] = backends.FormatSize(uint64(n))
		case opsPerSec:
			p[f.param] = strconv.FormatInt(n, 10)
		default:
			p[f.param] = time.Duration(n).String()
		}
	}
	return p
}
