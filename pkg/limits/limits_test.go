package limits

import (
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends/rate"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name    string
		params  map[string]string
		want    Limits
		wantErr string // substring; "" means success
	}{
		{"empty", nil, Limits{}, ""},
		{"all", map[string]string{
			KeyReadBytes: "10Mi", KeyWriteBytes: "500k", KeyReadIOPS: "1000", KeyWriteIOPS: "0", KeyBurst: "200ms",
		}, Limits{ReadBytesPerSec: 10 << 20, WriteBytesPerSec: 500_000, ReadIOPS: 1000, Burst: 200 * time.Millisecond}, ""},
		{"plain bytes", map[string]string{KeyWriteBytes: "4096"}, Limits{WriteBytesPerSec: 4096}, ""},
		{"fraction to whole bytes", map[string]string{KeyReadBytes: "1.5Mi"}, Limits{ReadBytesPerSec: 3 << 19}, ""},
		{"max bytes", map[string]string{KeyReadBytes: "1Ti"}, Limits{ReadBytesPerSec: 1 << 40}, ""},
		{"max burst", map[string]string{KeyBurst: "1m"}, Limits{Burst: time.Minute}, ""},
		{"unknown key", map[string]string{"readBytesPerSec": "1"}, Limits{}, `parameter "readBytesPerSec": unknown`},
		{"bad quantity", map[string]string{KeyReadBytes: "10MB"}, Limits{}, `parameter "readBytesPerSecond"`},
		{"negative bytes", map[string]string{KeyWriteBytes: "-1"}, Limits{}, `parameter "writeBytesPerSecond"`},
		{"exponent", map[string]string{KeyWriteBytes: "1e6"}, Limits{}, `parameter "writeBytesPerSecond"`},
		{"fraction of a byte", map[string]string{KeyReadBytes: "0.5"}, Limits{}, `parameter "readBytesPerSecond"`},
		{"too fast", map[string]string{KeyReadBytes: "2Ti"}, Limits{}, "above the maximum"},
		{"iops not integer", map[string]string{KeyReadIOPS: "1k"}, Limits{}, `parameter "readIOPS": invalid integer`},
		{"iops negative", map[string]string{KeyWriteIOPS: "-5"}, Limits{}, `parameter "writeIOPS"`},
		{"iops too high", map[string]string{KeyWriteIOPS: "2000000000"}, Limits{}, `parameter "writeIOPS"`},
		{"burst no unit", map[string]string{KeyBurst: "200"}, Limits{}, `parameter "burst": invalid duration`},
		{"burst zero", map[string]string{KeyBurst: "0s"}, Limits{}, `parameter "burst"`},
		{"burst too long", map[string]string{KeyBurst: "2m"}, Limits{}, `parameter "burst"`},
		{"empty value", map[string]string{KeyReadIOPS: ""}, Limits{}, `parameter "readIOPS"`},
		// Several bad keys: always the first in sorted order.
		{"first bad key", map[string]string{"zzz": "1", KeyBurst: "x"}, Limits{}, `parameter "burst"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.params)
			if tc.wantErr == "" {
				if err != nil || got != tc.want {
					t.Fatalf("Parse(%v) = %+v, %v; want %+v", tc.params, got, err, tc.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Parse(%v) error %v; want one containing %q", tc.params, err, tc.wantErr)
			}
			if got != (Limits{}) {
				t.Errorf("Parse(%v) returned %+v with the error", tc.params, got)
			}
		})
	}
}

func TestFromAnnotations(t *testing.T) {
	l, err := FromAnnotations(map[string]string{
		"kubectl.kubernetes.io/last-applied-configuration": "{}",
		"csi-nbd.io/something-else":                        "x",
	})
	if err != nil || l.Set != 0 {
		t.Errorf("unrelated annotations: %+v, %v; want nothing set", l, err)
	}
	l, err = FromAnnotations(map[string]string{
		AnnReadBytes: "20Mi", AnnWriteBytes: "0", AnnReadIOPS: "100", AnnWriteIOPS: "50", AnnBurst: "1s",
	})
	want := Layer{Limits{ReadBytesPerSec: 20 << 20, WriteBytesPerSec: 0, ReadIOPS: 100, WriteIOPS: 50, Burst: time.Second}, FieldReadBytes | FieldWriteBytes | FieldReadIOPS | FieldWriteIOPS | FieldBurst}
	if err != nil || l != want {
		t.Errorf("all annotations: %+v, %v; want %+v", l, err, want)
	}
	_, err = FromAnnotations(map[string]string{AnnWriteIOPS: "fast"})
	if err == nil || !strings.Contains(err.Error(), `annotation "csi-nbd.io/write-iops"`) {
		t.Errorf("bad annotation: %v; want an error naming it", err)
	}
}

func TestFromSpecOptions(t *testing.T) {
	l, err := FromSpecOptions(map[string]string{"size": "1Gi", "rate": "true", OptReadBytes: "50Mi", OptWriteIOPS: "10"})
	want := Layer{Limits{ReadBytesPerSec: 50 << 20, WriteIOPS: 10}, FieldReadBytes | FieldWriteIOPS}
	if err != nil || l != want {
		t.Errorf("FromSpecOptions = %+v, %v; want %+v", l, err, want)
	}
	if _, err := FromSpecOptions(map[string]string{OptBurst: "soon"}); err == nil || !strings.Contains(err.Error(), `option "rate-burst"`) {
		t.Errorf("bad burst option: %v", err)
	}
}

func TestMerge(t *testing.T) {
	spec := Layer{Limits{ReadBytesPerSec: 100, WriteBytesPerSec: 200, ReadIOPS: 10, Burst: time.Second}, FieldReadBytes | FieldWriteBytes | FieldReadIOPS | FieldBurst}
	vac := Layer{Limits{ReadBytesPerSec: 300, WriteIOPS: 7}, FieldReadBytes | FieldWriteIOPS}
	// An explicit 0 lifts the limit below it.
	ann := Layer{Limits{WriteBytesPerSec: 0, ReadBytesPerSec: 400}, FieldWriteBytes | FieldReadBytes}
	for _, tc := range []struct {
		name   string
		layers []Layer
		want   Limits
	}{
		{"none", nil, Limits{}},
		{"spec", []Layer{spec}, spec.Limits},
		{"spec+vac", []Layer{spec, vac}, Limits{ReadBytesPerSec: 300, WriteBytesPerSec: 200, ReadIOPS: 10, WriteIOPS: 7, Burst: time.Second}},
		{"spec+vac+ann", []Layer{spec, vac, ann}, Limits{ReadBytesPerSec: 400, WriteBytesPerSec: 0, ReadIOPS: 10, WriteIOPS: 7, Burst: time.Second}},
		{"empty layers change nothing", []Layer{spec, {}, {}}, spec.Limits},
		// Set decides, not the value: unset fields with values are ignored.
		{"unset values ignored", []Layer{spec, {Limits: Limits{ReadIOPS: 99}}}, spec.Limits},
	} {
		if got := Merge(tc.layers...); got != tc.want {
			t.Errorf("%s: Merge = %+v; want %+v", tc.name, got, tc.want)
		}
	}
}

func TestString(t *testing.T) {
	got := Limits{ReadBytesPerSec: 10 << 20, WriteIOPS: 5, Burst: 200 * time.Millisecond}.String()
	want := "read 10Mi/s, write unlimited, read IOPS unlimited, write IOPS 5/s, burst 200ms"
	if got != want {
		t.Errorf("String = %q; want %q", got, want)
	}
}

// FuzzParse: Parse never panics, errors name a key of the input, and a
// success is within bounds and survives a round trip through the
// canonical parameter form.
func FuzzParse(f *testing.F) {
	f.Add(KeyReadBytes, "10Mi", KeyBurst, "200ms")
	f.Add(KeyReadIOPS, "1000", KeyWriteIOPS, "-1")
	f.Add(KeyWriteBytes, "1.5Gi", "other", "x")
	f.Add(KeyBurst, "1h", KeyReadBytes, "99999999999999999999999")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		params := map[string]string{k1: v1, k2: v2}
		l, err := Parse(params)
		if err != nil {
			if !strings.Contains(err.Error(), `"`) {
				t.Fatalf("error %q names no key", err)
			}
			return
		}
		for _, n := range []int64{l.ReadBytesPerSec, l.WriteBytesPerSec} {
			if n < 0 || n > MaxBytesPerSec {
				t.Fatalf("%+v out of bounds", l)
			}
		}
		for _, n := range []int64{l.ReadIOPS, l.WriteIOPS} {
			if n < 0 || n > MaxIOPS {
				t.Fatalf("%+v out of bounds", l)
			}
		}
		if l.Burst < 0 || l.Burst > MaxBurst {
			t.Fatalf("%+v out of bounds", l)
		}
		// What the controller accepts, the node's rate filter takes.
		if err := rate.Limits(l).Check(); err != nil {
			t.Fatalf("Parse accepted %v, the rate filter refuses it: %v", params, err)
		}
		back, err := Parse(Params(l))
		if err != nil || back != l {
			t.Fatalf("round trip of %+v through %v: %+v, %v", l, Params(l), back, err)
		}
	})
}

func TestBoundsAreTheRateFilters(t *testing.T) {
	if MaxBytesPerSec != rate.MaxBytesPerSec || MaxIOPS != rate.MaxIOPS || MaxBurst != rate.MaxBurst {
		t.Errorf("bounds %d, %d, %v; the rate filter's are %d, %d, %v",
			MaxBytesPerSec, MaxIOPS, MaxBurst, rate.MaxBytesPerSec, rate.MaxIOPS, rate.MaxBurst)
	}
	max := Limits{ReadBytesPerSec: MaxBytesPerSec, WriteBytesPerSec: MaxBytesPerSec, ReadIOPS: MaxIOPS, WriteIOPS: MaxIOPS, Burst: MaxBurst}
	if l, err := Parse(Params(max)); err != nil || l != max || rate.Limits(l).Check() != nil {
		t.Errorf("the largest limits: %+v, %v, %v", l, err, rate.Limits(l).Check())
	}
}
