package backends_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

func TestReadSecretsDir(t *testing.T) {
	dir := t.TempDir()
	// The layout kubelet gives a mounted Secret: files behind ..data links.
	data := filepath.Join(dir, "..2026_11_25")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(data, "access-key-id"), []byte("AKIA\n"), 0o600)
	os.WriteFile(filepath.Join(data, "secret-access-key"), []byte("s3cr3t"), 0o600)
	os.Symlink("..2026_11_25", filepath.Join(dir, "..data"))
	os.Symlink("..data/access-key-id", filepath.Join(dir, "access-key-id"))
	os.Symlink("..data/secret-access-key", filepath.Join(dir, "secret-access-key"))
	got, err := backends.ReadSecretsDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got["access-key-id"] != "AKIA" || got["secret-access-key"] != "s3cr3t" {
		t.Errorf("ReadSecretsDir = %q", got)
	}
	if _, err := backends.ReadSecretsDir(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "secrets directory") {
		t.Errorf("missing dir error = %v", err)
	}
}

func TestEnvDirIsStablePerVolume(t *testing.T) {
	env := backends.Env{StateDir: t.TempDir()}
	a := mustParse(t, "size=1Mi;memory:a")
	b := mustParse(t, "size=1Mi;memory:b")
	da, err := env.Dir("cache", a)
	if err != nil {
		t.Fatal(err)
	}
	da2, _ := env.Dir("cache", mustParse(t, "size=1024Ki;memory:a"))
	db, _ := env.Dir("cache", b)
	if da != da2 || da == db || !strings.HasPrefix(filepath.Base(da), "memory-") {
		t.Errorf("dirs: %s %s %s", da, da2, db)
	}
	if st, err := os.Stat(da); err != nil || !st.IsDir() {
		t.Errorf("dir not created: %v", err)
	}
}
