package backends

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
)

// Backend is a data source, registered by its package's init() (the
// nbdkit plugin model): a binary gets the backends it imports, and
// package backends/all imports every one.
type Backend struct {
	// Scheme is the lower-case URL scheme the backend serves ("memory").
	Scheme  string
	Options []Option
	Doc     string
	// Validate, if set, checks the URL and options cheaply when a spec
	// is parsed, so bad volumes are refused at creation, not at attach.
	// Open must still check everything itself.
	Validate func(s Spec) error
	// Open opens the device for s (already parsed, options canonical)
	// with env's secrets and local paths. ctx bounds the opening only;
	// the device must not keep it.
	Open func(ctx context.Context, s Spec, env Env) (Device, error)
}

// Filter wraps a backend's Device to add a feature (caching, copy on
// write, rate limiting...). Filters are stacked in a fixed order whatever
// the order of options in the spec, so one canonical spec is one stack.
type Filter struct {
	Name string
	// Order places the filter in the stack; lower is closer to the
	// backend. The fixed assignment is cache(10), readahead(20), cow(30),
	// rate(40).
	Order int
	// Options are the filter's keys; they are accepted with any scheme.
	Options []Option
	// Enabled says whether spec s turns the filter on. If nil, the filter
	// is on when any of its options is set to a non-default value.
	Enabled func(s Spec) bool
	// Validate, if set, checks an enabled filter's options beyond their
	// kinds when a spec is parsed, so bad volumes are refused at
	// creation; Wrap must still check everything itself.
	Validate func(s Spec) error
	// Wrap returns inner wrapped by the filter; closing the result must
	// close inner. On error Wrap must leave inner open: Open closes it.
	Wrap func(ctx context.Context, s Spec, env Env, inner Device) (Device, error)
	// Forget, if set, removes the state an enabled filter keeps on this
	// machine for volume s (files in env's state directory), after the
	// volume was closed cleanly and is no longer attached here: the node
	// plugin calls it on detach, so that deleted volumes leave nothing on
	// the node.
	Forget func(env Env, s Spec) error
}

var registry struct {
	mu       sync.RWMutex
	backends map[string]*Backend
	filters  []*Filter // sorted by Order, then Name
}

// Register adds a backend. It panics on a malformed or duplicate
// registration: that is a programming error, caught when init runs.
func Register(b Backend) {
	if err := register(b); err != nil {
		panic("backends.Register: " + err.Error())
	}
}

func register(b Backend) error {
	if !validScheme(b.Scheme) {
		return fmt.Errorf("invalid scheme %q", b.Scheme)
	}
	if b.Open == nil {
		return fmt.Errorf("scheme %q: nil Open", b.Scheme)
	}
	b.Options = slices.Clone(b.Options)
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if _, dup := registry.backends[b.Scheme]; dup {
		return fmt.Errorf("scheme %q registered twice", b.Scheme)
	}
	seen := map[string]bool{}
	for _, o := range b.Options {
		if err := o.check(); err != nil {
			return fmt.Errorf("scheme %q: %w", b.Scheme, err)
		}
		if seen[o.Key] {
			return fmt.Errorf("scheme %q: option %q declared twice", b.Scheme, o.Key)
		}
		seen[o.Key] = true
		if f := filterOwning(o.Key); f != nil {
			return fmt.Errorf("scheme %q: option %q is filter %q's", b.Scheme, o.Key, f.Name)
		}
		if _, common := findOption(CommonOptions, o.Key); common {
			return fmt.Errorf("scheme %q: option %q is a common option", b.Scheme, o.Key)
		}
	}
	if registry.backends == nil {
		registry.backends = map[string]*Backend{}
	}
	registry.backends[b.Scheme] = &b
	return nil
}

// validScheme accepts a lower-case RFC 3986 scheme, as schemeOf returns
// them ("nbd+unix" included).
func validScheme(s string) bool {
	scheme, ok := schemeOf(s + ":")
	return ok && scheme == s
}

// RegisterFilter adds a filter. Its option keys must not clash with any
// backend's or filter's. It panics on a malformed or duplicate
// registration.
func RegisterFilter(f Filter) {
	if err := registerFilter(f); err != nil {
		panic("backends.RegisterFilter: " + err.Error())
	}
}

