# Sourced by test/e2e/e2e.sh: a single-node Kubernetes on this machine, all
# of it on 127.0.0.1 (recipe and traps: ../shared/notes/local-kubernetes.md).
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet
# driving containerd/runc, a bridge CNI for pods (their own network
# namespaces; nothing leaves the machine), no kube-proxy: two DNAT rules map
# the kubernetes Service to the API server. Everything it starts is recorded
# in $E2E_DIR/pids and stopped by cluster_down.

# The API server reaches the kubelet by the node's name (address type
# Hostname; the kubelet refuses a loopback node IP): the machine's host name
# when it resolves to loopback, as /etc/hosts usually has it.
if [ -z "${NODE_NAME:-}" ]; then
  NODE_NAME=$(hostname)
  getent ahostsv4 "$NODE_NAME" | grep -q '^127\.' || NODE_NAME=localhost
fi
API_PORT=${API_PORT:-6443}
ETCD_PORT=${ETCD_PORT:-2479}
SERVICE_IP=10.96.0.1
POD_CIDR=10.244.0.0/24
# Everything the node keeps (the kubelet's directory, the node plugin's and
# the controller's state) lives under one root that each run starts empty;
# a kubelet directory other than /var/lib/kubelet also exercises the
# chart's kubeletDir.
E2E_ROOT=${E2E_ROOT:-/var/lib/csi-nbd-e2e}
KUBELET_DIR=$E2E_ROOT/kubelet

start_bg() { # name cmd... : runs a daemon with its log in $E2E_DIR/logs
  local name=$1
  shift
  "$@" >"$E2E_DIR/logs/$name.log" 2>&1 &
  echo "$! $name" >>"$E2E_DIR/pids"
}

wait_for() { # seconds description cmd... : polls cmd until it succeeds
  local t=$1 what=$2
  shift 2
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      echo "timed out after ${t}s waiting for $what" >&2
      return 1
    fi
    sleep 0.5
  done
}

# certs makes a CA and every certificate with openssl (EC P-256: RSA key
# generation is slow on a loaded machine).
certs() {
  local d=$E2E_DIR/pki
  mkdir -p "$d"
  cd "$d" || return 1
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -subj /CN=e2e-ca -days 2 -out ca.crt 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out sa.key
  openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
  cert() { # name subject [sans]
    openssl ecparam -name prime256v1 -genkey -noout -out "$1.key"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
    local ext="basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth"
    [ -n "${3:-}" ] && ext+="
subjectAltName=$3"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile <(echo "$ext") -out "$1.crt" 2>/dev/null
  }
  cert apiserver /CN=kube-apiserver \
    "IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=e2e-admin"
  cert controller-manager /CN=system:kube-controller-manager
  cert scheduler /CN=system:kube-scheduler
  cert kubelet-client "/O=system:nodes/CN=system:node:$NODE_NAME"
  cert kubelet "/CN=$NODE_NAME" "IP:127.0.0.1,DNS:$NODE_NAME"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cd - >/dev/null || return 1
}

kubeconfig() { # name : a kubeconfig for the client certificate name
  local d=$E2E_DIR/pki
  cat >"$E2E_DIR/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: $d/ca.crt}
users:
- name: $1
  user: {client-certificate: $d/$1.crt, client-key: $d/$1.key}
contexts:
- name: e2e
  context: {cluster: e2e, user: $1}
current-context: e2e
EOF
}

containerd_config() {
  mkdir -p "$E2E_DIR/containerd" "$E2E_DIR/cni/net.d"
  cat >"$E2E_DIR/containerd/config.toml" <<EOF
version = 2
root = "$E2E_DIR/containerd/root"
state = "/run/csi-nbd-e2e/containerd"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:dev"
  # root here lacks CAP_SYS_RESOURCE: runc cannot raise oom_score_adj.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$E2E_DIR/cni/net.d"
EOF
  cat >"$E2E_DIR/cni/net.d/10-e2e.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "e2e", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
EOF
}

kubelet_config() {
  local d=$E2E_DIR/pki
  cat >"$E2E_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $d/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $d/kubelet.crt
tlsPrivateKeyFile: $d/kubelet.key
cgroupDriver: cgroupfs
# This machine: swap may be on, cgroup v1, no cluster DNS.
failSwapOn: false
failCgroupV1: false
resolvConf: ""
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
# A busy shared disk must not evict the test's pods.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
}

dnat() { # -A or -D : the kubernetes Service → the API server
  local op=$1
  iptables -t nat "$op" OUTPUT -d "$SERVICE_IP/32" -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$API_PORT" 2>/dev/null
  iptables -t nat "$op" PREROUTING -d "$SERVICE_IP/32" -p tcp --dport 443 -j DNAT --to-destination "127.0.0.1:$API_PORT" 2>/dev/null
}

