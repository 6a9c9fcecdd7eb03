package attach

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestStoreRoundTripAndDamage(t *testing.T) {
	dir := t.TempDir()
	st, err := newStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	r := record{ID: "weird/id with spaces", Spec: "memory:", Kind: KindNBD, Index: 3, Path: "/dev/nbd3", Options: Options{Connections: 2}}
	if err := st.save(r, map[string]string{"k": "v"}); err != nil {
		t.Fatal(err)
	}
	// A damaged record is reported, the others still load.
	if err := os.WriteFile(filepath.Join(st.dir, "vol-broken.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	recs, err := st.list()
	if err == nil || len(recs) != 1 || recs[0].ID != r.ID || recs[0].Options.Connections != 2 || !recs[0].HasSecrets {
		t.Fatalf("list: %+v, %v", recs, err)
	}
	if s, err := st.loadSecrets(r.ID); err != nil || s["k"] != "v" {
		t.Fatalf("secrets: %v, %v", s, err)
	}
	// Saving without secrets removes the old secrets file.
	if err := st.save(r, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(st.secretsPath(r.ID)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("secrets file kept: %v", err)
	}
	if err := st.remove(r.ID); err != nil {
		t.Fatal(err)
	}
	if err := st.remove(r.ID); err != nil {
		t.Fatalf("second remove: %v", err)
	}
	// Not found, but a damaged record might have been it: say so.
	if _, _, err := FindByPath(dir, "/dev/nbd3"); err == nil || errors.Is(err, os.ErrNotExist) {
		t.Fatalf("FindByPath with a damaged record: %v", err)
	}
	os.Remove(filepath.Join(st.dir, "vol-broken.json"))
	if _, _, err := FindByPath(dir, "/dev/nbd3"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("FindByPath after remove: %v", err)
	}
	// No temporary files are left behind.
	if ents, _ := os.ReadDir(st.dir); len(ents) != 0 {
		t.Fatalf("left behind: %v", ents)
	}
}
