#!/usr/bin/env bash
# Measures a live limit change end to end: a memory volume with the rate
# filter served over NBD, four readers, limits changed through a
# VolumeAttributesClass and PVC annotations on a real etcd + kube-apiserver
# (hack/kube-testenv.sh), the node's watcher applying them. Prints the
# delay from the object update to the new limit and the steady throughput
# against each new limit.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
hack/kube-testenv.sh >/dev/null
CSI_NBD_MEASURE=1 go test -count=1 -run '^TestMeasureLiveLimits$' -v ./pkg/kube 2>&1 | grep -E 'measure_test|^(---|ok|FAIL)'
