#!/usr/bin/env bash
# Installs what the tests need on Debian: the real NBD clients and servers
# the tests use as oracles and peers. Idempotent and quick when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# NBD peers and oracles; servers for the remote backends; what the attach
# tests and the VM image need (mkfs, losetup, fstrim, busybox).
apt_pkgs=(nbdkit libnbd-bin python3-libnbd qemu-utils qemu-system-x86 fio nbdkit-plugin-python python3-boto3
  nginx busybox-static e2fsprogs xfsprogs mount util-linux cpio nbd-client
  # test/e2e's single-node Kubernetes: node runtime, pod network, base image.
  containerd runc containernetworking-plugins iptables conntrack debootstrap bc curl)

missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v go >/dev/null; then
  if [ -x /usr/local/go/bin/go ]; then
    echo "go is at /usr/local/go/bin: add it to PATH" >&2
  else
    echo "Go >= 1.24 is required (Debian's golang-go is too old on bookworm)" >&2
  fi
  exit 1
fi

# Go programs the tests run as real peers, pinned, built once per machine
# into $TOOLS_CACHE (outside the checkout, so a clean clone reuses them).
# Tests find them on PATH: hack/test.sh adds $TOOLS_CACHE/bin.
TOOLS_CACHE=${TOOLS_CACHE:-/var/cache/csi-nbd/tools}
go_tools=(
  github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@v5.6.0
  helm.sh/helm/v3/cmd/helm@v3.22.0
  github.com/yannh/kubeconform/cmd/kubeconform@v0.8.0
  github.com/versity/versitygw/cmd/versitygw@v1.8.0
)
mkdir -p "$TOOLS_CACHE/bin"
for spec in "${go_tools[@]}"; do
  pkg=${spec%@*} ver=${spec##*@} name=$(basename "${spec%@*}")
  stamp="$TOOLS_CACHE/stamps/$name@$ver"
  if [ ! -e "$stamp" ] || [ ! -x "$TOOLS_CACHE/bin/$name" ]; then
    echo "building $name $ver (once per machine)"
    GOBIN="$TOOLS_CACHE/bin" go install "$pkg@$ver"
    mkdir -p "$TOOLS_CACHE/stamps" && touch "$stamp"
  fi
done

# qemu >= 8.2 as qemu-{img,io}-ext: the only client here that negotiates
# NBD extended headers (bookworm's qemu 7.2, libnbd 1.14 and nbdkit 1.32
# predate them). On bookworm it is bookworm-backports' qemu-utils, unpacked
# into $TOOLS_CACHE rather than installed, so the tests' other qemu stays
# the distribution's; its libraries are bookworm's, which qemu-utils
# already pulled in. Elsewhere the system qemu serves if it is new enough.
qemu_ext_ok() { # binary
  local v
  v=$("$1" --version 2>/dev/null | sed -n '1s/.*version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] && set -- $v && { [ "$1" -gt 8 ] || { [ "$1" -eq 8 ] && [ "$2" -ge 2 ]; }; }
}
if ! qemu_ext_ok "$TOOLS_CACHE/bin/qemu-io-ext"; then
  qdir=""
  if qemu_ext_ok qemu-io; then
    qdir=$(dirname "$(command -v qemu-io)")
  elif [ "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")" = bookworm ]; then
    echo "fetching qemu-utils from bookworm-backports (once per machine)"
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    chown _apt "$tmp" 2>/dev/null || true # apt downloads as its _apt user
    mkdir -p "$tmp/lists/partial"
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$tmp/sources.list"
    apt_opts=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$tmp/lists")
    apt-get "${apt_opts[@]}" update -q >/dev/null
    (cd "$tmp" && apt-get "${apt_opts[@]}" download -q qemu-utils/bookworm-backports >/dev/null)
    rm -rf "$TOOLS_CACHE/qemu-ext"
    dpkg -x "$tmp"/qemu-utils_*.deb "$TOOLS_CACHE/qemu-ext"
    rm -rf "$tmp"
    qdir=$TOOLS_CACHE/qemu-ext/usr/bin
  fi
  if [ -z "$qdir" ] || ! qemu_ext_ok "$qdir/qemu-io"; then
    echo "no qemu >= 8.2 for the extended-header tests" >&2
    exit 1
  fi
  for b in qemu-img qemu-io; do ln -sf "$qdir/$b" "$TOOLS_CACHE/bin/$b-ext"; done
fi

# etcd and kube-apiserver for the tests that need a real API server (test/helm).
hack/kube-testenv.sh >/dev/null
