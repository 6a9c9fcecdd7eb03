package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

const swagger = `{"definitions": {
  "io.k8s.api.apps.v1.Deployment": {
    "type": "object",
    "properties": {"spec": {"$ref": "#/definitions/io.k8s.api.apps.v1.DeploymentSpec"}},
    "x-kubernetes-group-version-kind": [{"group": "apps", "kind": "Deployment", "version": "v1"}]
  },
  "io.k8s.api.apps.v1.DeploymentList": {
    "type": "object",
    "x-kubernetes-group-version-kind": [{"group": "apps", "kind": "DeploymentList", "version": "v1"}]
  },
  "io.k8s.api.apps.v1.DeploymentSpec": {
    "type": "object",
    "properties": {
      "port": {"$ref": "#/definitions/io.k8s.apimachinery.pkg.util.intstr.IntOrString"},
      "labels": {"type": "object", "additionalProperties": {"type": "string"}},
      "raw": {"type": "object", "properties": {"a": {"type": "string"}}, "x-kubernetes-preserve-unknown-fields": true}
    }
  },
  "io.k8s.apimachinery.pkg.util.intstr.IntOrString": {"type": "string", "format": "int-or-string"},
  "io.k8s.api.core.v1.Pod": {
    "type": "object", "properties": {"kind": {"type": "string"}},
    "x-kubernetes-group-version-kind": [{"group": "", "kind": "Pod", "version": "v1"}]
  },
  "io.k8s.api.storage.v1.CSIDriver": {
    "type": "object",
    "x-kubernetes-group-version-kind": [{"group": "storage.k8s.io", "kind": "CSIDriver", "version": "v1"}]
  }
}}`

func TestSchemas(t *testing.T) {
	dir := t.TempDir()
	in := filepath.Join(dir, "swagger.json")
	if err := os.WriteFile(in, []byte(swagger), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	n, err := run(in, out)
	if err != nil {
		t.Fatal(err)
	}
	// Lists are not validated on their own.
	names, _ := filepath.Glob(filepath.Join(out, "*.json"))
	if n != 3 || len(names) != 3 {
		t.Fatalf("%d schemas %v, want deployment, pod, csidriver", n, names)
	}
	for _, f := range []string{"deployment-apps-v1.json", "pod-v1.json", "csidriver-storage-v1.json"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Errorf("kubeconform looks for %s: %v", f, err)
		}
	}

	var dep struct {
		Ref         string                    `json:"$ref"`
		Definitions map[string]map[string]any `json:"definitions"`
	}
	b, err := os.ReadFile(filepath.Join(out, "deployment-apps-v1.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dep); err != nil {
		t.Fatal(err)
	}
	if dep.Ref != "#/definitions/io.k8s.api.apps.v1.Deployment" {
		t.Errorf("$ref %q", dep.Ref)
	}
	if len(dep.Definitions) != 3 {
		t.Errorf("definitions %v: want Deployment, its spec and IntOrString only", keys(dep.Definitions))
	}
	spec := dep.Definitions["io.k8s.api.apps.v1.DeploymentSpec"]
	if spec["additionalProperties"] != false {
		t.Error("an object with fixed properties accepts others")
	}
	props := spec["properties"].(map[string]any)
	if _, ok := props["labels"].(map[string]any)["additionalProperties"].(map[string]any); !ok {
		t.Error("a map's value schema was replaced")
	}
	if _, ok := props["raw"].(map[string]any)["additionalProperties"]; ok {
		t.Error("x-kubernetes-preserve-unknown-fields object made strict")
	}
	if _, ok := dep.Definitions["io.k8s.apimachinery.pkg.util.intstr.IntOrString"]["oneOf"]; !ok {
		t.Error("IntOrString accepts only strings")
	}
}

func keys(m map[string]map[string]any) []string { return sortedKeys(m) }
