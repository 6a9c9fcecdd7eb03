package nbd

import (
	"encoding/json"
	"testing"
)

func TestNbdinfoJSON(t *testing.T) {
	dev := newTestDevice(16 << 20)
	s := startServer(t, staticExports{"": {Device: dev, Description: "test volume"}})
	out := run(t, "nbdinfo", "--json", s.uri(""))
	var info struct {
		Exports []map[string]any `json:"exports"`
		Proto   string           `json:"protocol"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	t.Log(out)
	e := info.Exports[0]
	if e["export-size"].(float64) != 16<<20 {
		t.Errorf("size %v", e["export-size"])
	}
}
