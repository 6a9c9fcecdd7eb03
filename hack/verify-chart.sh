#!/usr/bin/env bash
# Lints charts/csi-nbd with helm, strictly, with the default values and with
# every example values file in deploy/helm, renders each with the helm CLI
# as a user would, and validates the objects (and deploy/examples) with
# kubeconform against the Kubernetes API's own schemas, made offline from
# the k8s.io/kubernetes module's swagger.json by hack/kubeschemas. The Go
# test in test/helm checks what the objects say. helm and kubeconform come
# from hack/deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS_CACHE=${TOOLS_CACHE:-/var/cache/csi-nbd/tools}
export PATH=$TOOLS_CACHE/bin:$PATH:/usr/local/go/bin
for tool in helm kubeconform go; do
  if ! command -v $tool >/dev/null; then
    echo "$tool not found: run hack/deps.sh" >&2
    exit 1
  fi
done

chart=charts/csi-nbd
# A helm built with `go install` does not know which Kubernetes it was
# built against and assumes 1.20: name the version the chart targets.
kube_version=${KUBE_VERSION:-1.34.4}

# Schemas for the Kubernetes version the chart targets, made once.
schemas=$TOOLS_CACHE/kube-schemas/v$kube_version
if [ ! -e "$schemas/.done" ]; then
  echo "== kubeconform schemas for Kubernetes $kube_version (once per machine)"
  swagger=$(cd "${TMPDIR:-/tmp}" && go mod download -json "k8s.io/kubernetes@v$kube_version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')/api/openapi-spec/swagger.json
  rm -rf "$schemas"
  go run ./hack/kubeschemas -swagger "$swagger" -out "$schemas"
  touch "$schemas/.done"
fi
kubeconform=(kubeconform -strict -summary -schema-location "$schemas/{{ .ResourceKind }}{{ .KindSuffix }}.json"
  # Kinds whose CRDs come from other projects.
  -skip ServiceMonitor,VolumeSnapshotClass)

sets=("")
for f in deploy/helm/*.yaml; do sets+=("$f"); done
# local-images.yaml is an overlay for another values file.
sets+=("deploy/helm/memory.yaml deploy/helm/local-images.yaml")

for set in "${sets[@]}"; do
  args=()
  for f in $set; do args+=(-f "$f"); done
  echo "== helm lint ${set:-(defaults)}"
  helm lint --strict --quiet --kube-version "$kube_version" "$chart" "${args[@]}"
  helm template csi-nbd "$chart" --namespace csi-nbd --kube-version "$kube_version" "${args[@]}" |
    "${kubeconform[@]}" -
done
# Everything optional at once.
helm template csi-nbd "$chart" --namespace csi-nbd --kube-version "$kube_version" \
  --set metrics.enabled=true,metrics.serviceMonitor.enabled=true,volumeSnapshotClass.create=true,controller.replicas=2 |
  "${kubeconform[@]}" -

echo "== kubeconform deploy/examples"
"${kubeconform[@]}" deploy/examples
