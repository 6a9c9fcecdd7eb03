# Sourced by test/e2e/e2e.sh. Container images without Docker: a
# docker-archive tar (layer tars, a config and manifest.json, made with tar
# and sha256sum) imported with ctr; pods use them with imagePullPolicy: Never.

# rootfs_tar prints a cached tar of a Debian root file system with the
# packages the Dockerfile's runtime stage installs: debootstrap once per
# machine (about 40 s), keyed by the package list.
ROOTFS_PKGS="ca-certificates,e2fsprogs,xfsprogs,util-linux,mount,kmod,fuse3"
rootfs_path() { echo "$E2E_CACHE/rootfs-$(echo "bookworm minbase $ROOTFS_PKGS" | sha256sum | cut -c1-12).tar"; }
rootfs_tar() {
  local pkgs=$ROOTFS_PKGS tarball
  tarball=$(rootfs_path)
  if [ ! -s "$tarball" ]; then
    echo "debootstrap of the image's Debian (once per machine)" >&2
    local d
    d=$(mktemp -d "$E2E_CACHE/rootfs.XXXX")
    debootstrap --variant=minbase --include="$pkgs" bookworm "$d" http://deb.debian.org/debian >&2
    rm -rf "$d"/usr/share/{doc,man,info,locale} "$d"/var/cache/apt/* "$d"/var/lib/apt/lists/*
    tar -C "$d" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$d"
  fi
  echo "$tarball"
}

# make_image REF ENTRYPOINT_JSON OUT LAYER.tar... writes a docker-archive.
make_image() {
  local ref=$1 entry=$2 out=$3
  shift 3
  local d diffids="" layers="" i=0
  d=$(mktemp -d)
  for l in "$@"; do
    ln -s "$(readlink -f "$l")" "$d/layer$i.tar"
    diffids+="${diffids:+,}\"sha256:$(sha256sum <"$l" | cut -d' ' -f1)\""
    layers+="${layers:+,}\"layer$i.tar\""
    i=$((i + 1))
  done
  cat >"$d/config.json" <<EOC
{"architecture":"amd64","os":"linux","config":{"Entrypoint":$entry,"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},"rootfs":{"type":"layers","diff_ids":[$diffids]}}
EOC
  echo "[{\"Config\":\"config.json\",\"RepoTags\":[\"$ref\"],\"Layers\":[$layers]}]" >"$d/manifest.json"
  tar -C "$d" -chf "$out" manifest.json config.json $(cd "$d" && ls layer*.tar)
  rm -rf "$d"
}

# binary_layer OUT SRC DEST: a layer with one executable at DEST.
binary_layer() {
  local d
  d=$(mktemp -d)
  install -D -m 0755 "$2" "$d$3"
  mkdir -p "$d/tmp" && chmod 1777 "$d/tmp"
  tar -C "$d" --numeric-owner --owner=0 --group=0 -cf "$1" .
  rm -rf "$d"
}

# build_images builds csi-nbd (from this checkout), the pause image and the
# sidecars, and imports them all into containerd's k8s.io namespace.
build_images() {
  local work=$E2E_DIR/images
  rm -rf "$work" && mkdir -p "$work"
  local version
  version=$(git -C "$REPO" describe --tags --always --dirty 2>/dev/null || echo dev)
  (cd "$REPO" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$work/csi-nbd" ./cmd/csi-nbd)
  (cd "$REPO" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/pause" ./test/e2e/pause)

  local base
  base=$(rootfs_tar)
  binary_layer "$work/csi-nbd.layer" "$work/csi-nbd" /usr/local/bin/csi-nbd
  make_image localhost/csi-nbd:dev '["/usr/local/bin/csi-nbd"]' "$work/csi-nbd.tar" "$base" "$work/csi-nbd.layer"

  binary_layer "$work/pause.layer" "$work/pause" /pause
  make_image localhost/pause:dev '["/pause"]' "$work/pause.tar" "$work/pause.layer"

  local sidecars
  sidecars=$("$REPO/test/e2e/build-sidecars.sh")
  for s in csi-provisioner csi-attacher csi-resizer; do
    binary_layer "$work/$s.layer" "$sidecars/$s" "/$s"
    make_image "localhost/$s:dev" "[\"/$s\"]" "$work/$s.tar" "$work/$s.layer"
  done
  for t in "$work"/*.tar; do
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$t" >/dev/null
  done
}
