package nbdremote

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/internal/devtest"
	"github.com/csi-nbd/csi-nbd/internal/testserver"
	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

var ctx = context.Background()

// nbdkit is an nbdkit process serving on 127.0.0.1:port.
type nbdkit struct {
	t      testing.TB
	port   int
	args   []string
	cmd    *exec.Cmd
	exited chan error
}

// startNbdkit runs `nbdkit -f -i 127.0.0.1 -p PORT ARGS` and waits until
// it listens (it writes its pid file only then).
func startNbdkit(t testing.TB, port int, args ...string) *nbdkit {
	t.Helper()
	testserver.RequireTool(t, "nbdkit")
	k := &nbdkit{t: t, port: port, args: args}
	k.start()
	t.Cleanup(k.kill)
	return k
}

func (k *nbdkit) start() {
	k.t.Helper()
	pid := filepath.Join(k.t.TempDir(), "pid")
	args := append([]string{"-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", strconv.Itoa(k.port), "-P", pid}, k.args...)
	k.cmd = exec.Command("nbdkit", args...)
	k.cmd.Stderr = os.Stderr
	if err := k.cmd.Start(); err != nil {
		k.t.Fatal(err)
	}
	k.exited = make(chan error, 1)
	go func(c *exec.Cmd, ch chan error) { ch <- c.Wait() }(k.cmd, k.exited)
	for {
		if _, err := os.Stat(pid); err == nil {
			return
		}
		select {
		case err := <-k.exited:
			k.cmd = nil
			k.t.Fatalf("nbdkit %v exited: %v", k.args, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// kill SIGKILLs nbdkit (a crash: no goodbye to its clients) and reaps it,
// which frees its port.
func (k *nbdkit) kill() {
	if k.cmd == nil {
		return
	}
	k.cmd.Process.Kill()
	<-k.exited
	k.cmd = nil
}

func (k *nbdkit) uri() string { return "nbd://" + testserver.Addr(k.port) + "/" }

// openSpec parses and opens spec, closing it at the end of the test.
func openSpec(t *testing.T, spec string, env backends.Env) *Device {
	t.Helper()
	return devtest.Open(t, spec, env).(*Device)
}

func isErr(err error, target error) bool { return errors.Is(err, target) }
