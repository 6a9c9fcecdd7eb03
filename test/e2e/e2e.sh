#!/usr/bin/env bash
# End to end in a real single-node Kubernetes built on this machine:
# helm install → PVCs (memory, s3 on a versitygw process) → pods write and
# read → Multi-Attach refused → expansion → a VolumeAttributesClass change
# measured in the pod → the node plugin SIGKILLed under a writer → PVC
# deletion empties the bucket → helm uninstall leaves nothing behind.
#
#   test/e2e/e2e.sh            run it all, print a table of steps and times
#   E2E_KEEP=1 test/e2e/e2e.sh leave the cluster up afterwards (KUBECONFIG
#                              is printed); test/e2e/e2e.sh down stops it
#   E2E_S3_CACHE=off ...       the s3 class without the node-local writeback
#                              cache (the driver's default for s3): the
#                              restarted plugin must refuse to serve the
#                              volume (its writes may be lost), so the kill
#                              step fails with the pod's I/O error
#
# Needs root, containerd, runc, CNI plugins, iptables, debootstrap (.ci/run
# installs them through hack/deps.sh). The first run builds the cluster
# binaries (~20 CPU-minutes), the sidecars and a Debian base image and
# caches them under /var/cache/csi-nbd; later runs take a few minutes.
# The host has no nbd driver: volumes attach through the FUSE+loop fallback.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
export PATH=$PATH:/usr/local/go/bin:${TOOLS_CACHE:-/var/cache/csi-nbd/tools}/bin
E2E_DIR=${E2E_DIR:-/var/tmp/csi-nbd-e2e}
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-nbd/e2e}
CONTAINERD_SOCK=/run/csi-nbd-e2e/containerd.sock
NS=csi-nbd    # the release
APP=e2e       # the workloads
mkdir -p "$E2E_CACHE"
KUBE_BIN=${KUBE_CACHE:-/var/cache/csi-nbd/kube}/${K8S_VERSION:-v1.34.4}/bin

. "$REPO/test/e2e/cluster.sh"
. "$REPO/test/e2e/images.sh"

case "${1:-}" in
down)
  cluster_down
  exit 0
  ;;
cached) # exit 0 when everything the run needs is built already
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl; do
    [ -x "$KUBE_BIN/$b" ] || exit 1
  done
  "$REPO/test/e2e/build-sidecars.sh" --check && [ -s "$(rootfs_path)" ]
  exit
  ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "e2e: needs root (mounts, loop devices, containerd)" >&2; exit 1; }

fail() { echo "e2e: $*" >&2; return 1; }

# step NAME FUNC: runs FUNC in a subshell with errexit on (a function called
# from an `if` or `||` would run with errexit ignored: a failing command
# inside would go unnoticed), records its time and result for the table.
# Steps hand figures to the table with note; they keep state in files.
step() {
  local name=$1 t0 rc
  shift
  echo "== $name"
  t0=$(date +%s.%N)
  set +e
  (
    set -e
    "$@"
  )
  rc=$?
  set -e
  printf '%-58s %8.1fs  %s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)" \
    "$([ $rc -eq 0 ] && echo ok || echo FAILED)" >>"$E2E_DIR/table"
  if [ $rc -ne 0 ]; then
    diagnose
    exit 1
  fi
}

table() {
  [ -f "$E2E_DIR/table" ] || return 0
  echo
  printf '%-58s %9s  %s\n' step time result
  cat "$E2E_DIR/table"
  [ ! -s "$E2E_DIR/notes" ] || { echo; cat "$E2E_DIR/notes"; }
}
note() { echo "$*" >>"$E2E_DIR/notes"; echo "   $*"; }

