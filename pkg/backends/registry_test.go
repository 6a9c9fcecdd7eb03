package backends_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func TestSchemes(t *testing.T) {
	// Every backend package linked in (through backends/all) registers
	// too, so check for these rather than list them all.
	got := backends.Schemes()
	if !slices.IsSorted(got) || len(slices.Compact(slices.Clone(got))) != len(got) {
		t.Errorf("Schemes() = %v; want sorted, without duplicates", got)
	}
	for _, want := range []string{"data", "fake", "fakereq", "memory"} {
		if !slices.Contains(got, want) {
			t.Errorf("Schemes() = %v; want it to hold %q", got, want)
		}
	}
	b, ok := backends.LookupBackend("memory")
	if !ok || b.Scheme != "memory" || len(b.Options) != 1 || b.Options[0].Default != "1Gi" {
		t.Errorf("LookupBackend(memory) = %+v, %v", b, ok)
	}
	var names []string
	for _, f := range backends.Filters() {
		names = append(names, f.Name)
	}
	if want := []string{"tst-inner", "tst-outer"}; !slices.Equal(names, want) {
		t.Errorf("Filters() = %v; want %v", names, want)
	}
}

func mustParse(t *testing.T, s string) backends.Spec {
	t.Helper()
	sp, err := backends.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return sp
}

func TestOpenStacksFilters(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		spec string
		want []string // outside in
	}{
		{"fake:plain", []string{"fake:plain"}},
		{"tst-inner=1Ki;fake:one", []string{"tst-inner", "fake:one"}},
		{"tst-outer=true;fake:one", []string{"tst-outer", "fake:one"}},
		{"tst-outer=false;fake:one", []string{"tst-outer", "fake:one"}},
		{"tst-outer=true,tst-inner=2Ki;fake:two", []string{"tst-outer", "tst-inner", "fake:two"}},
	} {
		dev, err := backends.Open(ctx, mustParse(t, tc.spec), backends.Env{})
		if err != nil {
			t.Errorf("Open(%q): %v", tc.spec, err)
			continue
		}
		if got := dev.(*fakeDev).stack(); !slices.Equal(got, tc.want) {
			t.Errorf("Open(%q) stack = %v; want %v", tc.spec, got, tc.want)
		}
	}
}

// A failing filter closes the layers beneath it exactly once.
func TestOpenWrapFailureCloses(t *testing.T) {
	sp := mustParse(t, "tst-inner=4Ki,tst-outer=true;fake:wrapfail-tst-outer")
	_, err := backends.Open(context.Background(), sp, backends.Env{})
	if err == nil || !strings.Contains(err.Error(), "filter tst-outer: fake wrap failure") {
		t.Fatalf("Open error = %v", err)
	}
	fakeMu.Lock()
	base := fakeDevs[len(fakeDevs)-1]
	fakeMu.Unlock()
	if base.name != "fake:wrapfail-tst-outer" || base.closed != 1 {
		t.Errorf("base device %q closed %d times; want 1", base.name, base.closed)
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	if _, err := backends.Open(ctx, mustParse(t, "fake:openfail"), backends.Env{}); err == nil || !strings.Contains(err.Error(), `open "fake:openfail": fake open failure`) {
		t.Errorf("Open(fake:openfail) error = %v", err)
	}
	// Hand-built specs get the same option checks as parsed ones.
	for _, s := range []backends.Spec{
		{URL: "ftp://x"},
		{URL: "memory:", Options: map[string]string{"size": "big"}},
		{URL: "memory:", Options: map[string]string{"bogus": "1"}},
		{URL: "fakereq:"},
	} {
		if _, err := backends.Open(ctx, s, backends.Env{}); !errors.Is(err, backends.ErrInvalidSpec) {
			t.Errorf("Open(%#v) error = %v; want ErrInvalidSpec", s, err)
		}
	}
}

func TestRegisterPanics(t *testing.T) {
	schemes := len(backends.Schemes())
	nop := func(context.Context, backends.Spec, backends.Env) (backends.Device, error) { return nil, nil }
	wrap := func(context.Context, backends.Spec, backends.Env, backends.Device) (backends.Device, error) {
		return nil, nil
	}
	for name, reg := range map[string]func(){
		"duplicate scheme": func() { backends.Register(backends.Backend{Scheme: "memory", Open: nop}) },
		"bad scheme":       func() { backends.Register(backends.Backend{Scheme: "Bad", Open: nop}) },
		"bad scheme char":  func() { backends.Register(backends.Backend{Scheme: "a_b", Open: nop}) },
		"bad scheme start": func() { backends.Register(backends.Backend{Scheme: "+a", Open: nop}) },
		"nil open":         func() { backends.Register(backends.Backend{Scheme: "nilopen"}) },
		"non-canonical default": func() {
			backends.Register(backends.Backend{Scheme: "badd", Open: nop,
				Options: []backends.Option{{Key: "size", Kind: backends.OptSize, Default: "1024Mi"}}})
		},
		"bad kind": func() {
			backends.Register(backends.Backend{Scheme: "badk", Open: nop, Options: []backends.Option{{Key: "x"}}})
		},
		"empty enum": func() {
			backends.Register(backends.Backend{Scheme: "bade", Open: nop,
				Options: []backends.Option{{Key: "x", Kind: backends.OptEnum}}})
		},
		"filter key clash": func() {
			backends.Register(backends.Backend{Scheme: "clash", Open: nop,
				Options: []backends.Option{{Key: "tst-inner", Kind: backends.OptBool}}})
		},
		"filter clashes with backend": func() {
			backends.RegisterFilter(backends.Filter{Name: "clash", Wrap: wrap,
				Options: []backends.Option{{Key: "size", Kind: backends.OptSize}}})
		},
		"duplicate filter": func() {
			backends.RegisterFilter(backends.Filter{Name: "tst-inner", Wrap: wrap,
				Options: []backends.Option{{Key: "other", Kind: backends.OptSize}}})
		},
		"filter never on": func() { backends.RegisterFilter(backends.Filter{Name: "never", Wrap: wrap}) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s: no panic", name)
				}
			}()
			reg()
		}()
	}
	if got := len(backends.Schemes()); got != schemes {
		t.Errorf("failed registrations changed Schemes: %v", backends.Schemes())
	}
}
