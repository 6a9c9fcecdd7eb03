#!/usr/bin/env bash
# Runs `csi-nbd serve` and `nbdkit memory` side by side, in one run, with the
# same clients (nbdcopy, fio's nbd engine), over TCP and a unix socket, and
# prints each figure for both servers and the ratio csi-nbd/nbdkit (for
# latency, lower is better, so the ratio reads "fraction of nbdkit's").
#
#   hack/bench-vs-nbdkit.sh            # both transports, 3 rounds (medians)
#   ROUNDS=1 TRANSPORTS=unix hack/bench-vs-nbdkit.sh
#   ROUNDS=15 TRANSPORTS=tcp COPIES= FIO_JOBS="randread 4k 32" hack/bench-vs-nbdkit.sh
#
# COPIES lists the nbdcopy connection counts and FIO_JOBS the fio jobs
# ("rw bs depth", comma-separated), so one figure can get many rounds.
# Under each median, ROUND_RATIOS=1 prints each round's ratio and
# ROUND_VALUES=1 each round's figures.
#
# Each round measures csi-nbd then nbdkit for one figure before moving on,
# so drift on a shared machine hits both alike.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
TRANSPORTS=${TRANSPORTS:-"tcp unix"}
MIB=${MIB:-1024}           # volume and copy size in MiB
RUNTIME=${RUNTIME:-5}
COPIES=${COPIES-"1 4"}
FIO_JOBS=${FIO_JOBS-"randread 4k 1,randread 4k 4,randread 4k 8,randread 4k 32,write 1m 8"}
for t in nbdkit nbdcopy fio python3; do
  command -v "$t" >/dev/null || { echo "missing $t (run hack/deps.sh)" >&2; exit 1; }
done

. hack/lib-bench.sh   # $work and $pids, cleaned up on exit; median, ratio, table helpers

go build -o "$work/csi-nbd" ./cmd/csi-nbd
head -c "${MIB}M" /dev/urandom > "$work/data"   # what the copies write

"$work/csi-nbd" serve --listen tcp://127.0.0.1:10911 --listen "unix://$work/csi.sock" "size=${MIB}Mi;memory:" >"$work/csi.log" 2>&1 &
pids+=($!)
nbdkit -f -i 127.0.0.1 -p 10912 memory "${MIB}M" >"$work/kit-tcp.log" 2>&1 &
pids+=($!)
nbdkit -f -U "$work/kit.sock" memory "${MIB}M" >"$work/kit-unix.log" 2>&1 &
pids+=($!)
for i in $(seq 100); do
  [ -S "$work/csi.sock" ] && [ -S "$work/kit.sock" ] && nbdinfo --size nbd://127.0.0.1:10912 >/dev/null 2>&1 && break
  sleep 0.1
done

uri() { # server transport
  case "$1/$2" in
    csi/tcp) echo "nbd://127.0.0.1:10911/" ;;
    kit/tcp) echo "nbd://127.0.0.1:10912/" ;;
    csi/unix) echo "nbd+unix:///?socket=$work/csi.sock" ;;
    kit/unix) echo "nbd+unix:///?socket=$work/kit.sock" ;;
  esac
}

# nbdcopy throughput in MB/s.
copy_rate() { # direction conns uri
  local start end bytes
  bytes=$(stat -c %s "$work/data")
  start=$(date +%s.%N)
  if [ "$1" = write ]; then
    nbdcopy --connections="$2" --threads="$2" "$work/data" "$3" || return 1
  else
    nbdcopy --connections="$2" --threads="$2" "$3" null: || return 1
  fi
  end=$(date +%s.%N)
  python3 -c "print(round($bytes/($end-$start)/1e6, 1))"
}

# fio with the nbd engine; prints "iops bw_MBps p50_us p99_us".
fio_run() { # rw bs depth uri
  fio --name=b --ioengine=nbd --uri="$4" --rw="$1" --bs="$2" --iodepth="$3" \
    --size="${MIB}M" --time_based --runtime="$RUNTIME" --ramp_time=1 --group_reporting \
    --output-format=json --output="$work/fio.json" >"$work/fio.err" 2>&1 || { cat "$work/fio.err" >&2; return 1; }
  python3 - "$work/fio.json" "$1" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write" if "write" in sys.argv[2] else "read"]
p = d["clat_ns"]["percentile"]
print(round(d["iops"]), round(d["bw_bytes"] / 1e6, 1), round(p["50.000000"] / 1e3, 1), round(p["99.000000"] / 1e3, 1))
PY
}

# Reads must find data: an unwritten csi-nbd volume answers with holes and
# no payload, which would flatter it. The copies below rewrite it anyway.
for tr in $TRANSPORTS; do
  nbdcopy "$work/data" "$(uri csi "$tr")"
  nbdcopy "$work/data" "$(uri kit "$tr")"
done

table_header 44

for tr in $TRANSPORTS; do
  for conns in $COPIES; do
    for dir in write read; do
      c=(); k=()
      for _ in $(seq "$ROUNDS"); do
        c+=("$(copy_rate $dir $conns "$(uri csi $tr)")") || exit 1
        k+=("$(copy_rate $dir $conns "$(uri kit $tr)")") || exit 1
      done
      row "$tr nbdcopy seq $dir ${MIB} MiB, $conns conn (MB/s)" "${c[@]}" -- "${k[@]}"
    done
  done
  IFS=, read -ra jobs <<<"$FIO_JOBS"
  for job in "${jobs[@]}"; do
    set -- $job
    ci=(); ki=(); cp50=(); kp50=(); cp99=(); kp99=(); cbw=(); kbw=()
    for _ in $(seq "$ROUNDS"); do
      read -r i bw p50 p99 < <(fio_run "$1" "$2" "$3" "$(uri csi $tr)"); ci+=("$i"); cbw+=("$bw"); cp50+=("$p50"); cp99+=("$p99")
      read -r i bw p50 p99 < <(fio_run "$1" "$2" "$3" "$(uri kit $tr)"); ki+=("$i"); kbw+=("$bw"); kp50+=("$p50"); kp99+=("$p99")
    done
    if [ "$1" = write ]; then
      row "$tr fio $1 $2 depth $3 (MB/s)" "${cbw[@]}" -- "${kbw[@]}"
    else
      row "$tr fio $1 $2 depth $3 (IOPS)" "${ci[@]}" -- "${ki[@]}"
      row "$tr fio $1 $2 depth $3 p50 (us)" "${cp50[@]}" -- "${kp50[@]}"
      row "$tr fio $1 $2 depth $3 p99 (us)" "${cp99[@]}" -- "${kp99[@]}"
    fi
  done
done
