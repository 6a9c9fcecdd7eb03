# syntax=docker/dockerfile:1
# csi-nbd: one static binary for the controller, the node plugin and the
# standalone NBD server, on a small Debian with the tools the node plugin
# runs (mkfs, blkid, resize2fs/xfs_growfs, mount, losetup, modprobe).
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t csi-nbd .

ARG GO_VERSION=1.26

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# go build fetches only the modules the binary needs (go.mod also lists
# test-only ones, such as helm); the cache mounts keep them between builds.
COPY . .
ARG VERSION=dev
ARG TARGETOS=linux
ARG TARGETARCH
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/csi-nbd ./cmd/csi-nbd

FROM debian:bookworm-slim
# e2fsprogs, xfsprogs: mkfs, fsck and online growth of ext4 and xfs.
# util-linux: mount, blkid, blockdev, losetup (FUSE+loop fallback).
# kmod: modprobe nbd. fuse3: fusermount3 and /etc/fuse.conf for the fallback.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates e2fsprogs xfsprogs util-linux mount kmod fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/csi-nbd /usr/local/bin/csi-nbd
ARG VERSION=dev
LABEL org.opencontainers.image.title="csi-nbd" \
      org.opencontainers.image.description="Kubernetes CSI driver serving volumes over NBD" \
      org.opencontainers.image.source="https://github.com/csi-nbd/csi-nbd" \
      org.opencontainers.image.version="${VERSION}"
ENTRYPOINT ["/usr/local/bin/csi-nbd"]
