package backends_test

import (
	"context"
	"slices"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func TestExtentMerger(t *testing.T) {
	var got []backends.Extent
	m := backends.ExtentMerger{Add: func(e backends.Extent) { got = append(got, e) }}
	hole := backends.ExtentHole | backends.ExtentZero
	m.Emit(4096, 0)
	m.Emit(0, hole) // empty: neither emitted nor a boundary
	m.Emit(512, 0)
	m.Emit(1024, hole)
	m.Emit(1024, hole)
	if len(got) != 1 {
		t.Fatalf("passed on before the flags changed or Flush: %v", got)
	}
	m.Emit(10, backends.ExtentZero)
	m.Flush()
	m.Flush() // nothing left: no second copy
	want := []backends.Extent{{Length: 4608}, {Length: 2048, Flags: hole}, {Length: 10, Flags: backends.ExtentZero}}
	if !slices.Equal(got, want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
}

// extentsDev replies to Extents with its fixed list, whatever the range.
type extentsDev struct {
	backends.Device
	exts []backends.Extent
}

func (d extentsDev) Extents(_ context.Context, _, _ uint64, add func(backends.Extent)) error {
	for _, e := range d.exts {
		add(e)
	}
	return nil
}

func TestClipExtents(t *testing.T) {
	hole := backends.ExtentHole | backends.ExtentZero
	dev := extentsDev{exts: []backends.Extent{{Length: 0}, {Length: 100}, {Length: 300, Flags: hole}, {Length: 50}}}
	var got []backends.Extent
	collect := func(n uint64, f backends.ExtentFlags) { got = append(got, backends.Extent{Length: n, Flags: f}) }
	n, err := backends.ClipExtents(context.Background(), dev, 1000, 250, collect)
	if err != nil || n != 250 {
		t.Fatalf("covered %d, %v; want 250, nil", n, err)
	}
	want := []backends.Extent{{Length: 100}, {Length: 150, Flags: hole}}
	if !slices.Equal(got, want) {
		t.Fatalf("extents %v, want %v", got, want)
	}
	got = nil
	if n, _ := backends.ClipExtents(context.Background(), dev, 0, 1000, collect); n != 450 {
		t.Fatalf("short reply covered %d, want 450", n)
	}
}

func TestBackendSpec(t *testing.T) {
	s, err := backends.Parse("tst-outer=true,volume=pvc-1,size=2Mi,flag=true;fake:x")
	if err != nil {
		t.Fatal(err)
	}
	want, err := backends.Parse("volume=pvc-1,size=2Mi,flag=true;fake:x")
	if err != nil {
		t.Fatal(err)
	}
	if got := backends.BackendSpec(s); got.String() != want.String() {
		t.Fatalf("BackendSpec(%s) = %s, want %s (filter options dropped, the backend's and volume= kept)", s, got, want)
	}
}
