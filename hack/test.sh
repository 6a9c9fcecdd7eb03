#!/usr/bin/env bash
# The whole test suite: static checks, every Go test under the race detector
# (real NBD clients included), and a short run of every fuzz target over its
# committed corpus. FUZZTIME=0 skips the fuzzing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

hack/deps.sh
export PATH=${TOOLS_CACHE:-/var/cache/csi-nbd/tools}/bin:$PATH

echo "== gofmt, go vet"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$unformatted" ]; then
  echo "gofmt needed: $unformatted" >&2
  exit 1
fi
go vet ./...

echo "== go test -race"
go test -race -count=1 -timeout 20m ./...
# Again through the server's inline path (Caps.Fast devices), for the tests
# whose devices never block.
NBD_TEST_INLINE=1 go test -race -count=1 -timeout 10m \
  -run 'Nbdinfo|Nbdcopy|Qemu|Fio|Libnbd|Extended|RawPipelined|RawStructured|RawTransmissionErrors|RawWriteOverMax|RawUnaligned|RawDevicePanic|RawBlockStatus|RawDeviceErrors|RawErrnoMapping|TLSOn' \
  ./pkg/nbd

FUZZTIME=${FUZZTIME:-10s}

# fuzz_one fuzzes one target. Go's fuzzer sometimes ends a run with a bare
# "context deadline exceeded" when the time is up while a worker is still
# on an input (a loaded machine); that is no finding, so such a run, and
# only such a run, is tried once more.
fuzz_one() {
  local out
  if out=$(go test -run '^$' -fuzz "^$2\$" -fuzztime "$FUZZTIME" "$1" 2>&1); then
    echo "$2: $(echo "$out" | tail -1)"
    return 0
  fi
  if echo "$out" | grep -q 'context deadline exceeded' && ! echo "$out" | grep -q 'Failing input written'; then
    echo "$2: fuzzer stopped on its deadline mid-input; once more"
    go test -run '^$' -fuzz "^$2\$" -fuzztime "$FUZZTIME" "$1"
    return
  fi
  echo "$out"
  return 1
}
if [ "$FUZZTIME" != 0 ]; then
  echo "== fuzzing, $FUZZTIME per target"
  for pkg in $(go list ./...); do
    dir=$(go list -f '{{.Dir}}' "$pkg")
    for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
      fuzz_one "$pkg" "$target"
    done
  done
fi
hack/verify-chart.sh

# test/e2e: the chart in a real single-node Kubernetes (root only; see the
# README). E2E=auto (default) runs it when its binaries are cached, or when
# building them (~15 minutes on a fresh machine) still fits: this script has
# run for under 20 minutes. E2E=1 always runs it, E2E=0 never.
E2E=${E2E:-auto}
if [ "$E2E" != 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "== test/e2e skipped: needs root"
elif [ "$E2E" = 1 ] || { [ "$E2E" = auto ] && { test/e2e/e2e.sh cached || [ $SECONDS -lt 1200 ]; }; }; then
  echo "== test/e2e"
  test/e2e/e2e.sh
elif [ "$E2E" = auto ]; then
  echo "== test/e2e skipped: its binaries are not cached and this run is ${SECONDS}s old (E2E=1 forces it)"
fi
