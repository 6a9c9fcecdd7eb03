package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/attach/fuseloop"
	"github.com/csi-nbd/csi-nbd/pkg/fdstore"
)

// runTestWriter is the application of TestAttachFuseLoopSurvivesSIGKILL,
// a process of its own: it writes files into dir, fsyncs each, and prints
// "name sha256" once the fsync returned, until stdin closes. Any error is
// printed as "ERROR ..." and ends it with status 1.
func runTestWriter(dir string) int {
	stop := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for i := 0; ; i++ {
		select {
		case <-stop:
			return 0
		default:
		}
		data := bytes.Repeat([]byte(fmt.Sprintf("file %d of the writer ", i)), 2000+i%13*500)
		name := filepath.Join(dir, fmt.Sprintf("f%05d", i))
		f, err := os.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
		if err == nil {
			_, err = f.Write(data)
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		if err != nil {
			fmt.Fprintf(out, "ERROR %s: %v\n", name, err)
			return 1
		}
		sum := sha256.Sum256(data)
		fmt.Fprintf(out, "%s %s\n", name, hex.EncodeToString(sum[:]))
		out.Flush()
	}
}

// bgProcess is a started process with its output collected.
type bgProcess struct {
	cmd    *exec.Cmd
	stdout io.ReadCloser
	stderr *syncBuffer
	stdin  io.WriteCloser
	waited chan error
}

func startBG(t *testing.T, env []string, name string, args ...string) *bgProcess {
	t.Helper()
	p := &bgProcess{cmd: exec.Command(name, args...), stderr: &syncBuffer{}, waited: make(chan error, 1)}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = p.stderr
	var err error
	if p.stdout, err = p.cmd.StdoutPipe(); err != nil {
		t.Fatal(err)
	}
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.waited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		select {
		case <-p.waited:
			p.waited <- nil
		case <-time.After(30 * time.Second):
			t.Errorf("%s does not exit after SIGKILL (stuck in the kernel?): %s", p.cmd.Args, kernelStacks(p.cmd.Process.Pid))
		}
	})
	return p
}

// kernelStacks is where pid's threads wait in the kernel, for diagnosing
// hangs.
func kernelStacks(pid int) string {
	var b strings.Builder
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	for _, task := range tasks {
		st, _ := os.ReadFile(filepath.Join(task, "stack"))
		wchan, _ := os.ReadFile(filepath.Join(task, "wchan"))
		fmt.Fprintf(&b, "\n%s (%s):\n%s", task, wchan, st)
	}
	return b.String()
}

// firstLine reads the first line the process prints, or fails with its
// stderr.
func (p *bgProcess) firstLine(t *testing.T, r *bufio.Reader) string {
	t.Helper()
	ch := make(chan string, 1)
	go func() {
		l, _ := r.ReadString('\n')
		ch <- strings.TrimSpace(l)
	}()
	select {
	case l := <-ch:
		if l == "" {
			t.Fatalf("%s printed nothing; stderr:\n%s", p.cmd.Args, p.stderr.String())
		}
		return l
	case <-time.After(60 * time.Second):
		t.Fatalf("%s printed nothing in 60s; stderr:\n%s", p.cmd.Args, p.stderr.String())
	}
	return ""
}