# kubelet_chains_down removes the chains a kubelet makes in every table
# and leaves behind. KUBE-FIREWALL alone sends every loopback packet
# through conntrack: some 7% of a loopback TCP client's CPU in the
# benchmarks.
kubelet_chains_down() {
  local ipt t c
  for ipt in iptables ip6tables; do
    command -v "$ipt" >/dev/null || continue
    while "$ipt" -D INPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
    while "$ipt" -D OUTPUT -j KUBE-FIREWALL 2>/dev/null; do :; done
    for t in filter nat mangle; do
      for c in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        "$ipt" -t "$t" -F "$c" 2>/dev/null && "$ipt" -t "$t" -X "$c" 2>/dev/null
      done
    done
  done
  return 0
}

cluster_up() {
  rm -rf --one-file-system "$E2E_ROOT"
  mkdir -p "$E2E_DIR/logs" "$KUBELET_DIR"
  : >"$E2E_DIR/pids"
  certs
  for k in admin controller-manager scheduler kubelet-client; do kubeconfig "$k"; done
  export KUBECONFIG=$E2E_DIR/admin.kubeconfig
  local pki=$E2E_DIR/pki

  start_bg etcd "$KUBE_BIN/etcd" --data-dir "$E2E_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "default=http://127.0.0.1:$((ETCD_PORT + 1))" --unsafe-no-fsync
  start_bg kube-apiserver "$KUBE_BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --endpoint-reconciler-type=none --service-cluster-ip-range 10.96.0.0/16 \
    --client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --authorization-mode Node,RBAC --allow-privileged=true \
    --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types Hostname
  wait_for 90 "the API server" kubectl get --raw /readyz

  start_bg kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$E2E_DIR/controller-manager.kubeconfig" --authentication-kubeconfig "$E2E_DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$E2E_DIR/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller'
  start_bg kube-scheduler "$KUBE_BIN/kube-scheduler" --kubeconfig "$E2E_DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig "$E2E_DIR/scheduler.kubeconfig" --authorization-kubeconfig "$E2E_DIR/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false

  containerd_config
  mkdir -p /run/csi-nbd-e2e
  start_bg containerd containerd --config "$E2E_DIR/containerd/config.toml"
  wait_for 30 containerd ctr --address "$CONTAINERD_SOCK" version

  # What the node needs of the host, recorded so cluster_down can give
  # it back: two sysctls, and the chains a kubelet makes for itself
  # and never removes (if none were there before ours). A record left
  # by a run that never came down is the older truth: kept.
  [ -f "$E2E_DIR/host" ] || {
    echo "sysctl -qw net.ipv4.conf.all.route_localnet=$(sysctl -n net.ipv4.conf.all.route_localnet) net.ipv4.ip_forward=$(sysctl -n net.ipv4.ip_forward)"
    iptables -S KUBE-FIREWALL >/dev/null 2>&1 || echo kubelet_chains_down
  } >"$E2E_DIR/host"
  sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.ip_forward=1
  dnat -D || true
  dnat -A

  kubelet_config
  # The kubelet's root must be a shared mount: the node plugin's
  # Bidirectional mounts propagate through it.
  mount --make-rshared / 2>/dev/null || true
  start_bg kubelet "$KUBE_BIN/kubelet" --config "$E2E_DIR/kubelet.yaml" \
    --kubeconfig "$E2E_DIR/kubelet-client.kubeconfig" --hostname-override "$NODE_NAME" \
    --root-dir "$KUBELET_DIR" -v=2
  wait_for 120 "node $NODE_NAME Ready" \
    kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  # kube-controller-manager creates the default ServiceAccount per namespace.
  wait_for 60 "the default ServiceAccount" kubectl -n default get serviceaccount default
}

cluster_down() {
  [ -f "$E2E_DIR/pids" ] || return 0
  # Best effort throughout: whatever is already gone is fine.
  local -
  set +e
  local pid name
  # The kubelet first, so nothing restarts containers; then the containers.
  while read -r pid name; do
    [ "$name" = kubelet ] && kill "$pid" 2>/dev/null
  done <"$E2E_DIR/pids"
  sleep 1
  if [ -S "$CONTAINERD_SOCK" ]; then
    local ids
    ids=$(ctr --address "$CONTAINERD_SOCK" -n k8s.io tasks ls -q 2>/dev/null || true)
    for id in $ids; do ctr --address "$CONTAINERD_SOCK" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
  fi
  pkill -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $CONTAINERD_SOCK" 2>/dev/null || true
  tac "$E2E_DIR/pids" | while read -r pid name; do kill "$pid" 2>/dev/null || true; done
  sleep 2
  while read -r pid name; do kill -9 "$pid" 2>/dev/null || true; done <"$E2E_DIR/pids"
  # Mounts the kubelet and pods left (deepest first), their netns, the
  # Service rules and the bridge.
  grep -o " $E2E_ROOT/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  grep -o " /run/csi-nbd-e2e[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for ns in $(ip netns list 2>/dev/null | awk '/^cni-/{print $1}'); do ip netns delete "$ns" 2>/dev/null || true; done
  dnat -D || true
  ip link delete cni0 2>/dev/null || true
  # The host as it was (see cluster_up).
  if [ -f "$E2E_DIR/host" ]; then
    . "$E2E_DIR/host"
    rm -f "$E2E_DIR/host"
  fi
  rm -f "$E2E_DIR/pids"
}
