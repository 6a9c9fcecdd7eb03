package backends_test

import (
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
