#!/usr/bin/env bash
# Our s3 backend (`csi-nbd serve`) against nbdkit's S3 plugin (Python,
# boto3), side by side in one run, on one versitygw gateway (posix backend
# in a temp dir) on 127.0.0.1: sequential write of random data with
# nbdcopy (then FLUSH: both must have it in the bucket), and sequential
# read back. Each round writes a fresh volume on each, csi-nbd then nbdkit,
# so drift on a shared machine hits both alike. Prints medians (MB/s) and
# the ratio csi-nbd/nbdkit (higher is better for csi-nbd).
#
# Both use 64 KiB objects: nbdkit 1.32's S3 plugin advertises its object
# size as the minimum block size, which nbdkit refuses above 64 KiB ("plugin
# must set minimum block size between 1 and 64K"), so larger objects do not
# run there at all. csi-nbd is also measured with its default 4 MiB chunks.
#
#   hack/bench-s3-vs-nbdkit.sh               # 256 MiB, 3 rounds
#   MIB=64 ROUNDS=1 hack/bench-s3-vs-nbdkit.sh
#
# Needs versitygw and nbdkit-plugin-python + python3-boto3 (hack/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=${TOOLS_CACHE:-/var/cache/csi-nbd/tools}/bin:$PATH:/usr/local/go/bin

ROUNDS=${ROUNDS:-3}
MIB=${MIB:-256}       # volume and copy size in MiB
CHUNK=${CHUNK:-64}    # object size in KiB for both (nbdkit: at most 64)
CONNS=${CONNS:-4}     # nbdcopy connections (and threads)
PY=/usr/bin/python3   # Debian's, which has boto3
for t in versitygw nbdkit nbdcopy go; do
  command -v "$t" >/dev/null || { echo "missing $t (run hack/deps.sh)" >&2; exit 1; }
done
$PY -c 'import boto3' || { echo "missing python3-boto3 (run hack/deps.sh)" >&2; exit 1; }
nbdkit S3 --dump-plugin >/dev/null 2>&1 || { echo "nbdkit's S3 plugin does not load (nbdkit-plugin-python)" >&2; exit 1; }

. hack/lib-bench.sh   # $work and $pids, cleaned up on exit; median, ratio, table helpers
# KEEP=1 leaves the logs for a look.
[ -z "${KEEP:-}" ] || trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; echo "logs in $work" >&2' EXIT

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

# The gateway, its credentials (also where both servers get them) and a bucket.
export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=benchsecret0123456789 AWS_DEFAULT_REGION=us-east-1
port=$(free_port)
endpoint=http://127.0.0.1:$port
mkdir -p "$work/gw"
versitygw --port "127.0.0.1:$port" --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" \
  --health /health posix "$work/gw" >"$work/gw.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do curl -sf "$endpoint/health" >/dev/null 2>&1 && break; sleep 0.05; done
# boto3 with path-style addressing, as nbdkit's plugin will use it.
mkdir -p "$work/aws"
printf '[default]\ns3 =\n    addressing_style = path\n' >"$work/aws/config"
export AWS_CONFIG_FILE=$work/aws/config
$PY -c "import boto3; boto3.client('s3', endpoint_url='$endpoint').create_bucket(Bucket='bench')"

go build -o "$work/csi-nbd" ./cmd/csi-nbd
head -c "${MIB}M" /dev/urandom >"$work/data"
bytes=$(stat -c %s "$work/data")

"$work/csi-nbd" serve --listen "unix://$work/csi.sock" --allow '*' >"$work/csi.log" 2>&1 &
pids+=($!)
wait_sock "$work/csi.sock"

ours() { # round [chunk KiB] → NBD URI of a fresh volume
  echo "nbd+unix:///size=${MIB}Mi,chunk=${2:-$CHUNK}Ki,endpoint=$endpoint,path-style=true%3Bs3://bench/ours-$1-${2:-$CHUNK}?socket=$work/csi.sock"
}
kit_start() { # round: a fresh nbdkit S3 volume, served at $(kit round)
  nbdkit -f -U "$work/kit-$1.sock" S3 endpoint-url="$endpoint" bucket=bench key="kit-$1" \
    size="${MIB}M" object-size="${CHUNK}K" >"$work/kit-$1.log" 2>&1 &
  pids+=($!)
  wait_sock "$work/kit-$1.sock"
}
kit() { echo "nbd+unix:///?socket=$work/kit-$1.sock"; }

rate() { # seconds → MB/s
  $PY -c "print(round($bytes/$1/1e6, 1))"
}
timed() { # command... → seconds
  local start end
  start=$(date +%s.%N)
  "$@" >"$work/cmd.log" 2>&1 || { cat "$work/cmd.log" >&2; return 1; }
  end=$(date +%s.%N)
  $PY -c "print($end-$start)"
}
write() { rate "$(timed nbdcopy --flush --connections="$CONNS" --threads="$CONNS" "$work/data" "$1")"; }
read_() { rate "$(timed nbdcopy --connections="$CONNS" --threads="$CONNS" "$1" null:)"; }
check() { # uri: what was written reads back
  nbdcopy "$1" "$work/back" && cmp -s "$work/data" "$work/back" || { echo "data read back from $1 differs" >&2; return 1; }
}

declare -a ow or kw kr bw br
for r in $(seq "$ROUNDS"); do
  o=$(ours "$r"); b=$(ours "$r" 4096)
  kit_start "$r"
  k=$(kit "$r")
  ow+=("$(write "$o")"); kw+=("$(write "$k")"); bw+=("$(write "$b")")
  or+=("$(read_ "$o")"); kr+=("$(read_ "$k")"); br+=("$(read_ "$b")")
  check "$o"; check "$k"; check "$b"
  echo "round $r: write MB/s csi-nbd ${ow[-1]} nbdkit ${kw[-1]} (csi-nbd 4Mi ${bw[-1]}); read MB/s csi-nbd ${or[-1]} nbdkit ${kr[-1]} (csi-nbd 4Mi ${br[-1]})" >&2
done

echo "s3 on versitygw, ${MIB} MiB of random data, ${CHUNK} KiB objects, nbdcopy --connections=$CONNS, median of $ROUNDS (MB/s)"
printf '%-24s %10s %10s %8s %16s\n' "" csi-nbd nbdkit-S3 ratio "csi-nbd 4Mi chunks"
mw=$(median "${ow[@]}"); nw=$(median "${kw[@]}"); bw_=$(median "${bw[@]}")
mr=$(median "${or[@]}"); nr=$(median "${kr[@]}"); br_=$(median "${br[@]}")
printf '%-24s %10s %10s %8s %16s\n' "sequential write+flush" "$mw" "$nw" "$(ratio "$mw" "$nw")" "$bw_"
printf '%-24s %10s %10s %8s %16s\n' "sequential read" "$mr" "$nr" "$(ratio "$mr" "$nr")" "$br_"
