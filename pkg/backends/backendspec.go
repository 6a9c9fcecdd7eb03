package backends

import "slices"

// BackendSpec is s without any filter's options: the identity of the data
// underneath. Filters that keep state on disk (the cache's blocks, the
// cow overlay) key their default directory by it, so retuning any filter
// finds the same directory again: dirty blocks left by a crash are written
// back and a persistent overlay is found instead of stranded. The common
// options (volume=) name the volume, so they stay.
func BackendSpec(s Spec) Spec {
	out := Spec{Options: map[string]string{}, URL: s.URL}
	b, _ := LookupBackend(s.Scheme())
	for _, o := range slices.Concat(CommonOptions, b.Options) {
		if v, ok := s.Options[o.Key]; ok {
			out.Options[o.Key] = v
		}
	}
	return out
}