func registerFilter(f Filter) error {
	if !validKey(f.Name) {
		return fmt.Errorf("invalid filter name %q", f.Name)
	}
	if f.Wrap == nil {
		return fmt.Errorf("filter %q: nil Wrap", f.Name)
	}
	if f.Enabled == nil && len(f.Options) == 0 {
		return fmt.Errorf("filter %q: no options and no Enabled: it could never be on", f.Name)
	}
	f.Options = slices.Clone(f.Options)
	registry.mu.Lock()
	defer registry.mu.Unlock()
	for _, g := range registry.filters {
		if g.Name == f.Name {
			return fmt.Errorf("filter %q registered twice", f.Name)
		}
	}
	seen := map[string]bool{}
	for _, o := range f.Options {
		if err := o.check(); err != nil {
			return fmt.Errorf("filter %q: %w", f.Name, err)
		}
		if seen[o.Key] {
			return fmt.Errorf("filter %q: option %q declared twice", f.Name, o.Key)
		}
		seen[o.Key] = true
		if _, common := findOption(CommonOptions, o.Key); common {
			return fmt.Errorf("filter %q: option %q is a common option", f.Name, o.Key)
		}
		if g := filterOwning(o.Key); g != nil {
			return fmt.Errorf("filter %q: option %q is filter %q's", f.Name, o.Key, g.Name)
		}
		for _, b := range registry.backends {
			if _, ok := findOption(b.Options, o.Key); ok {
				return fmt.Errorf("filter %q: option %q is scheme %q's", f.Name, o.Key, b.Scheme)
			}
		}
	}
	registry.filters = append(registry.filters, &f)
	slices.SortStableFunc(registry.filters, func(a, b *Filter) int {
		return cmp.Or(cmp.Compare(a.Order, b.Order), cmp.Compare(a.Name, b.Name))
	})
	return nil
}

// filterOwning returns the filter declaring key; registry.mu must be held.
func filterOwning(key string) *Filter {
	for _, f := range registry.filters {
		if _, ok := findOption(f.Options, key); ok {
			return f
		}
	}
	return nil
}

func findOption(opts []Option, key string) (Option, bool) {
	for _, o := range opts {
		if o.Key == key {
			return o, true
		}
	}
	return Option{}, false
}

// lookupBackend returns the backend for a lower-case scheme.
func lookupBackend(scheme string) (*Backend, bool) {
	registry.mu.RLock()
	defer registry.mu.RUnlock()
	b, ok := registry.backends[scheme]
	return b, ok
}

// CommonOptions are accepted with every scheme and belong to no backend or
// filter.
var CommonOptions = []Option{{
	Key: "volume", Kind: OptString,
	Doc: "Names the volume when several share one origin (an http file, an nbd export): " +
		"it keeps their local state (cache, cow overlay, attach) apart. It does not change the data path.",
}}

// lookupOption finds key among b's options (b may be nil), the filters'
// and the common ones.
func lookupOption(b *Backend, key string) (Option, bool) {
	if o, ok := findOption(CommonOptions, key); ok {
		return o, true
	}
	if b != nil {
		if o, ok := findOption(b.Options, key); ok {
			return o, true
		}
	}
	registry.mu.RLock()
	defer registry.mu.RUnlock()
	if f := filterOwning(key); f != nil {
		return findOption(f.Options, key)
	}
	return Option{}, false
}

// knownKeys lists the keys valid with backend b, sorted.
func knownKeys(b *Backend) []string {
	var keys []string
	for _, o := range CommonOptions {
		keys = append(keys, o.Key)
	}
	for _, o := range b.Options {
		keys = append(keys, o.Key)
	}
	registry.mu.RLock()
	for _, f := range registry.filters {
		for _, o := range f.Options {
			keys = append(keys, o.Key)
		}
	}
	registry.mu.RUnlock()
	slices.Sort(keys)
	return keys
}

// filters returns the registered filters in stacking order.
func filters() []*Filter {
	registry.mu.RLock()
	defer registry.mu.RUnlock()
	return slices.Clone(registry.filters)
}

// Schemes lists the registered backend schemes, sorted.
func Schemes() []string {
	registry.mu.RLock()
	defer registry.mu.RUnlock()
	s := make([]string, 0, len(registry.backends))
	for k := range registry.backends {
		s = append(s, k)
	}
	slices.Sort(s)
	return s
}

// LookupBackend returns the backend registered for scheme (for help
// output and documentation).
func LookupBackend(scheme string) (Backend, bool) {
	b, ok := lookupBackend(scheme)
	if !ok {
		return Backend{}, false
	}
	return *b, true
}

// Filters returns the registered filters in stacking order.
func Filters() []Filter {
	fs := filters()
	out := make([]Filter, len(fs))
	for i, f := range fs {
		out[i] = *f
	}
	return out
}

// Open opens the volume s names: the backend for its scheme, wrapped by
// every filter s enables, innermost (lowest Order) first. If a filter
// fails, everything opened so far is closed again.
func Open(ctx context.Context, s Spec, env Env) (Device, error) {
	// Re-check the options so a hand-built Spec gets the same validation
	// as a parsed one (the URL itself is the backend's to check).
	s, b, err := normalize(s)
	if err != nil {
		return nil, err
	}
	dev, err := b.Open(ctx, s, env)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", quote(s.Redacted()), err)
	}
	for _, f := range filters() {
		if !f.On(s) {
			continue
		}
		w, err := f.Wrap(ctx, s, env, dev)
		if err != nil {
			err = fmt.Errorf("open %s: filter %s: %w", quote(s.Redacted()), f.Name, err)
			return nil, errors.Join(err, dev.Close())
		}
		dev = w
	}
	return dev, nil
}

// On reports whether spec s turns the filter on: by Enabled, or else by
// naming any of its options.
func (f *Filter) On(s Spec) bool {
	if f.Enabled != nil {
		return f.Enabled(s)
	}
	for _, o := range f.Options {
		if _, ok := s.Options[o.Key]; ok {
			return true
		}
	}
	return false
}
