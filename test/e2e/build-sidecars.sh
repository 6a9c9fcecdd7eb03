#!/usr/bin/env bash
# Builds the CSI sidecars the chart runs (external-provisioner, -attacher,
# -resizer) from the Go module proxy into a per-version cache, once per
# machine, and prints the directory: $E2E_CACHE/sidecars/<name>-<version>.
# Their go.mod files carry replace directives, so `go install m@v` refuses
# them; a throwaway wrapper module requires each one and repeats its
# module-to-module replaces. The livenessprobe and node-driver-registrar are
# not on the proxy: the e2e chart values run without them (csi-nbd serves
# /healthz and registers with the kubelet itself).
#   test/e2e/build-sidecars.sh --check   exit 1 when one is not built yet
set -euo pipefail
export PATH=$PATH:/usr/local/go/bin
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-nbd/e2e}
out="$E2E_CACHE/sidecars"
mkdir -p "$out"

sidecars=(
  "csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 v6.4.0"
  "csi-attacher github.com/kubernetes-csi/external-attacher/v4 v4.13.0"
  "csi-resizer github.com/kubernetes-csi/external-resizer/v2 v2.3.0"
)

for s in "${sidecars[@]}"; do
  read -r name mod ver <<<"$s"
  bin="$out/$name-$ver"
  if [ "${1:-}" = --check ]; then
    [ -x "$bin" ] || exit 1
    continue
  fi
  # $out/NAME is the version this script pins.
  ln -sfn "$name-$ver" "$out/$name"
  [ -x "$bin" ] && continue
  echo "building $name $ver (once per machine)" >&2
  w=$(mktemp -d)
  gomod=$(GOFLAGS="" go mod download -json "$mod@$ver" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module csi-nbd.local/e2e-sidecar"
    grep -m1 '^go ' "$gomod"
    echo "require $mod $ver"
    # Single-line replaces and those inside a replace ( ... ) block, when
    # they point at a module version (not a local path).
    awk '/^replace \(/{b=1;next} b&&/^\)/{b=0;next}
         b{print "replace " $0; next}
         /^replace /{print}' "$gomod" | grep -E '=> [^ ./][^ ]* v[0-9]' || true
  } > "$w/go.mod"
  echo "package tools" > "$w/tools.go"
  (cd "$w" && GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$ver" \
     -o "$bin.tmp" "$mod/cmd/$name")
  mv "$bin.tmp" "$bin"
  rm -rf "$w"
done
echo "$out"
