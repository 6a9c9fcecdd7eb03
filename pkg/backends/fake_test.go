package backends_test

import (
	"context"
	"errors"
	"strings"
	"sync"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	// data and memory only, not all: these tests list the known schemes,
	// which must not change whenever a backend is added to all.
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/data"
	_ "github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// The fake backend and filters are registered for the whole test binary,
// so every error listing known keys or schemes includes them.
func init() {
	backends.Register(backends.Backend{
		Scheme: "fake",
		Doc:    "test backend with one option of each kind",
		Options: []backends.Option{
			{Key: "size", Kind: backends.OptSize, Default: "1Mi"},
			{Key: "flag", Kind: backends.OptBool, Default: "false"},
			{Key: "count", Kind: backends.OptInt, Default: "3"},
			{Key: "timeout", Kind: backends.OptDuration, Default: "30s"},
			{Key: "mode", Kind: backends.OptEnum, Default: "a", Enum: []string{"a", "b", "c"}},
			{Key: "name", Kind: backends.OptString},
		},
		Open: openFake,
	})
	backends.Register(backends.Backend{
		Scheme:  "fakereq",
		Options: []backends.Option{{Key: "need", Kind: backends.OptString, Required: true}},
		Open:    openFake,
	})
	// Registered in reverse Order to check Open sorts them.
	backends.RegisterFilter(backends.Filter{
		Name: "tst-outer", Order: 40,
		Options: []backends.Option{{Key: "tst-outer", Kind: backends.OptBool}},
		Wrap:    wrapFake("tst-outer"),
	})
	backends.RegisterFilter(backends.Filter{
		Name: "tst-inner", Order: 10,
		Options: []backends.Option{{Key: "tst-inner", Kind: backends.OptSize}},
		Wrap:    wrapFake("tst-inner"),
	})
}

// fakeDev records its layer name, what it wraps and whether it is closed.
type fakeDev struct {
	backends.Device // nil: only the methods below are used
	name            string
	inner           *fakeDev
	mu              sync.Mutex
	closed          int
	flushed         int
}

var (
	fakeMu    sync.Mutex
	fakeOpens = map[string]int{} // opens by URL
	fakeDevs  []*fakeDev
	fakeGates = map[string]chan struct{}{} // opens of a URL wait for its gate
)

func openFake(_ context.Context, s backends.Spec, _ backends.Env) (backends.Device, error) {
	fakeMu.Lock()
	gate := fakeGates[s.URL]
	fakeMu.Unlock()
	if gate != nil {
		<-gate
	}
	fakeMu.Lock()
	defer fakeMu.Unlock()
	fakeOpens[s.URL]++
	if strings.Contains(s.URL, "openfail") {
		return nil, errors.New("fake open failure")
	}
	d := &fakeDev{name: s.URL}
	fakeDevs = append(fakeDevs, d)
	return d, nil
}

func wrapFake(name string) func(context.Context, backends.Spec, backends.Env, backends.Device) (backends.Device, error) {
	return func(_ context.Context, s backends.Spec, _ backends.Env, inner backends.Device) (backends.Device, error) {
		if v, _ := s.Options[name]; v == "1" || strings.Contains(s.URL, "wrapfail-"+name) {
			return nil, errors.New("fake wrap failure")
		}
		return &fakeDev{name: name, inner: inner.(*fakeDev)}, nil
	}
}

func (d *fakeDev) Size() uint64 { return 1 }

func (d *fakeDev) Flush(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.flushed++
	return nil
}

func (d *fakeDev) Close() error {
	d.mu.Lock()
	d.closed++
	d.mu.Unlock()
	if d.inner != nil {
		return d.inner.Close()
	}
	return nil
}

// stack lists the layers from the outside in.
func (d *fakeDev) stack() []string {
	var s []string
	for ; d != nil; d = d.inner {
		s = append(s, d.name)
	}
	return s
}
