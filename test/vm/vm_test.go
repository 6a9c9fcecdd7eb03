package vm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
)

// cacheDir holds the Debian kernel, fetched once per machine, outside the
// checkout.
func cacheDir() string {
	if d := os.Getenv("CSI_NBD_VM_CACHE"); d != "" {
		return d
	}
	return "/var/cache/csi-nbd/vm"
}

// repoRoot is the module root (the test runs in test/vm).
func repoRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// kernel fetches (once) the package linux-image-amd64 depends on and
// returns the directory it is unpacked in.
func kernel(t testing.TB) (vmlinuz, modules string) {
	t.Helper()
	testserver.RequireTool(t, "apt-get")
	testserver.RequireTool(t, "dpkg-deb")
	out, err := exec.Command("apt-cache", "depends", "linux-image-amd64").Output()
	if err != nil {
		t.Fatalf("apt-cache depends linux-image-amd64: %v", err)
	}
	m := regexp.MustCompile(`Depends: (linux-image-[0-9][^\s]*)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no kernel package in: %s", out)
	}
	pkg := string(m[1])
	dir := filepath.Join(cacheDir(), pkg)
	if _, err := os.Stat(filepath.Join(dir, ".unpacked")); err != nil {
		if err := os.MkdirAll(cacheDir(), 0o755); err != nil {
			t.Fatal(err)
		}
		debs, _ := filepath.Glob(filepath.Join(cacheDir(), pkg+"_*.deb"))
		if len(debs) == 0 {
			t.Logf("downloading %s into %s (once per machine)", pkg, cacheDir())
			cmd := exec.Command("apt-get", "download", "-o", "APT::Sandbox::User=root", pkg)
			cmd.Dir = cacheDir()
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("apt-get download %s: %v\n%s", pkg, err, out)
			}
			debs, _ = filepath.Glob(filepath.Join(cacheDir(), pkg+"_*.deb"))
		}
		if len(debs) == 0 {
			t.Fatalf("no %s .deb in %s", pkg, cacheDir())
		}
		tmp, err := os.MkdirTemp(cacheDir(), ".unpack-")
		if err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("dpkg-deb", "-x", debs[0], tmp).CombinedOutput(); err != nil {
			os.RemoveAll(tmp)
			t.Fatalf("dpkg-deb -x: %v\n%s", err, out)
		}
		os.WriteFile(filepath.Join(tmp, ".unpacked"), nil, 0o644)
		if err := os.Rename(tmp, dir); err != nil {
			os.RemoveAll(tmp) // another test process won the race
		}
	}
	vmlinuzes, _ := filepath.Glob(filepath.Join(dir, "boot", "vmlinuz-*"))
	mods, _ := filepath.Glob(filepath.Join(dir, "lib", "modules", "*"))
	if len(vmlinuzes) != 1 || len(mods) != 1 {
		t.Fatalf("unexpected kernel package layout in %s", dir)
	}
	return vmlinuzes[0], mods[0]
}

// sharedLibs lists what the dynamic loader needs for bin (ldd's view).
func sharedLibs(t testing.TB, bin string) []string {
	t.Helper()
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		return nil // a static binary ("not a dynamic executable")
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		for _, w := range f {
			if strings.HasPrefix(w, "/") {
				libs = append(libs, w)
			}
		}
	}
	return libs
}

func goBuild(t testing.TB, root, out string, args ...string) {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, b)
	}
}

// guestModules are what the guest loads: ext4 and its dependencies, and
// nbd (which csi-nbd attach loads itself, through modprobe).
var guestModules = []string{
	"lib/crc16.ko", "crypto/crc32c_generic.ko", "fs/mbcache.ko", "fs/jbd2/jbd2.ko",
	"fs/ext4/ext4.ko", "drivers/block/nbd.ko",
}

// buildInitramfs assembles the guest: busybox, mke2fs, the modules, our
// static binaries and guest.sh as /init.
func buildInitramfs(t testing.TB, modules, initScript string, extra map[string]string) string {
	t.Helper()
	busybox := testserver.RequireTool(t, "busybox")
	mke2fs := testserver.RequireTool(t, "mke2fs")
	tr := newTree()
	tr.files["bin/busybox"] = busybox
	tr.files["sbin/mke2fs"] = mke2fs
	tr.symlinks["sbin/mkfs.ext4"] = "mke2fs"
	for _, l := range sharedLibs(t, mke2fs) {
		tr.files[l] = l
	}
	tr.files["etc/mke2fs.conf"] = "/etc/mke2fs.conf"
	kver := filepath.Base(modules)
	for _, m := range guestModules {
		tr.files[filepath.Join("lib/modules", kver, "kernel", m)] = filepath.Join(modules, "kernel", m)
	}
	for guest, host := range extra {
		tr.files[guest] = host
		if strings.Contains(guest, "bin/") || strings.HasSuffix(guest, ".so") {
			for _, l := range sharedLibs(t, host) {
				tr.files[l] = l
			}
		}
	}
	guest, err := os.ReadFile(initScript)
	if err != nil {
		t.Fatal(err)
	}
	tr.data["init"] = guest
	tr.modes["init"] = 0o755
	for _, d := range []string{"proc", "sys", "dev", "tmp", "mnt", "run"} {
		tr.data[d+"/.keep"] = nil
	}
	path := filepath.Join(t.TempDir(), "initrd.gz")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	zw, _ := gzip.NewWriterLevel(f, gzip.BestSpeed)
	if err := tr.write(zw); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestKernelAttachInVM boots the Debian kernel with our binary and runs
// guest.sh: memory volumes with 1 and 4 connections through mkfs, mount,
// write, verify, trim, detach; then a file volume whose server is killed
// mid-write and re-served by `csi-nbd attach --resume`.
func TestKernelAttachInVM(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	qemu := testserver.RequireTool(t, "qemu-system-x86_64")
	vmlinuz, modules := kernel(t)
	root := repoRoot(t)
	bin := filepath.Join(t.TempDir(), "csi-nbd")
	goBuild(t, root, bin, "build", "-trimpath", "-o", bin, "./cmd/csi-nbd")
	attachTest := filepath.Join(t.TempDir(), "attach.test")
	goBuild(t, root, attachTest, "test", "-c", "-o", attachTest, "./pkg/attach")
	extra := map[string]string{"bin/csi-nbd": bin, "bin/attach.test": attachTest, "bin/csi-sanity": csiSanity(t)}
	for guest, tool := range sanityTools {
		extra[guest] = testserver.RequireTool(t, tool)
	}
	initrd := buildInitramfs(t, modules, "guest.sh", extra)

	lines, ok := bootVM(t, qemu, vmlinuz, initrd, 8*time.Minute)
	for _, l := range lines {
		t.Log(l)
	}
	if !ok {
		t.Fatal("guest failed")
	}
	checkSanity(t, lines)
}

// csiSanityVersion is the csi-sanity the guest runs (as hack/deps.sh pins).
const csiSanityVersion = "v5.6.0"

// csiSanity builds csi-sanity statically (the guest has no libc for a
// cgo binary) once per machine into the VM cache and returns its path.
func csiSanity(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(cacheDir(), "csi-sanity-"+csiSanityVersion)
	bin := filepath.Join(dir, "csi-sanity")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	tmp := filepath.Join(t.TempDir(), "bin")
	cmd := exec.Command("go", "install", "-trimpath", "-ldflags=-s -w",
		"github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@"+csiSanityVersion)
	cmd.Dir = t.TempDir() // outside our module: go install pkg@version
	modcache, _ := exec.Command("go", "env", "GOMODCACHE").Output()
	goproxy, _ := exec.Command("go", "env", "GOPROXY").Output()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOBIN="+tmp, "GOFLAGS=",
		// The module cache first: it usually holds csi-test already
		// (hack/deps.sh installs it), so no network is needed.
		"GOPROXY=file://"+filepath.Join(strings.TrimSpace(string(modcache)), "cache", "download")+","+strings.TrimSpace(string(goproxy)))
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building csi-sanity %s: %v\n%s", csiSanityVersion, err, out)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(tmp, "csi-sanity"), bin); err != nil {
		// A cross-device rename: copy through the cache directory.
		b, rerr := os.ReadFile(filepath.Join(tmp, "csi-sanity"))
		if rerr != nil {
			t.Fatal(rerr)
		}
		part := bin + ".part"
		if err := os.WriteFile(part, b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(part, bin); err != nil {
			t.Fatal(err)
		}
	}
	return bin
}

// sanityTools are what the node service runs through k8s.io/mount-utils,
// as util-linux and e2fsprogs ship them (busybox's blkid knows no -p and
// no -o export): guest path → tool name on this host. The guest puts
// /usr/sbin and /usr/bin first on the driver's PATH only, so the attach
// tests above keep running on busybox alone.
var sanityTools = map[string]string{
	"usr/bin/mount":      "mount",
	"usr/bin/umount":     "umount",
	"usr/sbin/blkid":     "blkid",
	"usr/sbin/fsck":      "fsck", // SafeFormatAndMount checks ext4 before mounting
	"usr/sbin/e2fsck":    "e2fsck",
	"usr/sbin/fsck.ext4": "e2fsck",
	"usr/sbin/resize2fs": "resize2fs",
}

// sanityLine is the guest's summary of one csi-sanity run.
var sanityLine = regexp.MustCompile(`^VMTEST: csi-sanity (\w+): .*?(\d+) Passed \| (\d+) Failed \| (\d+) Pending \| (\d+) Skipped`)

// checkSanity fails the test unless the guest reported a csi-sanity run
// without failures for both access types.
func checkSanity(t *testing.T, lines []string) {
	t.Helper()
	results, problems := sanityResults(lines)
	for _, r := range results {
		t.Log(r)
	}
	for _, p := range problems {
		t.Error(p)
	}
}

// sanityResults reads the guest's csi-sanity summaries: one line per run
// for the log, and what is wrong (a failed spec, nothing passed, a run
// missing).
func sanityResults(lines []string) (results, problems []string) {
	seen := map[string]bool{}
	for _, l := range lines {
		m := sanityLine.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		seen[m[1]] = true
		results = append(results, fmt.Sprintf("csi-sanity in the VM, %s: %s passed, %s failed, %s pending, %s skipped", m[1], m[2], m[3], m[4], m[5]))
		if m[3] != "0" {
			problems = append(problems, fmt.Sprintf("csi-sanity %s: %s specs failed", m[1], m[3]))
		}
		if m[2] == "0" {
			problems = append(problems, fmt.Sprintf("csi-sanity %s: no spec passed", m[1]))
		}
	}
	for _, access := range []string{"mount", "block"} {
		if !seen[access] {
			problems = append(problems, "the guest printed no csi-sanity summary for access type "+access)
		}
	}
	return results, problems
}

// bootVM runs the guest and returns its "VMTEST" lines; ok when it printed
// VMTEST PASS and no VMTEST FAIL (the console's tail is logged then).
func bootVM(t testing.TB, qemu, vmlinuz, initrd string, limit time.Duration) (lines []string, ok bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	logPath := filepath.Join(t.TempDir(), "console.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.CommandContext(ctx, qemu,
		"-accel", "tcg,thread=multi", "-smp", "1", "-m", "1024",
		"-nographic", "-no-reboot", "-nic", "none",
		"-kernel", vmlinuz, "-initrd", initrd,
		"-append", "console=ttyS0 rdinit=/init panic=-1 quiet")
	cmd.Stdout = logf
	cmd.Stderr = logf
	start := time.Now()
	runErr := cmd.Run()
	out, _ := os.ReadFile(logPath)
	t.Logf("VM ran %v", time.Since(start).Round(time.Second))
	var (
		pass  bool
		fails []string
	)
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		// The firmware's escape sequences may precede the first line.
		if i := strings.Index(line, "VMTEST"); i > 0 {
			line = line[i:]
		} else if i := strings.Index(line, "VMBENCH"); i > 0 {
			line = line[i:]
		}
		switch {
		case strings.HasPrefix(line, "VMTEST PASS"):
			pass = true
		case strings.HasPrefix(line, "VMTEST FAIL"):
			fails = append(fails, line)
		case strings.HasPrefix(line, "VMTEST"), strings.HasPrefix(line, "VMBENCH"):
			lines = append(lines, line)
		}
	}
	if !pass || len(fails) > 0 {
		t.Logf("guest failed (qemu: %v): %v\n--- console ---\n%s", runErr, fails, tail(out, 150))
		return lines, false
	}
	return lines, true
}

func tail(b []byte, lines int) string {
	s := strings.Split(string(b), "\n")
	if len(s) > lines {
		s = s[len(s)-lines:]
	}
	return strings.Join(s, "\n")
}
