#!/usr/bin/env bash
# Benchmarks the FUSE+loop fallback (pkg/attach/fuseloop, over a memory
# volume) against a plain loop device over a file in $BASE_DIR (tmpfs by
# default, so both sides keep their data in RAM), with the same fio jobs,
# direct I/O. Needs root, /dev/fuse, /dev/loop-control, fio, losetup.
#
#   hack/bench-fuseloop.sh     # SIZE=1G RUNTIME=10 REPEAT=3 BASE_DIR=/dev/shm
#
# Prints one row per job: the median IOPS (4k) or MiB/s (1M) of each over
# REPEAT interleaved runs, and the ratio fallback/plain. Absolute figures
# depend on the machine (and on whatever else runs on it); the ratio is
# the point.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

SIZE=${SIZE:-1G}
RUNTIME=${RUNTIME:-10}
REPEAT=${REPEAT:-3}
BASE_DIR=${BASE_DIR:-/dev/shm}

[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
for t in fio losetup python3; do
  command -v "$t" >/dev/null || { echo "$t is required (hack/deps.sh)" >&2; exit 1; }
done

work=$(mktemp -d)
plain_dev=""
helper_pid=""
cleanup() {
  set +e
  if [ -n "$helper_pid" ]; then
    exec 3>&-            # EOF on the helper's stdin: it detaches and exits
    wait "$helper_pid"
  fi
  [ -n "$plain_dev" ] && losetup -d "$plain_dev"
  rm -f "$BASE_DIR/bench-fuseloop-plain.img"
  rm -rf "$work"
}
trap cleanup EXIT

# The test binary doubles as a serving process (see TestMain).
go test -c -o "$work/fuseloop.test" ./pkg/attach/fuseloop
mkfifo "$work/in"
FUSELOOP_HELPER_DIR="$work/vol" FUSELOOP_HELPER_SPEC="size=$SIZE;memory:bench" \
  "$work/fuseloop.test" -test.run '^$' <"$work/in" >"$work/out" 2>"$work/err" &
helper_pid=$!
exec 3>"$work/in"
for _ in $(seq 100); do
  [ -s "$work/out" ] && break
  kill -0 "$helper_pid" 2>/dev/null || { cat "$work/err" >&2; exit 1; }
  sleep 0.1
done
fuse_dev=$(head -n1 "$work/out")
[ -b "$fuse_dev" ] || { echo "helper did not attach: $(cat "$work/err")" >&2; exit 1; }

truncate -s "$SIZE" "$BASE_DIR/bench-fuseloop-plain.img"
plain_dev=$(losetup -f --show --direct-io=on --sector-size 4096 "$BASE_DIR/bench-fuseloop-plain.img")

dio() { cat "/sys/block/$(basename "$1")/loop/dio"; }
echo "fallback: $fuse_dev (dio=$(dio "$fuse_dev"))  plain: $plain_dev over $BASE_DIR (dio=$(dio "$plain_dev"))"
echo "size $SIZE, ${RUNTIME}s per job, median of $REPEAT, fio $(fio --version)"

# name rw bs iodepth engine
jobs=(
  "seqwrite-1M write 1M 4 libaio"
  "seqread-1M read 1M 4 libaio"
  "randwrite-4k randwrite 4k 16 libaio"
  "randread-4k randread 4k 16 libaio"
  "randread-4k-qd1 randread 4k 1 psync"
)

run_job() { # dev rw bs iodepth engine → json file
  local dev=$1 rw=$2 bs=$3 qd=$4 engine=$5 out=$6
  fio --name=j --filename="$dev" --rw="$rw" --bs="$bs" --iodepth="$qd" --ioengine="$engine" \
    --direct=1 --size="$SIZE" --runtime="$RUNTIME" --time_based --numjobs=1 \
    --randrepeat=0 --output-format=json --output="$out" >/dev/null
}

results="$work/results"
: >"$results"
for j in "${jobs[@]}"; do
  read -r name rw bs qd engine <<<"$j"
  for r in $(seq "$REPEAT"); do
    run_job "$fuse_dev" "$rw" "$bs" "$qd" "$engine" "$work/$name.$r.fuse.json"
    run_job "$plain_dev" "$rw" "$bs" "$qd" "$engine" "$work/$name.$r.plain.json"
    echo "$name $bs $work/$name.$r.fuse.json $work/$name.$r.plain.json" >>"$results"
  done
done

python3 - "$results" <<'EOF'
import json, statistics, sys
def figure(path, bs):
    j = json.load(open(path))["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    if bs == "4k":
        return side["iops"], "IOPS"
    return side["bw_bytes"] / (1 << 20), "MiB/s"
runs = {}
for line in open(sys.argv[1]):
    name, bs, fuse, plain = line.split()
    f, unit = figure(fuse, bs)
    p, _ = figure(plain, bs)
    runs.setdefault(name, (unit, [], []))
    runs[name][1].append(f)
    runs[name][2].append(p)
print(f"{'job':<18}{'fallback':>12}{'plain loop':>12}{'unit':>7}{'ratio':>8}")
for name, (unit, fs, ps) in runs.items():
    f, p = statistics.median(fs), statistics.median(ps)
    print(f"{name:<18}{f:>12.0f}{p:>12.0f}{unit:>7}{f / p:>8.2f}")
EOF
