#!/usr/bin/env bash
# Serves one file from a local nginx and reads it through two NBD servers
# side by side, in one run, with the same clients: `csi-nbd serve URL` (the
# http backend) and `nbdkit curl URL`. Prints each figure for both servers
# and the ratio csi-nbd/nbdkit (for latency, lower is better).
#
#   hack/bench-http-vs-nbdkit.sh              # http, https, https-h1; 3 rounds (medians)
#   ROUNDS=1 SCHEMES=https MIB=64 hack/bench-http-vs-nbdkit.sh
#
# Figures: nbdcopy sequential read to null: (1 and 4 connections) and fio's
# nbd engine 4k random read at depth 1 and 32 (one connection). Each round
# measures csi-nbd then nbdkit for one figure, so drift on a shared machine
# hits both alike. https uses a throwaway CA (openssl); csi-nbd speaks
# HTTP/2 to it, or HTTP/1.1 with https-h1 (spec option http2=false), while
# nbdkit 1.32's curl plugin uses one curl handle per NBD connection and
# serializes the requests on each.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SCHEMES=${SCHEMES:-"http https https-h1"}
MIB=${MIB:-256}            # object size in MiB
RUNTIME=${RUNTIME:-5}
for t in nginx nbdkit nbdcopy nbdinfo fio python3 openssl; do
  command -v "$t" >/dev/null || { echo "missing $t (run hack/deps.sh)" >&2; exit 1; }
done
[ -e /usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-curl-plugin.so ] || nbdkit curl --dump-plugin >/dev/null 2>&1 ||
  { echo "missing nbdkit's curl plugin" >&2; exit 1; }

. hack/lib-bench.sh   # $work and $pids, cleaned up on exit; median, ratio, table helpers

go build -o "$work/csi-nbd" ./cmd/csi-nbd
mkdir "$work/www"
head -c "${MIB}M" /dev/urandom > "$work/www/disk.img"

# A throwaway CA and a certificate for 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$work/srv.key" -out "$work/srv.csr" 2>/dev/null
openssl x509 -req -in "$work/srv.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial -days 1 \
  -extfile <(printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') -out "$work/srv.pem" 2>/dev/null

# nginx in the foreground with two workers, everything in $work (as root,
# the workers stay root: $work is private to us).
user=""
[ "$(id -u)" -eq 0 ] && user="user root;"
cat > "$work/nginx.conf" <<CONF
daemon off;
$user
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/body; proxy_temp_path $work/proxy; fastcgi_temp_path $work/fastcgi;
  uwsgi_temp_path $work/uwsgi; scgi_temp_path $work/scgi;
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:10930; root $work/www; }
  server {
    listen 127.0.0.1:10931 ssl http2; root $work/www;
    ssl_certificate $work/srv.pem; ssl_certificate_key $work/srv.key;
  }
}
CONF
nginx -p "$work" -e "$work/nginx-error.log" -c "$work/nginx.conf" &
pids+=($!)
for i in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/10930) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/10931) 2>/dev/null && break
  [ "$i" = 100 ] && { echo "nginx never came up" >&2; cat "$work/nginx-error.log" >&2; exit 1; }
  sleep 0.1
done

port=10940
declare -A csi_uri kit_uri
for s in $SCHEMES; do
  case $s in
    http) url=http://127.0.0.1:10930/disk.img; csi_spec=$url; kit_args=(url="$url") ;;
    https) url=https://127.0.0.1:10931/disk.img; csi_spec="ca=$work/ca.pem;$url"; kit_args=(url="$url" cainfo="$work/ca.pem") ;;
    https-h1) url=https://127.0.0.1:10931/disk.img; csi_spec="ca=$work/ca.pem,http2=false;$url"; kit_args=(url="$url" cainfo="$work/ca.pem") ;;
    *) echo "unknown scheme $s" >&2; exit 1 ;;
  esac
  "$work/csi-nbd" serve --listen "tcp://127.0.0.1:$port" "$csi_spec" >"$work/csi-$s.log" 2>&1 &
  pids+=($!)
  csi_uri[$s]=nbd://127.0.0.1:$port/
  nbdkit -f -r -i 127.0.0.1 -p $((port + 1)) curl "${kit_args[@]}" >"$work/kit-$s.log" 2>&1 &
  pids+=($!)
  kit_uri[$s]=nbd://127.0.0.1:$((port + 1))/
  port=$((port + 2))
done
for s in $SCHEMES; do
  for u in "${csi_uri[$s]}" "${kit_uri[$s]}"; do
    for i in $(seq 100); do
      nbdinfo --size "$u" >/dev/null 2>&1 && break
      [ "$i" = 100 ] && { echo "$u never came up" >&2; cat "$work"/*.log >&2; exit 1; }
      sleep 0.1
    done
  done
done

bytes=$(stat -c %s "$work/www/disk.img")
copy_rate() { # conns uri
  local start end
  start=$(date +%s.%N)
  nbdcopy --connections="$1" --threads="$1" "$2" null: || return 1
  end=$(date +%s.%N)
  python3 -c "print(round($bytes/($end-$start)/1e6, 1))"
}

# fio with the nbd engine; prints "iops p50_us p99_us". fio prints junk on
# stdout with the nbd engine, so the JSON goes to a file.
fio_run() { # bs depth uri
  fio --name=b --ioengine=nbd --uri="$3" --rw=randread --bs="$1" --iodepth="$2" \
    --size="${MIB}M" --time_based --runtime="$RUNTIME" --ramp_time=1 --group_reporting \
    --output-format=json --output="$work/fio.json" >"$work/fio.err" 2>&1 || { cat "$work/fio.err" >&2; return 1; }
  python3 - "$work/fio.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["jobs"][0]["read"]
p = d["clat_ns"]["percentile"]
print(round(d["iops"]), round(p["50.000000"] / 1e3, 1), round(p["99.000000"] / 1e3, 1))
PY
}

table_header 46

for s in $SCHEMES; do
  for conns in 1 4; do
    c=(); k=()
    for _ in $(seq "$ROUNDS"); do
      c+=("$(copy_rate $conns "${csi_uri[$s]}")") || exit 1
      k+=("$(copy_rate $conns "${kit_uri[$s]}")") || exit 1
    done
    row "$s nbdcopy seq read ${MIB} MiB, $conns conn (MB/s)" "${c[@]}" -- "${k[@]}"
  done
  for depth in 1 32; do
    ci=(); ki=(); cp50=(); kp50=(); cp99=(); kp99=()
    for _ in $(seq "$ROUNDS"); do
      read -r i p50 p99 < <(fio_run 4k $depth "${csi_uri[$s]}"); ci+=("$i"); cp50+=("$p50"); cp99+=("$p99")
      read -r i p50 p99 < <(fio_run 4k $depth "${kit_uri[$s]}"); ki+=("$i"); kp50+=("$p50"); kp99+=("$p99")
    done
    row "$s fio randread 4k depth $depth (IOPS)" "${ci[@]}" -- "${ki[@]}"
    row "$s fio randread 4k depth $depth p50 (us)" "${cp50[@]}" -- "${kp50[@]}"
    row "$s fio randread 4k depth $depth p99 (us)" "${cp99[@]}" -- "${kp99[@]}"
  done
done
