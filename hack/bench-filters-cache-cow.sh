#!/usr/bin/env bash
# csi-nbd's cache and cow filters side by side with nbdkit's, over the same
# slow origin: a memory volume that waits DELAY_MS (default 5) before every
# read and write (nbdkit: --filter=delay memory; csi-nbd: the test-only
# slowmem: backend, which sleeps the same way, until csi-nbd has an nbd:
# backend to use nbdkit's delayed origin itself). One run, same clients
# (fio's nbd engine), each figure measured for csi-nbd then nbdkit.
#
#   hack/bench-filters-cache-cow.sh
#   ROUNDS=3 RUNTIME=10 hack/bench-filters-cache-cow.sh
#
# Prints each figure for both and the ratio csi-nbd/nbdkit, then the cache
# hit speedup over the bare origin (the issue's target: >= 20x).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

ROUNDS=${ROUNDS:-1}
RUNTIME=${RUNTIME:-5}
MIB=${MIB:-64}       # volume size
DELAY_MS=${DELAY_MS:-5}
for t in nbdkit fio python3 go; do
  command -v "$t" >/dev/null || { echo "missing $t (run hack/deps.sh)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

go test -c -o "$work/cachetest" ./pkg/backends/cache
mkdir -p "$work/state"
CSI_NBD_BENCH_SOCK="$work/csi.sock" CSI_NBD_BENCH_STATE="$work/state" \
  "$work/cachetest" -test.run '^TestServeForBenchmark$' >"$work/csi.log" 2>&1 &
pids+=($!)
delay="delay-read=${DELAY_MS}ms delay-write=${DELAY_MS}ms"
# nbdkit: filters listed first sit outermost, so cache/cow are above delay.
nbdkit -f -U "$work/kit-origin.sock" --filter=delay memory "${MIB}M" $delay >"$work/kit1.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  [ -S "$work/csi.sock" ] && [ -S "$work/kit-origin.sock" ] && break
  sleep 0.1
done
# nbdkit's cache and cow run as new processes every round, so each round
# starts cold on both sides (ours: a new volume and directory per round).
kit_round() { # round
  nbdkit -f -U "$work/kit-cache-$1.sock" --filter=cache --filter=delay memory "${MIB}M" $delay \
    cache=writeback cache-on-read=true >"$work/kit2.log" 2>&1 &
  pids+=($!)
  nbdkit -f -U "$work/kit-cow-$1.sock" --filter=cow --filter=delay memory "${MIB}M" $delay >"$work/kit3.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    [ -S "$work/kit-cache-$1.sock" ] && [ -S "$work/kit-cow-$1.sock" ] && return
    sleep 0.1
  done
  echo "nbdkit did not start" >&2
  exit 1
}

quote() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
origin="size=${MIB}Mi,delay=${DELAY_MS}ms;slowmem:"
uri() { # side stack round
  case "$1/$2" in
    csi/origin) echo "nbd+unix:///$(quote "$origin")?socket=$work/csi.sock" ;;
    # A fresh volume per round (the name only tells volumes apart).
    csi/cache) echo "nbd+unix:///$(quote "cache=writeback,cache-dir=$work/state/c$3,size=${MIB}Mi,delay=${DELAY_MS}ms;slowmem:")?socket=$work/csi.sock" ;;
    csi/cow) echo "nbd+unix:///$(quote "cow=true,cow-dir=$work/state/w$3,size=${MIB}Mi,delay=${DELAY_MS}ms;slowmem:")?socket=$work/csi.sock" ;;
    kit/origin) echo "nbd+unix:///?socket=$work/kit-origin.sock" ;;
    kit/*) echo "nbd+unix:///?socket=$work/kit-$2-$3.sock" ;;
  esac
}

# fio with the nbd engine; prints "iops p50_us p99_us".
fio_run() { # rw bs depth uri [runtime]
  fio --name=b --ioengine=nbd --uri="$4" --rw="$1" --bs="$2" --iodepth="$3" \
    --size="${MIB}M" --time_based --runtime="${5:-$RUNTIME}" --group_reporting \
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

median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}x' if b else 'n/a')" "$1" "$2"; }

declare -A C K
measure() { # key side stack round rw bs depth
  local key=$1 side=$2 stack=$3 r=$4
  read -r i p50 p99 < <(fio_run "$5" "$6" "$7" "$(uri "$side" "$stack" "$r")")
  if [ "$side" = csi ]; then C[$key]+="$i "; C[$key.p50]+="$p50 "; else K[$key]+="$i "; K[$key.p50]+="$p50 "; fi
}

for r in $(seq "$ROUNDS"); do
  kit_round "$r"
  for side in csi kit; do
    measure origin-read $side origin "$r" randread 4k 1
    measure origin-write $side origin "$r" randwrite 4k 1
    warm "$(uri $side cache "$r")"
    measure cache-read-1 $side cache "$r" randread 4k 1
    measure cache-read-32 $side cache "$r" randread 4k 32
    measure cache-write-1 $side cache "$r" randwrite 4k 1
    measure cow-write-1 $side cow "$r" randwrite 4k 1
    measure cow-read-1 $side cow "$r" randread 4k 1
  done
done

printf '%-52s %10s %10s %8s\n' "fio 4k, ${DELAY_MS} ms origin (median of $ROUNDS)" csi-nbd nbdkit ratio
row() { # label key
  local c k
  c=$(median ${C[$2]}); k=$(median ${K[$2]})
  printf '%-52s %10s %10s %8s\n' "$1" "$c" "$k" "$(ratio "$c" "$k")"
}
row "origin randread depth 1 (IOPS)" origin-read
row "origin randwrite depth 1 (IOPS)" origin-write
row "cache=writeback warm randread depth 1 (IOPS)" cache-read-1
row "cache=writeback warm randread depth 1 p50 (us)" cache-read-1.p50
row "cache=writeback warm randread depth 32 (IOPS)" cache-read-32
row "cache=writeback randwrite depth 1 (IOPS)" cache-write-1
row "cow randwrite depth 1, fresh overlay (IOPS)" cow-write-1
row "cow randread depth 1 after it (IOPS)" cow-read-1
echo
echo "cache hit speedup over the bare origin (randread depth 1; target >= 20x):"
printf '  csi-nbd %s   nbdkit %s\n' \
  "$(ratio "$(median ${C[cache-read-1]})" "$(median ${C[origin-read]})")" \
  "$(ratio "$(median ${K[cache-read-1]})" "$(median ${K[origin-read]})")"
