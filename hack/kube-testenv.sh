#!/usr/bin/env bash
# Builds etcd and kube-apiserver from the Go module proxy (no release
# downloads are possible here) into a per-version cache, once per machine:
#   $KUBE_CACHE/<k8s version>/bin/{etcd,kube-apiserver}
# Tests that need a real API server look there (KUBE_TESTENV_BIN overrides).
# It costs ~15 CPU-minutes the first time; later runs return at once.
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.8}
KUBE_CACHE=${KUBE_CACHE:-/var/cache/csi-nbd/kube}
out="$KUBE_CACHE/$K8S_VERSION/bin"
export PATH=$PATH:/usr/local/go/bin
mkdir -p "$out"

staging_minor=${K8S_VERSION#v1.}   # 34.4 → staging modules are v0.34.4

build_wrapper() { # dir module version [replace lines...]
  local dir=$1 mod=$2 ver=$3; shift 3
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<EOM
module csi-nbd.local/testenv
go 1.24.0
require $mod $ver
$(printf '%s\n' "$@")
EOM
  echo "package tools" > "$dir/tools.go"
}

if [ ! -x "$out/kube-apiserver" ]; then
  echo "building kube-apiserver $K8S_VERSION (once per machine)" >&2
  w=$(mktemp -d)
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  replaces=()
  for m in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    replaces+=("replace $m => $m v0.$staging_minor")
  done
  build_wrapper "$w" k8s.io/kubernetes "$K8S_VERSION" "${replaces[@]}"
  (cd "$w" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$out/kube-apiserver" \
     -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${staging_minor%%.*}" \
     k8s.io/kubernetes/cmd/kube-apiserver)
  rm -rf "$w"
fi

if [ ! -x "$out/etcd" ]; then
  echo "building etcd $ETCD_VERSION (once per machine)" >&2
  w=$(mktemp -d)
  build_wrapper "$w" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" \
    "replace go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $ETCD_VERSION" \
    "replace go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION" \
    "replace go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $ETCD_VERSION" \
    "replace go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $ETCD_VERSION"
  (cd "$w" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$out/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$w"
fi
echo "$out"
