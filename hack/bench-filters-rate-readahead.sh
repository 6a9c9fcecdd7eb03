#!/usr/bin/env bash
# The rate and readahead filters side by side with nbdkit's, in one run,
# with the same client (fio's nbd engine) over unix sockets.
#
# Rate: for each limit, fio reads (then writes) for RUNTIME seconds as fast
# as it can through `csi-nbd serve 'rate-read=L;memory:'` and through
# `nbdkit --filter=rate memory rate=L*8` (nbdkit counts bits per second and
# meters reads and writes together); the table shows the rate achieved
# over the whole run, bursts included, and its error against the limit.
#
# Readahead: a dd-like reader (64 KiB, one request at a time) over a slow
# origin, `nbdkit --filter=delay memory delay-read=DELAY`, directly, through
# csi-nbd without and with readahead (over the nbd: backend), and through
# `nbdkit --filter=readahead nbd`. Without an nbd: backend in this build the
# csi-nbd rows come from the Go benchmark over an in-process slow device.
#
#   hack/bench-filters-rate-readahead.sh
#   LIMITS="10 50" RUNTIME=10 DELAY=2ms hack/bench-filters-rate-readahead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

LIMITS=${LIMITS:-"5 20 50 200"}   # MiB/s
IOPS=${IOPS:-"500 2000"}           # read ops/s (csi-nbd only: nbdkit has no IOPS limit)
RUNTIME=${RUNTIME:-10}             # seconds per measurement
DELAY=${DELAY:-1ms}                # the slow origin's delay per read
for t in nbdkit fio nbdinfo python3 go; do
  command -v "$t" >/dev/null || { echo "missing $t (run hack/deps.sh)" >&2; exit 1; }
done

. hack/lib-bench.sh   # $work and $pids, cleaned up on exit; median, ratio, table helpers

go build -o "$work/csi-nbd" ./cmd/csi-nbd

wait_sock() { # socket
  for _ in $(seq 100); do
    nbdinfo --size "nbd+unix:///?socket=$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on $1 did not start" >&2
  return 1
}

# One csi-nbd server; every export name is a spec, so each limit is its
# own volume.
"$work/csi-nbd" serve --allow '*' --listen "unix://$work/csi.sock" "size=1Gi;memory:" >"$work/csi.log" 2>&1 &
pids+=($!)
wait_sock "$work/csi.sock"
csi_uri() { echo "nbd+unix:///$1?socket=$work/csi.sock"; }

# fio with the nbd engine for RUNTIME seconds, no ramp (the burst after
# idle counts); prints "bytes_per_sec iops".
fio_run() { # rw bs depth uri
  fio --name=b --ioengine=nbd --uri="$4" --rw="$1" --bs="$2" --iodepth="$3" \
    --size=1G --time_based --runtime="$RUNTIME" --group_reporting \
    --output-format=json --output="$work/fio.json" >"$work/fio.err" 2>&1 || { cat "$work/fio.err" >&2; return 1; }
  python3 - "$work/fio.json" "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write" if "write" in sys.argv[2] else "read"]
print(d["bw_bytes"], round(d["iops"], 1))
PY
}

row() { # label limit achieved unit
  python3 -c "
import sys
label, limit, got, unit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
print(f'{label:<34} {limit:>10.1f} {got:>10.2f} {unit:<6} {100*(got/limit-1):>+7.2f}%')
" "$@"
}

echo "== rate: achieved over ${RUNTIME}s (fio nbd engine, 256 KiB requests, depth 8)"
printf '%-34s %10s %10s %-6s %8s\n' server limit achieved unit error
for L in $LIMITS; do
  bits=$((L * 1048576 * 8))
  nbdkit -f -U "$work/kit$L.sock" --filter=rate memory 1G rate=$bits >"$work/kit$L.log" 2>&1 &
  pids+=($!)
  wait_sock "$work/kit$L.sock"
  for rw in read write; do
    read -r bw _ < <(fio_run "$rw" 256k 8 "$(csi_uri "rate-$rw=${L}Mi,size=1Gi;memory:r$L$rw")")
    row "csi-nbd rate-$rw=${L}Mi ($rw)" "$L" "$(python3 -c "print($bw/1048576)")" MiB/s
    # A fresh nbdkit per direction: its bucket is shared by reads and
    # writes and starts full, like ours.
    read -r bw _ < <(fio_run "$rw" 256k 8 "nbd+unix:///?socket=$work/kit$L.sock")
    row "nbdkit rate=${L}Mi*8 ($rw)" "$L" "$(python3 -c "print($bw/1048576)")" MiB/s
    sleep 3 # let nbdkit's bucket refill, as csi-nbd's new volume starts full
  done