// A node plugin (here csi-nbd attach, the same Manager) serving a
// FUSE+loop volume with an fd store is SIGKILLed while an application
// writes and fsyncs files on the mounted file system; a new one resumes
// in place. The application sees no error, every fsynced file reads back
// intact, and detaching afterwards leaves nothing behind.
func TestAttachFuseLoopSurvivesSIGKILL(t *testing.T) {
	if err := fuseloop.Available(); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("FUSE+loop is required in CI: %v", err)
		}
		t.Skip(err)
	}
	mkfs := testserver.RequireTool(t, "mkfs.ext4")
	bin := realBinary(t)
	tmp := t.TempDir()
	sock := filepath.Join(tmp, "fds.sock")
	state := filepath.Join(tmp, "state")
	img := filepath.Join(tmp, "disk.img")
	spec := "size=256Mi;file://" + img

	// A hang (I/O nobody serves) would otherwise wait for the test
	// binary's timeout, and leave only Go stacks: say where the
	// processes wait in the kernel first.
	var watched sync.Map // pid → name
	watchdog := time.AfterFunc(4*time.Minute, func() {
		var b strings.Builder
		watched.Range(func(k, v any) bool {
			fmt.Fprintf(&b, "\n== %s (pid %d)%s", v, k, kernelStacks(k.(int)))
			return true
		})
		panic("TestAttachFuseLoopSurvivesSIGKILL hangs; kernel stacks:" + b.String())
	})
	defer watchdog.Stop()
	watch := func(p *bgProcess, name string) *bgProcess {
		watched.Store(p.cmd.Process.Pid, name)
		return p
	}

	store := watch(startBG(t, nil, bin, "fdstore", "--socket", sock), "fdstore")
	waitFor(t, "the fd store's socket", func() bool { _, err := os.Stat(sock); return err == nil })

	attachArgs := []string{"attach", "--fallback", "always", "--fd-store", sock, "--state-dir", state}
	server := watch(startBG(t, nil, bin, append(attachArgs, "--id", "vol", spec)...), "attach")
	dev := server.firstLine(t, bufio.NewReader(server.stdout))
	if !strings.HasPrefix(dev, "/dev/loop") {
		t.Fatalf("attach printed %q", dev)
	}
	mnt := filepath.Join(tmp, "mnt")
	os.Mkdir(mnt, 0o700)
	if out, err := exec.Command(mkfs, "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v\n%s", err, out)
	}
	if err := unix.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		t.Fatal(err)
	}
	mounted := true
	defer func() {
		if mounted {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	}()

	// The application.
	writer := watch(startBG(t, []string{"CSI_NBD_TEST_WRITER=" + mnt}, os.Args[0], "-test.run=^$"), "writer")
	var (
		mu     sync.Mutex
		synced = map[string]string{}
		failed string
	)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		sc := bufio.NewScanner(writer.stdout)
		for sc.Scan() {
			l := sc.Text()
			mu.Lock()
			if strings.HasPrefix(l, "ERROR") {
				failed = l
			} else if name, sum, ok := strings.Cut(l, " "); ok {
				synced[name] = sum
			}
			mu.Unlock()
		}
	}()
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		if failed != "" {
			t.Fatalf("the application saw an error: %s", failed)
		}
		return len(synced)
	}
	waitWrites := func(n int) {
		t.Helper()
		target := count() + n
		waitFor(t, fmt.Sprintf("%d files written", target), func() bool { return count() >= target })
	}

	firstServed := regexp.MustCompile(`first request served after resuming" elapsed="([^"]+)"`)
	for round := range 2 {
		waitWrites(40)
		server.cmd.Process.Signal(syscall.SIGKILL)
		<-server.waited
		server.waited <- nil
		before := count()
		time.Sleep(500 * time.Millisecond) // the application waits, it does not fail
		stalled := count()

		start := time.Now()
		server = watch(startBG(t, nil, bin, append(attachArgs, "--resume")...), fmt.Sprintf("attach --resume #%d", round))
		if got := server.firstLine(t, bufio.NewReader(server.stdout)); got != dev {
			t.Fatalf("round %d: resumed %q, want %s", round, got, dev)
		}
		printed := time.Since(start)
		waitWrites(40)
		m := firstServed.FindStringSubmatch(server.stderr.String())
		first := "?"
		if m != nil {
			first = m[1]
		}
		t.Logf("round %d: %d files before the kill, %d while dead; restarted process re-served %s after %v (first request served %s after Resume began)",
			round, before, stalled-before, dev, printed.Round(time.Millisecond), first)
	}

	// Stop the application; it must have seen no error.
	writer.stdin.Close()
	select {
	case err := <-writer.waited:
		writer.waited <- err
		<-writerDone
		if err != nil {
			t.Fatalf("writer: %v\n%s", err, writer.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("writer did not stop")
	}
	n := count()

	// Read everything back from the device, not the page cache.
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, mnt, "ext4", unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	for name, want := range synced {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		if got := hex.EncodeToString(sum[:]); got != want {
			t.Errorf("%s: checksum %s, fsynced %s", name, got, want)
		}
	}
	mu.Unlock()
	t.Logf("%d fsynced files verified", n)
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false

	// Detach through the CLI: the serving process detaches and exits,
	// the store lets go, and nothing of ours is left.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, bin, "detach", "--state-dir", state, "--fd-store", sock, dev).CombinedOutput(); err != nil {
		t.Fatalf("detach: %v\n%s", err, out)
	}
	select {
	case err := <-server.waited:
		server.waited <- err
		if err != nil {
			t.Errorf("serving process: %v\n%s", err, server.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("serving process did not exit after detach")
	}
	if names, err := (&fdstore.Client{Socket: sock}).List(ctx); err != nil || len(names) != 0 {
		t.Errorf("fd store after detach: %q, %v", names, err)
	}
	fuseDir := filepath.Join(state, "fuse")
	if mounts, _ := os.ReadFile("/proc/self/mounts"); bytes.Contains(mounts, []byte(fuseDir)) {
		t.Errorf("a FUSE mount under %s is left", fuseDir)
	}
	waitFor(t, "the loop device detached", func() bool {
		b, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/backing_file")
		return err != nil || !strings.Contains(string(b), state)
	})
	store.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-store.waited:
		store.waited <- err
		if err != nil {
			t.Errorf("fd store: %v\n%s", err, store.stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Error("fd store did not stop on SIGTERM")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
