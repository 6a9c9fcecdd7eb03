#!/usr/bin/env bash
# csi-nbd's cache and cow filters side by side with nbdkit's, in one run,
# with the same client (fio's nbd engine, 4k requests, unix sockets):
#
# 1. One slow HTTP origin for both (a Go server answering ranges after
#    DELAY_MS, default 5, per request): `csi-nbd serve` with its http
#    backend vs nbdkit's curl plugin, bare, under cache=writeback and under
#    cow. Read-only origin, so this is the read cache and the overlay.
# 2. Writes through cache=writeback over one nbdkit `--filter=delay memory`
#    origin (DELAY_MS per read and write): csi-nbd reaches it with its nbd
#    backend, nbdkit stacks `--filter=cache` on the same plugin and delay
#    filter in its own process.
#
#   hack/bench-filters-cache-cow.sh
#   ROUNDS=3 RUNTIME=10 hack/bench-filters-cache-cow.sh
#
# Prints each figure for both and the ratio csi-nbd/nbdkit, then the cache
# hit speedup over the bare origin (the issue's target: >= 20x). Each round
# starts cold on both sides: nbdkit's filtered servers are new processes,
# ours new volumes with new directories.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

ROUNDS=${ROUNDS:-1}
RUNTIME=${RUNTIME:-5}
MIB=${MIB:-64}       # volume size
DELAY_MS=${DELAY_MS:-5}
PORT=${PORT:-10931}  # the HTTP origin, on 127.0.0.1
for t in nbdkit fio python3 go; do
  command -v "$t" >/dev/null || { echo "missing $t (run hack/deps.sh)" >&2; exit 1; }
done
[ -e /usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-curl-plugin.so ] || nbdkit curl --dump-plugin >/dev/null 2>&1 ||
  { echo "missing nbdkit's curl plugin" >&2; exit 1; }

. hack/lib-bench.sh   # $work and $pids, cleaned up on exit; median, ratio, table helpers

go build -o "$work/csi-nbd" ./cmd/csi-nbd
go test -c -o "$work/cachetest" ./pkg/backends/cache
mkdir -p "$work/state"
url="http://127.0.0.1:$PORT/disk.img"
delay="delay-read=${DELAY_MS}ms delay-write=${DELAY_MS}ms"

CSI_NBD_BENCH_HTTP="127.0.0.1:$PORT" CSI_NBD_BENCH_MIB="$MIB" CSI_NBD_BENCH_DELAY="${DELAY_MS}ms" \
  "$work/cachetest" -test.run '^TestServeSlowHTTPForBenchmark$' >"$work/origin.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null && break
  sleep 0.1
done
nbdkit -f -U "$work/kit-mem.sock" --filter=delay memory "${MIB}M" $delay >"$work/kit-mem.log" 2>&1 &
pids+=($!)
nbdkit -f -U "$work/kit-http.sock" curl "url=$url" >"$work/kit-http.log" 2>&1 &
pids+=($!)
# Ours: the bare HTTP origin by default, any other spec by export name.
"$work/csi-nbd" serve --listen "unix://$work/csi.sock" --allow '*' --state-dir "$work/state" "$url" \
  >"$work/csi.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  [ -S "$work/csi.sock" ] && [ -S "$work/kit-http.sock" ] && [ -S "$work/kit-mem.sock" ] && break
  sleep 0.1
done
[ -S "$work/csi.sock" ] || { cat "$work/csi.log" >&2; exit 1; }

# nbdkit's filtered servers, new every round. Filters listed first sit
# outermost: cache and cow above curl/delay.
kit_round() { # round
  local r=$1
  nbdkit -f -U "$work/kit-http-cache-$r.sock" --filter=cache curl "url=$url" cache=writeback cache-on-read=true \
    >"$work/kit.log" 2>&1 &
  pids+=($!)
  nbdkit -f -U "$work/kit-http-cow-$r.sock" --filter=cow curl "url=$url" >>"$work/kit.log" 2>&1 &
  pids+=($!)
  nbdkit -f -U "$work/kit-mem-cache-$r.sock" --filter=cache --filter=delay memory "${MIB}M" $delay \
    cache=writeback cache-on-read=true >>"$work/kit.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    [ -S "$work/kit-http-cache-$r.sock" ] && [ -S "$work/kit-http-cow-$r.sock" ] && [ -S "$work/kit-mem-cache-$r.sock" ] && return
    sleep 0.1
  done
  echo "nbdkit did not start" >&2
  exit 1
}

