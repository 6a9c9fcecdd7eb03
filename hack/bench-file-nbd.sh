#!/usr/bin/env bash
# Side-by-side figures for the file and nbd backends, in one run:
#   file: `csi-nbd serve file:///F` vs `nbdkit file F` (same file, in the
#         page cache), nbdcopy read to null:, nbdcopy write, fio 4k randread.
#   nbd:  `csi-nbd serve nbd+unix://...` in front of nbdkit memory vs
#         nbdkit memory directly (the cost of the hop) and vs nbdkit's own nbd
#         plugin as the proxy.
# Usage: hack/bench-file-nbd.sh [ROUNDS]   (medians of ROUNDS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
export PATH=$PATH:/usr/local/go/bin
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

go build -o "$tmp/csi-nbd" ./cmd/csi-nbd
size=512M
img=$tmp/disk.img
head -c $size /dev/urandom >"$img"
cp "$img" "$tmp/src"

waitsock() { for _ in $(seq 200); do [ -S "$1" ] && return; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
serve_csi() { "$tmp/csi-nbd" serve --listen "unix://$1" "$2" >/dev/null 2>&1 & pids+=($!); waitsock "$1"; }
serve_kit() { local s=$1; shift; nbdkit -f -U "$s" "$@" & pids+=($!); waitsock "$s"; }
uri() { echo "nbd+unix:///?socket=$1"; }

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mbps() { echo "scale=0; 512 / $1" | bc; }
iops() { fio --name=r --ioengine=nbd --uri="$1" --rw=randread --bs=4k --iodepth=1 --runtime=5 --time_based \
  --output-format=json 2>/dev/null | sed -n '/^{/,$p' | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'; }

serve_csi "$tmp/csi.sock" "file://$img"
serve_kit "$tmp/kit.sock" file "$img"
serve_kit "$tmp/mem.sock" memory 512M
nbdcopy "$tmp/src" "$(uri "$tmp/mem.sock")"
serve_csi "$tmp/proxy.sock" "connections=4;nbd+unix:///?socket=$tmp/mem.sock"
serve_kit "$tmp/kitproxy.sock" nbd socket="$tmp/mem.sock" # one upstream connection per client connection

row() { # name, command template with @ for the URI, uri A, uri B
  local name=$1 cmd=$2 a=$3 b=$4 ta=() tb=()
  for _ in $(seq "$rounds"); do
    ta+=("$(secs bash -c "${cmd//@/$a}")"); tb+=("$(secs bash -c "${cmd//@/$b}")")
  done
  local ma mb; ma=$(printf '%s\n' "${ta[@]}" | median); mb=$(printf '%s\n' "${tb[@]}" | median)
  printf '%-44s %8s MB/s %8s MB/s  %5.2fx\n' "$name" "$(mbps "$ma")" "$(mbps "$mb")" "$(echo "$mb / $ma" | bc -l)"
}
printf '%-44s %13s %13s  %s\n' "" "csi-nbd" "reference" "ratio"
row "file: nbdcopy read, 1 connection" "nbdcopy --connections=1 @ null:" "$(uri "$tmp/csi.sock")" "$(uri "$tmp/kit.sock")"
row "file: nbdcopy read, 4 connections" "nbdcopy --connections=4 --threads=4 @ null:" "$(uri "$tmp/csi.sock")" "$(uri "$tmp/kit.sock")"
row "file: nbdcopy write, 4 connections" "nbdcopy --connections=4 --threads=4 $tmp/src @" "$(uri "$tmp/csi.sock")" "$(uri "$tmp/kit.sock")"
row "nbd proxy vs nbdkit memory direct: read" "nbdcopy --connections=4 --threads=4 @ null:" "$(uri "$tmp/proxy.sock")" "$(uri "$tmp/mem.sock")"
row "nbd proxy vs nbdkit nbd-plugin proxy: read" "nbdcopy --connections=4 --threads=4 @ null:" "$(uri "$tmp/proxy.sock")" "$(uri "$tmp/kitproxy.sock")"
row "nbd proxy vs nbdkit nbd-plugin proxy: write" "nbdcopy --connections=4 --threads=4 $tmp/src @" "$(uri "$tmp/proxy.sock")" "$(uri "$tmp/kitproxy.sock")"
ia=() ib=() pa=() pb=()
for _ in $(seq "$rounds"); do
  ia+=("$(iops "$(uri "$tmp/csi.sock")")"); ib+=("$(iops "$(uri "$tmp/kit.sock")")")
  pa+=("$(iops "$(uri "$tmp/proxy.sock")")"); pb+=("$(iops "$(uri "$tmp/kitproxy.sock")")")
done
for pair in "file: fio 4k randread depth 1 (IOPS)|ia|ib" "nbd proxy vs nbdkit proxy: fio 4k depth 1|pa|pb"; do
  IFS='|' read -r name x y <<<"$pair"
  eval "a=\$(printf '%s\n' \"\${$x[@]}\" | median); b=\$(printf '%s\n' \"\${$y[@]}\" | median)"
  printf '%-44s %8s IOPS %8s IOPS  %5.2fx\n' "$name" "$a" "$b" "$(echo "$a / $b" | bc -l)"
done
