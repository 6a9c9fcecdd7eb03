#!/usr/bin/env bash
# Builds Kubernetes binaries from the Go module proxy (no release downloads
# are possible here) into a per-version cache, once per machine:
#   $KUBE_CACHE/<k8s version>/bin/{etcd,kube-apiserver,...}
#   hack/kube-testenv.sh            etcd and kube-apiserver (the Go tests' API server)
#   hack/kube-testenv.sh cluster    also kube-controller-manager, kube-scheduler,
#                                   kubelet and kubectl (test/e2e's cluster)
# Tests that need a real API server look there (KUBE_TESTENV_BIN overrides).
# The first build costs ~15 CPU-minutes (etcd, apiserver) plus ~20 for the
# cluster's; later runs return at once.
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

want=(kube-apiserver)
if [ "${1:-}" = cluster ]; then
  want+=(kube-controller-manager kube-scheduler kubelet kubectl)
fi
missing=()
for b in "${want[@]}"; do
  [ -x "$out/$b" ] || missing+=("$b")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "building ${missing[*]} $K8S_VERSION (once per machine)" >&2
  w=$(mktemp -d)
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  replaces=()
  for m in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    replaces+=("replace $m => $m v0.$staging_minor")
  done
  build_wrapper "$w" k8s.io/kubernetes "$K8S_VERSION" "${replaces[@]}"
  pkgs=()
  for b in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  # One go build for all of them shares the compilation of common packages;
  # -o into a directory writes each command under its own name.
  (cd "$w" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$w/bin/" \
     -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${staging_minor%%.*}" \
     "${pkgs[@]}")
  mv "$w"/bin/* "$out/"
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
