package driver

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// jsonStore is a small map persisted as one JSON file, rewritten
// atomically (temp file, fsync, rename) on every change. The controller's
// volume and snapshot records are few and change rarely, so this is all
// the database it needs.
type jsonStore[T any] struct {
	mu   sync.Mutex
	path string
	m    map[string]T
}

func openJSONStore[T any](path string) (*jsonStore[T], error) {
	s := &jsonStore[T]{path: path, m: map[string]T{}}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return s, nil
	case err != nil:
		return nil, fmt.Errorf("state %s: %w", path, err)
	}
	if err := json.Unmarshal(b, &s.m); err != nil {
		return nil, fmt.Errorf("state %s: %w", path, err)
	}
	if s.m == nil {
		s.m = map[string]T{}
	}
	return s, nil
}

func (s *jsonStore[T]) get(k string) (T, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[k]
	return v, ok
}

// find returns the first record (in no particular order) for which match is true.
func (s *jsonStore[T]) find(match func(k string, v T) bool) (string, T, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, v := range s.m {
		if match(k, v) {
			return k, v, true
		}
	}
	var zero T
	return "", zero, false
}

func (s *jsonStore[T]) list() map[string]T {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]T, len(s.m))
	for k, v := range s.m {
		out[k] = v
	}
	return out
}

// update changes k's record under the lock and persists the result; fn
// returns the new value and whether to keep it (false deletes).
func (s *jsonStore[T]) update(k string, fn func(v T, ok bool) (T, bool, error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, had := s.m[k]
	v, keep, err := fn(old, had)
	if err != nil {
		return err
	}
	if keep {
		s.m[k] = v
	} else if had {
		delete(s.m, k)
	} else {
		return nil
	}
	if err := s.save(); err != nil {
		if had {
			s.m[k] = old
		} else {
			delete(s.m, k)
		}
		return err
	}
	return nil
}

// remove deletes k's record, if any, and persists the result.
func (s *jsonStore[T]) remove(k string) error {
	var zero T
	return s.update(k, func(T, bool) (T, bool, error) { return zero, false, nil })
}

func (s *jsonStore[T]) save() error {
	b, err := json.MarshalIndent(s.m, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(s.path), filepath.Base(s.path)+".tmp*")
	if err != nil {
		return fmt.Errorf("state %s: %w", s.path, err)
	}
	_, err = tmp.Write(b)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), s.path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("state %s: %w", s.path, err)
	}
	return nil
}

// volumeRecord is the controller's memory of a volume, keyed by name.
type volumeRecord struct {
	ID       string            `json:"id"`
	Capacity int64             `json:"capacity"`
	Params   map[string]string `json:"params"`
	Source   string            `json:"source,omitempty"` // snapshot or volume ID it was made from
	Context  map[string]string `json:"context"`
	Topology map[string]string `json:"topology,omitempty"`
	// Published maps node IDs to whether they hold the volume read-only.
	Published map[string]bool `json:"published,omitempty"`
}

type volumeStore = jsonStore[volumeRecord]

func openVolumeStore(path string) (*volumeStore, error) { return openJSONStore[volumeRecord](path) }

// snapshotRecord is a snapshot, keyed by name.
type snapshotRecord struct {
	ID       string    `json:"id"`
	SourceID string    `json:"sourceID"`
	Size     int64     `json:"size"`
	Created  time.Time `json:"created"`
}

type snapshotStore = jsonStore[snapshotRecord]

func openSnapshotStore(path string) (*snapshotStore, error) {
	return openJSONStore[snapshotRecord](path)
}