diagnose() {
  echo "---- diagnostics" >&2
  kubectl get pods,pvc,pv,volumeattachments -A -o wide >&2 || true
  kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -40 >&2 || true
  # Stuck I/O: processes in D state and FUSE requests the server never took.
  ps -eo pid,stat,wchan:32,args | awk 'NR == 1 || $2 ~ /^D/' >&2 || true
  for c in /sys/fs/fuse/connections/*/waiting; do [ -e "$c" ] && echo "$c: $(cat "$c")" >&2; done
  for p in $(kubectl -n "$NS" get pods -o name 2>/dev/null); do
    for c in $(kubectl -n "$NS" get "$p" -o jsonpath='{.spec.containers[*].name}'); do
      echo "-- $p $c" >&2
      kubectl -n "$NS" logs "$p" -c "$c" --tail=40 >&2 || true
      kubectl -n "$NS" logs "$p" -c "$c" --previous --tail=40 >&2 2>/dev/null || true
    done
  done
}

cleanup() {
  local rc=$?
  table
  if [ "${E2E_KEEP:-}" = 1 ]; then
    echo "cluster left up: export KUBECONFIG=$E2E_DIR/admin.kubeconfig; stop it with $0 down"
  else
    cluster_down
  fi
  exit $rc
}

# ---- steps

build() {
  "$REPO/hack/kube-testenv.sh" cluster >/dev/null
  "$REPO/test/e2e/build-sidecars.sh" >/dev/null
  rootfs_tar >/dev/null
}

images() { build_images; }

S3_PORT=${S3_PORT:-7480}
S3_KEY=e2e-access
S3_SECRET=e2e-secret-key-0123456789
BUCKET=volumes
start_s3() {
  mkdir -p "$E2E_DIR/s3"
  # Recorded with the cluster's daemons: cluster_down stops it.
  start_bg versitygw versitygw --port "127.0.0.1:$S3_PORT" --access "$S3_KEY" --secret "$S3_SECRET" \
    --health /health posix "$E2E_DIR/s3"
  wait_for 30 versitygw curl -sf "http://127.0.0.1:$S3_PORT/health"
  python3 - "$S3_PORT" "$S3_KEY" "$S3_SECRET" "$BUCKET" <<'EOF'
import sys, boto3
port, key, secret, bucket = sys.argv[1:]
boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
             aws_secret_access_key=secret, region_name="us-east-1").create_bucket(Bucket=bucket)
EOF
}

bucket_objects() { # prints the number of objects in the bucket
  python3 - "$S3_PORT" "$S3_KEY" "$S3_SECRET" "$BUCKET" <<'EOF'
import sys, boto3
port, key, secret, bucket = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name="us-east-1")
print(sum(p.get("KeyCount", 0) for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)))
EOF
}

helm_install() {
  kubectl create namespace "$NS"
  kubectl -n "$NS" create secret generic s3-credentials \
    --from-literal=access-key-id="$S3_KEY" --from-literal=secret-access-key="$S3_SECRET"
  cat >"$E2E_DIR/values.yaml" <<EOF
# Images imported into containerd; no livenessprobe sidecar (not buildable
# here): the plugins serve /healthz themselves.
kubeletDir: $KUBELET_DIR
controller:
  stateVolume: {hostPath: {path: $E2E_ROOT/controller, type: DirectoryOrCreate}}
  # Reaches the S3 gateway on the node's loopback.
  hostNetwork: true
  livenessProbe: {sidecar: false}
node:
  stateDir: $E2E_ROOT/node
  livenessProbe: {sidecar: false}
  logLevel: 4
storageClasses:
  - name: nbd-s3
    backend: s3
    volumeBindingMode: Immediate
    parameters:
      bucket: $BUCKET
      endpoint: http://127.0.0.1:$S3_PORT
      pathStyle: "true"
      region: us-east-1
      fsType: xfs${E2E_S3_CACHE:+
      cache: '$E2E_S3_CACHE'}
    secretRef: {name: s3-credentials, namespace: $NS}
EOF
  helm install csi-nbd "$REPO/charts/csi-nbd" -n "$NS" --wait --timeout 3m \
    -f "$REPO/deploy/helm/memory.yaml" -f "$REPO/deploy/helm/local-images.yaml" -f "$E2E_DIR/values.yaml"
  # The node plugin registers with the kubelet itself and is Ready only
  # once the kubelet accepted it, so --wait covered the registration (the
  # kubelet writes CSINode just before it tells the plugin).
  wait_for 5 "the node plugin's registration in CSINode" \
    bash -c "kubectl get csinode '$NODE_NAME' -o jsonpath='{.spec.drivers[*].name}' | grep -qw csi-nbd.io"
  kubectl create namespace "$APP"
}

# pvc NAME CLASS SIZE
pvc() {
  kubectl -n "$APP" apply -f - <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  storageClassName: $2
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $3}}
EOF
}

# pod NAME PVC NODE SCRIPT [READY_FILE]: a pod of the csi-nbd image (it has
# bash, coreutils, dd) running SCRIPT with the volume on /data, scheduled to
# NODE (by the scheduler, which WaitForFirstConsumer volumes need; NODE!
# binds it there directly). With READY_FILE, the pod is Ready once the
# script has created that file.
pod() {
  local probe="" place="nodeSelector: {kubernetes.io/hostname: $3}"
  [ -n "${5:-}" ] && probe="readinessProbe: {exec: {command: [test, -e, $5]}, periodSeconds: 1}"
  [ "${3%!}" != "$3" ] && place="nodeName: ${3%!}"
  kubectl -n "$APP" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $1}
spec:
  $place
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: localhost/csi-nbd:dev
      imagePullPolicy: Never
      command: [/bin/bash, -ec, $(printf '%s' "$4" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
      volumeMounts: [{name: data, mountPath: /data}]
      $probe
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $2}
EOF
}

wait_phase() { # pod phase seconds
  local end=$((SECONDS + $3)) phase
  while :; do
    phase=$(kubectl -n "$APP" get pod "$1" -o jsonpath='{.status.phase}')
    [ "$phase" = "$2" ] && return 0
    if [ "$phase" = Failed ] || [ $SECONDS -ge $end ]; then
      kubectl -n "$APP" logs "$1" >&2 || true
      fail "pod $1 is $phase, not $2"
      return 1
    fi
    sleep 1
  done
}

# Writes 16 MiB of random data with O_DIRECT, reads it back from the device
# (O_DIRECT again, not the page cache), compares checksums.
WRITE_VERIFY='head -c 16M /dev/urandom > /tmp/src
dd if=/tmp/src of=/data/blob bs=1M oflag=direct conv=fsync status=none
sha256sum < /tmp/src | cut -d" " -f1 > /data/blob.sha256
sync
test "$(dd if=/data/blob bs=1M iflag=direct status=none | sha256sum | cut -d" " -f1)" = "$(cat /data/blob.sha256)"
echo verified'

memory_volume() {
  pvc mem nbd 256Mi
  pod mem-writer mem "$NODE_NAME" "$WRITE_VERIFY"
  wait_phase mem-writer Succeeded 180
  kubectl -n "$APP" delete pod mem-writer --wait
  kubectl -n "$APP" delete pvc mem --wait
}

s3_first_pod() {
  pvc vol nbd-s3 1Gi
  kubectl -n "$APP" wait --for=jsonpath='{.status.phase}'=Bound pvc/vol --timeout=120s
  pod s3-writer vol "$NODE_NAME" "$WRITE_VERIFY"
  wait_phase s3-writer Succeeded 180
  kubectl -n "$APP" delete pod s3-writer --wait
}

# The second pod checks the first one's data, then stays (Ready) holding
# the volume for the next steps.
s3_second_pod() {
  pod s3-reader vol "$NODE_NAME" 'test "$(dd if=/data/blob bs=1M iflag=direct status=none | sha256sum | cut -d" " -f1)" = "$(cat /data/blob.sha256)"
touch /tmp/ready
exec sleep 3600' /tmp/ready
  kubectl -n "$APP" wait --for=condition=Ready pod/s3-reader --timeout=180s
}

multi_attach() {
  # A second Node object, registered without a kubelet.
  kubectl apply -f - <<EOF
apiVersion: v1
kind: Node
metadata:
  name: e2e-node-2
  labels: {kubernetes.io/hostname: e2e-node-2}
  # What a kubelet sets: the attach/detach controller handles its volumes.
  annotations: {volumes.kubernetes.io/controller-managed-attach-detach: "true"}
EOF
  # The scheduler would not place a pod on a node that never became Ready.
  pod intruder vol 'e2e-node-2!' 'exit 0'
  local end=$((SECONDS + 120))
  until kubectl -n "$APP" get events --field-selector involvedObject.name=intruder,reason=FailedAttachVolume \
    -o jsonpath='{.items[*].message}' | grep -q 'Multi-Attach error'; do
    [ $SECONDS -lt $end ] || { fail "no Multi-Attach error event for pod intruder"; return 1; }
    sleep 1
  done
  note "Multi-Attach: $(kubectl -n "$APP" get events --field-selector involvedObject.name=intruder,reason=FailedAttachVolume -o jsonpath='{.items[0].message}')"
  # Nothing was attached to the second node.
  if kubectl get volumeattachments -o jsonpath='{.items[*].spec.nodeName}' | grep -q e2e-node-2; then
    fail "a VolumeAttachment for e2e-node-2 exists"
    return 1
  fi
  # No kubelet will confirm that pod's end: remove it by force.
  kubectl -n "$APP" delete pod intruder --grace-period=0 --force
  kubectl delete node e2e-node-2
}

expand() {
  local before after
  before=$(kubectl -n "$APP" exec s3-reader -- df -B1 --output=size /data | tail -1)
  kubectl -n "$APP" patch pvc vol -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}'
  kubectl -n "$APP" wait --for=jsonpath='{.status.capacity.storage}'=2Gi pvc/vol --timeout=120s
  local end=$((SECONDS + 60))
  while :; do
    after=$(kubectl -n "$APP" exec s3-reader -- df -B1 --output=size /data | tail -1)
    [ "$after" -gt $((before + (800 << 20))) ] && break
    [ $SECONDS -lt $end ] || { fail "the file system did not grow: $before → $after bytes"; return 1; }
    sleep 1
  done
  note "expansion: file system $((before >> 20)) MiB → $((after >> 20)) MiB, online, in the running pod"
}

# write_rate MiB: O_DIRECT sequential write speed in the pod, bytes/s.
write_rate() {
  kubectl -n "$APP" exec s3-reader -- bash -c \
    "dd if=/dev/zero of=/data/rate bs=1M count=$1 oflag=direct conv=fsync 2>&1 | awk '/copied/{print \$(NF-1), \$NF}'" |
    awk '{v=$1; u=$2; m=(u ~ /^kB/)?1e3:(u ~ /^MB/)?1e6:(u ~ /^GB/)?1e9:1; printf "%d\n", v*m}'
}

rate_change() {
  local before after limit=$((10 << 20))
  before=$(write_rate 128)
  kubectl -n "$APP" patch pvc vol -p '{"spec":{"volumeAttributesClassName":"nbd-throttled"}}'
  kubectl -n "$APP" wait --for=jsonpath='{.status.currentVolumeAttributesClassName}'=nbd-throttled pvc/vol --timeout=120s
  after=$(write_rate 40)
  note "$(printf 'VolumeAttributesClass nbd-throttled (writeBytesPerSecond 10Mi): write %.1f MiB/s before, %.2f MiB/s after (%.1f%% of the limit)' \
    "$(echo "$before / 1048576" | bc -l)" "$(echo "$after / 1048576" | bc -l)" "$(echo "100 * $after / $limit" | bc -l)")"
  # The limit holds (a burst allowance may lift a short run a little); and
  # it is what slowed the volume down, not noise.
  [ "$after" -le $((limit * 13 / 10)) ] || { fail "write rate $after B/s is over the 10 MiB/s limit"; return 1; }
  [ "$after" -ge $((limit / 2)) ] || { fail "write rate $after B/s is far below the 10 MiB/s limit"; return 1; }
  kubectl -n "$APP" patch pvc vol -p '{"spec":{"volumeAttributesClassName":"nbd-unlimited"}}'
  kubectl -n "$APP" wait --for=jsonpath='{.status.currentVolumeAttributesClassName}'=nbd-unlimited pvc/vol --timeout=120s
}

node_pod() { kubectl -n "$NS" get pods -l app.kubernetes.io/component=node -o jsonpath='{.items[0].metadata.name}'; }
node_restarts() { kubectl -n "$NS" get pod "$(node_pod)" -o jsonpath='{.status.containerStatuses[?(@.name=="csi-nbd")].restartCount}'; }

# A writer writes 1 MiB files with O_DIRECT, fsyncs each 50 ms later and
# records its checksum, for 40 s; the node plugin is SIGKILLed under it;
# then every file is read back with O_DIRECT. Any I/O error fails the pod
# (bash -e), and so does any file that differs (a write lost).
kill_node_plugin() {
  kubectl -n "$APP" delete pod s3-reader --wait
  pod survivor vol "$NODE_NAME" 'end=$((SECONDS + 40)); i=0
touch /tmp/ready
while [ $SECONDS -lt $end ]; do
  head -c 1M /dev/urandom > /tmp/f
  dd if=/tmp/f of=/data/f$i bs=1M oflag=direct status=none
  # Acknowledged but not yet flushed for a while, as applications do:
  # a SIGKILL here must not lose the write.
  sleep 0.05
  sync /data/f$i
  echo "$(sha256sum < /tmp/f | cut -d" " -f1) f$i" >> /tmp/sums
  i=$((i + 1))
done
sync
bad=0
while read -r sum f; do
  got=$(dd if=/data/$f bs=1M iflag=direct status=none | sha256sum | cut -d" " -f1)
  [ "$got" = "$sum" ] || { echo "$f: checksum $got, wrote $sum"; bad=$((bad + 1)); }
done < /tmp/sums
[ $bad -eq 0 ] || { echo "$bad of $i files differ"; exit 1; }
echo "verified $i files"' /tmp/ready
  kubectl -n "$APP" wait --for=condition=Ready pod/survivor --timeout=180s
  # Three kills, 5 s apart: each lands somewhere in the writer's cycle
  # (the kubelet's crash-loop back-off, 10 s then 20 s, holds the I/O meanwhile).
  local k restarts pid t0 times=""
  for k in 1 2 3; do
    sleep 5
    restarts=$(node_restarts)
    pid=$(pgrep -f '^/usr/local/bin/csi-nbd node ' | head -1)
    [ -n "$pid" ] || { fail "no csi-nbd node process"; return 1; }
    t0=$(date +%s.%N)
    kill -9 "$pid"
    local end=$((SECONDS + 120))
    until [ "$(node_restarts)" -gt "$restarts" ] &&
      kubectl -n "$NS" wait --for=condition=Ready "pod/$(node_pod)" --timeout=1s >/dev/null 2>&1; do
      [ $SECONDS -lt $end ] || { fail "the node plugin did not come back"; return 1; }
      sleep 0.5
    done
    times+="${times:+, }$(printf '%.1f s' "$(echo "$(date +%s.%N) - $t0" | bc)")"
  done
  note "node plugin SIGKILLed 3 times under a writer: restarted and Ready again in $times (kubelet back-off included)"
  wait_phase survivor Succeeded 180
  note "writer through the restarts: $(kubectl -n "$APP" logs survivor | tail -1), no I/O error"
  kubectl -n "$APP" delete pod survivor --wait
}

delete_pvc() {
  local pv n
  pv=$(kubectl -n "$APP" get pvc vol -o jsonpath='{.spec.volumeName}')
  n=$(bucket_objects)
  [ "$n" -gt 0 ] || { fail "the bucket is empty before deletion"; return 1; }
  kubectl -n "$APP" delete pods --all --wait
  kubectl -n "$APP" delete pvc vol --wait --timeout=120s
  kubectl wait --for=delete "pv/$pv" --timeout=120s 2>/dev/null || true
  n=$(bucket_objects)
  [ "$n" -eq 0 ] || { fail "$n objects left in the bucket after the PVC was deleted"; return 1; }
  note "s3 volume deleted: the bucket went from objects to 0"
}

helm_uninstall() {
  kubectl delete namespace "$APP" --wait
  helm uninstall csi-nbd -n "$NS" --wait --timeout 2m
  kubectl -n "$NS" wait --for=delete pod -l app.kubernetes.io/instance=csi-nbd --timeout=120s 2>/dev/null || true
  local left
  left=$(kubectl get all,csidriver,storageclass,volumeattributesclass,clusterrole,clusterrolebinding,role,rolebinding,serviceaccount,csinode \
    -A -l app.kubernetes.io/instance=csi-nbd -o name 2>/dev/null)
  left+=$(kubectl get csidriver,storageclass,volumeattributesclass -o name | grep -E 'csi-nbd|/nbd' || true)
  left+=$(kubectl get pv,volumeattachments -o name)
  # The node plugin's state dir stays (a hostPath), but nothing of a
  # volume: no attach record, cache or overlay.
  left+=$(find "$E2E_ROOT/node" -mindepth 2 \( -path '*/attach/volumes/*' -o -path '*/cache/*' -o -path '*/cow/*' \) 2>/dev/null || true)
  left+=$(grep " $E2E_ROOT/" /proc/mounts || true)
  left+=$(losetup -l -n -O NAME,BACK-FILE 2>/dev/null | grep "$E2E_ROOT/" || true)
  [ -z "$left" ] || { fail "left behind: $left"; return 1; }
}

trap cleanup EXIT
cluster_down
rm -rf "$E2E_DIR" && mkdir -p "$E2E_DIR"
export PATH=$KUBE_BIN:$PATH KUBECONFIG=$E2E_DIR/admin.kubeconfig
step "build or reuse cached binaries, sidecars, base image" build
step "cluster up (etcd, apiserver, kcm, scheduler, kubelet)" cluster_up
step "images built and imported into containerd" images
step "versitygw S3 gateway on 127.0.0.1" start_s3
step "helm install (local images) --wait" helm_install
step "memory PVC: pod writes 16 MiB, reads it back" memory_volume
step "s3 PVC bound; pod 1 writes and verifies" s3_first_pod
step "s3: pod 2 reads pod 1's data" s3_second_pod
step "RWO volume on a second node: Multi-Attach error" multi_attach
step "expand the s3 PVC 1Gi to 2Gi online" expand
step "VolumeAttributesClass change applied live" rate_change
step "node plugin SIGKILLed while a pod writes" kill_node_plugin
step "delete the PVC: its objects leave the bucket" delete_pvc
step "helm uninstall leaves nothing behind" helm_uninstall
