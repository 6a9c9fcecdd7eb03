package backends

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Env is what a volume is opened with besides its spec: the things that
// must not be part of its name. Secrets never go in a spec (specs are
// logged and stored in cluster objects); local paths and the opener's
// identity differ from host to host while the volume stays the same.
type Env struct {
	// Secrets holds credential values by key, e.g. "access-key-id",
	// "secret-access-key", "session-token" for s3, or a header name for
	// http's header-secret. Backends read only the keys they document.
	// Values must never be logged or put in errors.
	Secrets map[string]string
	// StateDir is a directory for per-volume local files (cache blocks,
	// cow overlays) when an option does not name one. Empty means a
	// directory under os.TempDir().
	StateDir string
	// Owner identifies the opener (node ID, hostname) for leases that
	// keep a second writer off a volume.
	Owner string
}

// Secret returns the secret stored under key.
func (e Env) Secret(key string) (string, bool) {
	v, ok := e.Secrets[key]
	return v, ok
}

// Dir returns a directory under e.StateDir (or the temp dir) for the named
// component of volume s, creating it. The name is derived from the
// canonical spec so one volume always finds its own files again.
func (e Env) Dir(component string, s Spec) (string, error) {
	dir := e.dirPath(component, s)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("state directory: %w", err)
	}
	return dir, nil
}

func (e Env) dirPath(component string, s Spec) string {
	base := e.StateDir
	if base == "" {
		base = filepath.Join(os.TempDir(), "csi-nbd")
	}
	return filepath.Join(base, component, VolumeKey(s))
}

// VolumeKey is a file-name-safe, stable identifier of the volume s names
// (a hash of its canonical form, prefixed by its scheme for humans).
func VolumeKey(s Spec) string {
	return strings.ToLower(s.Scheme()) + "-" + specHash(s.String())
}

// ReadSecretsDir reads every regular file in dir as a secret keyed by its
// name (the layout of a mounted Kubernetes Secret); a trailing newline is
// dropped. Dot files (the Secret volume's ..data links) are skipped.
func ReadSecretsDir(dir string) (map[string]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("secrets directory: %w", err)
	}
	out := map[string]string{}
	for _, ent := range ents {
		name := ent.Name()
		if strings.HasPrefix(name, ".") {
			continue
		}
		p := filepath.Join(dir, name)
		st, err := os.Stat(p) // follows the Secret volume's symlinks
		if err != nil || !st.Mode().IsRegular() {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("secrets directory: %w", err)
		}
		out[name] = strings.TrimSuffix(string(b), "\n")
	}
	return out, nil
}

func specHash(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:12])
}
