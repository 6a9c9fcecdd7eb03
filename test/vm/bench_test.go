package vm

import (
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
)

// BenchmarkKernelAttachVsNbdClient boots the VM once and runs the same fio
// jobs (4k random read at depth 1 and 32, 4k random write at depth 32,
// 1 MiB sequential write at depth 8) against a memory volume attached by
// csi-nbd attach and against nbdkit's memory plugin attached by
// nbd-client, and reports csi-nbd ÷ nbdkit for each. Emulation (TCG) makes
// absolute figures meaningless; the ratios compare the two on equal terms.
//
//	go test -run '^$' -bench KernelAttach -benchtime 1x ./test/vm
func BenchmarkKernelAttachVsNbdClient(b *testing.B) {
	qemu := testserver.RequireTool(b, "qemu-system-x86_64")
	extra := map[string]string{}
	for _, tool := range []string{"fio", "nbd-client", "nbdkit"} {
		extra["usr/bin/"+tool] = testserver.RequireTool(b, tool)
	}
	plugin := "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-memory-plugin.so"
	extra[strings.TrimPrefix(plugin, "/")] = plugin
	vmlinuz, modules := kernel(b)
	root := repoRoot(b)
	bin := filepath.Join(b.TempDir(), "csi-nbd")
	goBuild(b, root, bin, "build", "-trimpath", "-o", bin, "./cmd/csi-nbd")
	extra["bin/csi-nbd"] = bin
	initrd := buildInitramfs(b, modules, "bench.sh", extra)
	b.ResetTimer()
	var results map[string]map[string]float64
	for i := 0; i < b.N; i++ {
		lines, ok := bootVM(b, qemu, vmlinuz, initrd, 10*time.Minute)
		if !ok {
			b.Fatal("benchmark guest failed")
		}
		for _, l := range lines {
			b.Log(l)
		}
		results = parseBench(b, lines)
	}
	b.StopTimer()
	ours, theirs := results["csi-nbd"], results["nbdkit+nbd-client"]
	for _, job := range []string{"randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd32", "write-1m-qd8"} {
		if ours[job] == 0 || theirs[job] == 0 {
			b.Fatalf("no figures for %s: %v", job, results)
		}
		b.Logf("%-18s csi-nbd %8.0f IOPS, nbdkit+nbd-client %8.0f IOPS: %.2fx", job, ours[job], theirs[job], ours[job]/theirs[job])
		b.ReportMetric(ours[job]/theirs[job], job+"-ratio")
	}
}

// parseBench reads "VMBENCH target job terse" lines: fio terse v3 has
// read IOPS in field 8 and write IOPS in field 49.
func parseBench(b *testing.B, lines []string) map[string]map[string]float64 {
	out := map[string]map[string]float64{}
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) < 4 || f[0] != "VMBENCH" {
			continue
		}
		terse := strings.Split(strings.Join(f[3:], " "), ";")
		if len(terse) < 49 {
			b.Fatalf("short fio terse line: %s", l)
		}
		r, _ := strconv.ParseFloat(terse[7], 64)
		w, _ := strconv.ParseFloat(terse[48], 64)
		if out[f[1]] == nil {
			out[f[1]] = map[string]float64{}
		}
		out[f[1]][f[2]] = r + w
	}
	return out
}
