package attach

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// record is what survives a restart of the serving process: enough to
// re-open the volume's stack and find its device again. One JSON file per
// volume; its secrets sit beside it in a 0600 file so that the record can
// be read (csi-nbd detach, debugging) without exposing them.
type record struct {
	Version int     `json:"version"`
	ID      string  `json:"id"`
	Spec    string  `json:"spec"`
	Kind    string  `json:"kind"`  // KindNBD or KindFuseLoop
	Index   int     `json:"index"` // nbd device index; -1 until CONNECT answered
	Path    string  `json:"path,omitempty"`
	Backend string  `json:"backendIdentifier,omitempty"`
	Options Options `json:"options"`
	// PID is the process serving the volume, for `csi-nbd detach`.
	PID int `json:"pid,omitempty"`
	// FuseInit is the FUSE_INIT request of a FUSE+loop attachment, which
	// a successor replays to resume the connection (fuseloop.Resume).
	FuseInit []byte `json:"fuseInit,omitempty"`
	// HasSecrets says a secrets file exists for the volume.
	HasSecrets bool `json:"hasSecrets,omitempty"`
	// Closed says the last process that served the volume closed its
	// stack cleanly (everything flushed) before leaving it attached.
	Closed bool `json:"closed,omitempty"`
}

const recordVersion = 1

// store keeps records under dir/volumes.
type store struct{ dir string }

func newStore(stateDir string) (*store, error) {
	dir := filepath.Join(stateDir, "volumes")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("attach state directory: %w", err)
	}
	return &store{dir: dir}, nil
}

// fileKey names a volume's files: volume IDs are arbitrary strings.
func fileKey(id string) string {
	sum := sha256.Sum256([]byte(id))
	return "vol-" + hex.EncodeToString(sum[:16])
}

func (s *store) recordPath(id string) string  { return filepath.Join(s.dir, fileKey(id)+".json") }
func (s *store) secretsPath(id string) string { return filepath.Join(s.dir, fileKey(id)+".secrets") }

// writeAtomic replaces path with data: a reader (or a restart after a
// crash) sees the old file or the new one, never a torn one.
func writeAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	fail := func(err error) error {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return fail(err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync() // make the rename itself durable
		d.Close()
	}
	return nil
}

// save records a volume being served (so not Closed).
func (s *store) save(r record, secrets map[string]string) error {
	r.Version = recordVersion
	r.Closed = false
	r.HasSecrets = len(secrets) > 0
	if r.HasSecrets {
		b, err := json.Marshal(secrets)
		if err != nil {
			return fmt.Errorf("attach state: encode secrets: %w", err)
		}
		if err := writeAtomic(s.secretsPath(r.ID), b, 0o600); err != nil {
			return fmt.Errorf("attach state: write secrets of volume %q: %w", r.ID, err)
		}
	} else if err := os.Remove(s.secretsPath(r.ID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("attach state: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("attach state: encode record: %w", err)
	}
	if err := writeAtomic(s.recordPath(r.ID), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("attach state: write record of volume %q: %w", r.ID, err)
	}
	return nil
}

// markClosed records that the serving process closed the volume's stack
// cleanly and left it attached for a successor.
func (s *store) markClosed(id string) error {
	r, err := readRecord(s.recordPath(id))
	if err != nil {
		return err
	}
	r.Closed = true
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("attach state: encode record: %w", err)
	}
	return writeAtomic(s.recordPath(id), append(b, '\n'), 0o600)
}

func (s *store) remove(id string) error {
	var errs []error
	for _, p := range []string{s.recordPath(id), s.secretsPath(id)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("attach state: forget volume %q: %w", id, err)
	}
	return nil
}

func readRecord(path string) (record, error) {
	var r record
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("attach state %s: %w", path, err)
	}
	if r.Version != recordVersion {
		return r, fmt.Errorf("attach state %s: version %d, this binary reads %d", path, r.Version, recordVersion)
	}
	if r.ID == "" || r.Spec == "" {
		return r, fmt.Errorf("attach state %s: no volume ID or spec", path)
	}
	return r, nil
}

func (s *store) loadSecrets(id string) (map[string]string, error) {
	b, err := os.ReadFile(s.secretsPath(id))
	if err != nil {
		return nil, fmt.Errorf("attach state: secrets of volume %q: %w", id, err)
	}
	var m map[string]string
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("attach state: secrets of volume %q: %w", id, err)
	}
	return m, nil
}

// list returns every readable record, and errors for the unreadable ones.
func (s *store) list() ([]record, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("attach state: %w", err)
	}
	var (
		out  []record
		errs []error
	)
	for _, e := range ents {
		n := e.Name()
		if !strings.HasPrefix(n, "vol-") || !strings.HasSuffix(n, ".json") {
			continue
		}
		r, err := readRecord(filepath.Join(s.dir, n))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// FindByPath returns the ID and serving PID of the volume recorded under
// stateDir as attached at devicePath (for `csi-nbd detach DEVICE`).
func FindByPath(stateDir, devicePath string) (id string, pid int, err error) {
	s := &store{dir: filepath.Join(stateDir, "volumes")}
	recs, err := s.list()
	for _, r := range recs {
		if r.Path == devicePath {
			return r.ID, r.PID, nil
		}
	}
	if err != nil {
		return "", 0, err
	}
	return "", 0, fmt.Errorf("no volume recorded at %s in %s: %w", devicePath, stateDir, os.ErrNotExist)
}
