// Command kubeschemas writes kubeconform's standalone, strict JSON schemas
// (one file per kind, named kind-group-version.json) from a Kubernetes
// swagger.json, so that manifests can be validated with no network: the
// swagger comes from the k8s.io/kubernetes Go module (go mod download).
//
//	go run ./hack/kubeschemas -swagger .../api/openapi-spec/swagger.json -out DIR
//	kubeconform -strict -schema-location 'DIR/{{ .ResourceKind }}{{ .KindSuffix }}.json' ...
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

const refPrefix = "#/definitions/"

func main() {
	swagger := flag.String("swagger", "", "path to Kubernetes' api/openapi-spec/swagger.json")
	out := flag.String("out", "", "directory for the schemas")
	flag.Parse()
	if *swagger == "" || *out == "" {
		flag.Usage()
		os.Exit(2)
	}
	n, err := run(*swagger, *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubeschemas:", err)
		os.Exit(1)
	}
	fmt.Printf("%d schemas in %s\n", n, *out)
}

type gvk struct{ Group, Version, Kind string }

func run(swaggerPath, outDir string) (int, error) {
	b, err := os.ReadFile(swaggerPath)
	if err != nil {
		return 0, err
	}
	var doc struct {
		Definitions map[string]map[string]any `json:"definitions"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return 0, fmt.Errorf("%s: %w", swaggerPath, err)
	}
	if len(doc.Definitions) == 0 {
		return 0, fmt.Errorf("%s: no definitions", swaggerPath)
	}
	defs := doc.Definitions
	for name, d := range defs {
		defs[name] = fix(name, d)
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return 0, err
	}
	n := 0
	for _, name := range sortedKeys(defs) {
		d := defs[name]
		for _, k := range kinds(d) {
			if strings.HasSuffix(k.Kind, "List") || k.Kind == "Status" || k.Kind == "WatchEvent" || k.Kind == "DeleteOptions" {
				continue
			}
			closure := map[string]any{}
			collect(defs, name, closure)
			schema := map[string]any{
				"$schema":     "http://json-schema.org/draft-07/schema#",
				"$ref":        refPrefix + name,
				"definitions": closure,
			}
			js, err := json.Marshal(schema)
			if err != nil {
				return n, err
			}
			if err := os.WriteFile(filepath.Join(outDir, fileName(k)), js, 0o644); err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

// fileName is kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}.json.
func fileName(k gvk) string {
	suffix := "-" + k.Version
	if k.Group != "" {
		suffix = "-" + strings.Split(k.Group, ".")[0] + suffix
	}
	return strings.ToLower(k.Kind) + suffix + ".json"
}

func kinds(d map[string]any) []gvk {
	raw, _ := d["x-kubernetes-group-version-kind"].([]any)
	var out []gvk
	for _, r := range raw {
		m, _ := r.(map[string]any)
		g, _ := m["group"].(string)
		v, _ := m["version"].(string)
		k, _ := m["kind"].(string)
		if v != "" && k != "" {
			out = append(out, gvk{g, v, k})
		}
	}
	return out
}

// fix makes one swagger definition a JSON schema kubeconform checks the
// way the API server decodes: the apimachinery types that accept several
// JSON types say so, and objects with a fixed set of properties refuse
// others (strict mode).
func fix(name string, d map[string]any) map[string]any {
	switch name {
	case "io.k8s.apimachinery.pkg.util.intstr.IntOrString":
		return map[string]any{"oneOf": []any{map[string]any{"type": "string"}, map[string]any{"type": "integer"}}}
	case "io.k8s.apimachinery.pkg.api.resource.Quantity":
		return map[string]any{"oneOf": []any{map[string]any{"type": "string"}, map[string]any{"type": "number"}}}
	}
	strictObjects(d)
	return d
}

func strictObjects(v any) {
	switch s := v.(type) {
	case map[string]any:
		_, hasProps := s["properties"]
		_, hasAdd := s["additionalProperties"]
		_, preserve := s["x-kubernetes-preserve-unknown-fields"]
		if hasProps && !hasAdd && !preserve {
			s["additionalProperties"] = false
		}
		for _, c := range s {
			strictObjects(c)
		}
	case []any:
		for _, c := range s {
			strictObjects(c)
		}
	}
}

// collect adds name and every definition it references to into.
func collect(defs map[string]map[string]any, name string, into map[string]any) {
	if _, done := into[name]; done {
		return
	}
	d, ok := defs[name]
	if !ok {
		return
	}
	into[name] = d
	walkRefs(d, func(ref string) {
		if strings.HasPrefix(ref, refPrefix) {
			collect(defs, strings.TrimPrefix(ref, refPrefix), into)
		}
	})
}

func walkRefs(v any, fn func(string)) {
	switch s := v.(type) {
	case map[string]any:
		for k, c := range s {
			if r, ok := c.(string); ok && k == "$ref" {
				fn(r)
				continue
			}
			walkRefs(c, fn)
		}
	case []any:
		for _, c := range s {
			walkRefs(c, fn)
		}
	}
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
