#!/usr/bin/env bash
# Lints charts/csi-nbd with helm, strictly, with the default values and with
# every example values file in deploy/helm, and renders each with the helm
# CLI as a user would. The Go test in test/helm checks the objects
# themselves. helm comes from hack/deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=${TOOLS_CACHE:-/var/cache/csi-nbd/tools}/bin:$PATH
if ! command -v helm >/dev/null; then
  echo "helm not found: run hack/deps.sh" >&2
  exit 1
fi

chart=charts/csi-nbd
# A helm built with `go install` does not know which Kubernetes it was
# built against and assumes 1.20: name the version the chart targets.
kube_version=${KUBE_VERSION:-1.34.4}

sets=("")
for f in deploy/helm/*.yaml; do sets+=("$f"); done
# local-images.yaml is an overlay for another values file.
sets+=("deploy/helm/memory.yaml deploy/helm/local-images.yaml")

for set in "${sets[@]}"; do
  args=()
  for f in $set; do args+=(-f "$f"); done
  echo "== helm lint ${set:-(defaults)}"
  helm lint --strict --quiet --kube-version "$kube_version" "$chart" "${args[@]}"
  helm template csi-nbd "$chart" --namespace csi-nbd --kube-version "$kube_version" "${args[@]}" >/dev/null
done