quote() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
memorigin="nbd+unix:///?socket=$work/kit-mem.sock"
uri() { # side stack round
  local r=$3
  case "$1/$2" in
    csi/http) echo "nbd+unix:///?socket=$work/csi.sock" ;;
    # volume= makes a new volume (and cache/overlay directory) per round.
    csi/http-cache) echo "nbd+unix:///$(quote "cache=writeback,volume=r$r;$url")?socket=$work/csi.sock" ;;
    csi/http-cow) echo "nbd+unix:///$(quote "cow=true,volume=r$r;$url")?socket=$work/csi.sock" ;;
    csi/mem) echo "nbd+unix:///$(quote "$memorigin")?socket=$work/csi.sock" ;;
    csi/mem-cache) echo "nbd+unix:///$(quote "cache=writeback,volume=r$r;$memorigin")?socket=$work/csi.sock" ;;
    kit/http | kit/mem) echo "nbd+unix:///?socket=$work/kit-$2.sock" ;;
    kit/*) echo "nbd+unix:///?socket=$work/kit-$2-$r.sock" ;;
  esac
}

# fio with the nbd engine; prints "iops p50_us p99_us".
fio_run() { # rw bs depth uri
  fio --name=b --ioengine=nbd --uri="$4" --rw="$1" --bs="$2" --iodepth="$3" \
    --size="${MIB}M" --time_based --runtime="$RUNTIME" --group_reporting \
    --output-format=json --output="$work/fio.json" >"$work/fio.err" 2>&1 || { cat "$work/fio.err" >&2; return 1; }
  python3 - "$work/fio.json" "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write" if "write" in sys.argv[2] else "read"]
p = d["clat_ns"]["percentile"]
print(round(d["iops"]), round(p["50.000000"] / 1e3, 1), round(p["99.000000"] / 1e3, 1))
PY
}
# Read the whole volume once (fio reads holes too, unlike nbdcopy).
warm() { fio --name=w --ioengine=nbd --uri="$1" --rw=read --bs=1M --iodepth=8 --size="${MIB}M" >/dev/null 2>&1; }

declare -A C K
measure() { # key side stack round rw bs depth
  local key=$1 side=$2 stack=$3 r=$4 i p50 p99
  read -r i p50 p99 < <(fio_run "$5" "$6" "$7" "$(uri "$side" "$stack" "$r")")
  if [ "$side" = csi ]; then C[$key]+="$i "; C[$key.p50]+="$p50 "; else K[$key]+="$i "; K[$key.p50]+="$p50 "; fi
}

for r in $(seq "$ROUNDS"); do
  kit_round "$r"
  for side in csi kit; do
    measure http-read $side http "$r" randread 4k 1
    warm "$(uri $side http-cache "$r")"
    measure http-cache-read-1 $side http-cache "$r" randread 4k 1
    measure http-cache-read-32 $side http-cache "$r" randread 4k 32
    measure http-cow-write $side http-cow "$r" randwrite 4k 1
    measure http-cow-read $side http-cow "$r" randread 4k 1
    measure mem-write $side mem "$r" randwrite 4k 1
    warm "$(uri $side mem-cache "$r")"
    measure mem-cache-write $side mem-cache "$r" randwrite 4k 1
  done
done

printf '%-58s %9s %9s %7s\n' "fio 4k, ${DELAY_MS} ms per origin request (median of $ROUNDS)" csi-nbd nbdkit ratio
row() { # label key
  local c k
  c=$(median ${C[$2]}); k=$(median ${K[$2]})
  printf '%-58s %9s %9s %7s\n' "$1" "$c" "$k" "$(ratio "$c" "$k")"
}
echo "HTTP origin (csi-nbd http backend | nbdkit curl plugin):"
row "  bare origin, randread depth 1 (IOPS)" http-read
row "  cache=writeback, warm randread depth 1 (IOPS)" http-cache-read-1
row "  cache=writeback, warm randread depth 1 p50 (us)" http-cache-read-1.p50
row "  cache=writeback, warm randread depth 32 (IOPS)" http-cache-read-32
row "  cow, randwrite depth 1 on a fresh overlay (IOPS)" http-cow-write
row "  cow, randread depth 1 after it (IOPS)" http-cow-read
echo "nbdkit delay+memory origin (csi-nbd nbd backend to it | nbdkit filter on it):"
row "  bare origin, randwrite depth 1 (IOPS)" mem-write
row "  cache=writeback, randwrite depth 1 (IOPS)" mem-cache-write
echo
echo "cache hit speedup over the bare HTTP origin (randread depth 1; target >= 20x):"
printf '  csi-nbd %s   nbdkit %s\n' \
  "$(ratio "$(median ${C[http-cache-read-1]})" "$(median ${C[http-read]})")" \
  "$(ratio "$(median ${K[http-cache-read-1]})" "$(median ${K[http-read]})")"