done
for N in $IOPS; do
  read -r _ iops < <(fio_run randread 4k 16 "$(csi_uri "iops-read=$N,size=1Gi;memory:i$N")")
  row "csi-nbd iops-read=$N (4k randread)" "$N" "$iops" IOPS
done

echo
echo "== readahead: 64 KiB sequential reads, depth 1, origin delays each read by $DELAY (fio, ${RUNTIME}s)"
nbdkit -f -U "$work/origin.sock" --filter=delay memory 1G delay-read="$DELAY" >"$work/origin.log" 2>&1 &
pids+=($!)
wait_sock "$work/origin.sock"
origin="nbd+unix:///?socket=$work/origin.sock"
nbdkit -f -U "$work/kitra.sock" --filter=readahead nbd uri="$origin" >"$work/kitra.log" 2>&1 &
pids+=($!)
wait_sock "$work/kitra.sock"
nbdkit -f -U "$work/kitdirect.sock" nbd uri="$origin" >"$work/kitdirect.log" 2>&1 &
pids+=($!)
wait_sock "$work/kitdirect.sock"
# nbdkit's readahead prefetches with cache requests, which only help with
# a cache below it.
nbdkit -f -U "$work/kitrac.sock" --filter=readahead --filter=cache nbd uri="$origin" >"$work/kitrac.log" 2>&1 &
pids+=($!)
wait_sock "$work/kitrac.sock"
mbs() { python3 -c "print(f'{$1/1e6:.1f}')"; }
printf '%-44s %10s\n' path MB/s
read -r bw _ < <(fio_run read 64k 1 "$origin")
printf '%-44s %10s\n' "origin directly" "$(mbs "$bw")"
read -r bw _ < <(fio_run read 64k 1 "nbd+unix:///?socket=$work/kitdirect.sock")
printf '%-44s %10s\n' "nbdkit nbd (no readahead)" "$(mbs "$bw")"
read -r bw _ < <(fio_run read 64k 1 "nbd+unix:///?socket=$work/kitra.sock")
printf '%-44s %10s\n' "nbdkit --filter=readahead nbd" "$(mbs "$bw")"
read -r bw _ < <(fio_run read 64k 1 "nbd+unix:///?socket=$work/kitrac.sock")
printf '%-44s %10s\n' "nbdkit --filter=readahead --filter=cache nbd" "$(mbs "$bw")"
if grep -q nbdremote pkg/backends/all/all.go; then
  # The export name is a spec whose URL is the origin's nbd+unix URI;
  # its '?' must be escaped in the client's URI.
  enc() { python3 -c "import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe='=,;:/'))" "$1"; }
  read -r bw _ < <(fio_run read 64k 1 "nbd+unix:///$(enc "$origin")?socket=$work/csi.sock")
  printf '%-44s %10s\n' "csi-nbd nbd: (no readahead)" "$(mbs "$bw")"
  read -r bw _ < <(fio_run read 64k 1 "nbd+unix:///$(enc "readahead=true;$origin")?socket=$work/csi.sock")
  printf '%-44s %10s\n' "csi-nbd readahead=true over nbd:" "$(mbs "$bw")"
else
  echo "(no nbd: backend in this build: csi-nbd over an in-process device with 1 ms per read)"
  go test -run '^$' -bench SequentialSlowOrigin -benchtime "${RUNTIME}s" ./pkg/backends/readahead/ |
    awk '/^Benchmark/ { printf "%-44s %10s\n", "csi-nbd Go bench " $1, $(NF-1) }'
fi
