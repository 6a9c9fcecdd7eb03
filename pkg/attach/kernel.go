package attach

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/nbd"
	"github.com/csi-nbd/csi-nbd/pkg/nbd/netlink"
)

// kernel is the nbd driver as the Manager uses it; *netlink.Client in
// production, a userspace imitation in tests.
type kernel interface {
	Connect(ctx context.Context, cfg netlink.ConnectConfig) (uint32, error)
	Reconfigure(ctx context.Context, cfg netlink.ReconfigureConfig) error
	Disconnect(ctx context.Context, index uint32) error
	Status(ctx context.Context, index int) ([]netlink.DeviceStatus, error)
	WatchLinkDead(ctx context.Context) (<-chan uint32, error)
}

// ErrNoNBD is wrapped when the kernel has no nbd driver and it cannot be
// loaded.
var ErrNoNBD = errors.New("kernel nbd driver unavailable")

// openNetlink finds the nbd netlink family, loading the module once if it
// is missing. Containers see the host's modules when /lib/modules is
// mounted in; modprobe needs CAP_SYS_MODULE.
func openNetlink(ctx context.Context) (kernel, error) {
	c, err := netlink.Open(ctx)
	if err == nil {
		return c, nil
	}
	if !errors.Is(err, netlink.ErrNotAvailable) {
		return nil, err
	}
	out, merr := exec.CommandContext(ctx, "modprobe", "nbd").CombinedOutput()
	if merr != nil {
		return nil, fmt.Errorf("%w: %v; modprobe nbd: %v: %s", ErrNoNBD, err, merr, strings.TrimSpace(string(out)))
	}
	// The family registers as the module initialises; give it a moment.
	for i := 0; i < 20; i++ {
		if c, err = netlink.Open(ctx); err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("%w: modprobe nbd succeeded but: %v", ErrNoNBD, err)
}

// serverFlags are the transmission flags the kernel is told, as a server
// would announce them in the handshake.
func serverFlags(caps backends.Caps, readOnly bool) uint64 {
	f := uint64(nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA)
	if readOnly || caps.ReadOnly {
		f |= nbd.FlagReadOnly | nbd.FlagCanMultiConn
	} else {
		f |= nbd.FlagSendWriteZeroes
		if caps.Trim {
			f |= nbd.FlagSendTrim
		}
		if caps.MultiConn {
			f |= nbd.FlagCanMultiConn
		}
	}
	if caps.Rotational {
		f |= nbd.FlagRotational
	}
	return f
}

// blockSize is the logical block size for the device: the backend's
// minimum I/O, at least 512 (the kernel's floor), which keeps the device
// usable by anything that does 512-byte direct I/O when the backend allows.
func blockSize(caps backends.Caps) (uint64, error) {
	bs := uint64(512)
	for bs < uint64(caps.MinBlock) {
		bs <<= 1
	}
	if bs > 4096 {
		return 0, fmt.Errorf("backend minimum block size %d is larger than the kernel's page size limit 4096", caps.MinBlock)
	}
	return bs, nil
}

// sysBlock is where the kernel shows block devices; a variable for tests.
var sysBlock = "/sys/block"

// tuneQueue sets what matters for a device served from userspace: no I/O
// scheduler (the server has its own queues), not rotational unless the
// backend says so, and requests no larger than the backend likes. Best
// effort: a read-only /sys (some containers) only costs performance.
func tuneQueue(name string, caps backends.Caps) {
	q := filepath.Join(sysBlock, name, "queue")
	set := func(file, val string) {
		if err := os.WriteFile(filepath.Join(q, file), []byte(val), 0o644); err != nil {
			klog.V(2).InfoS("attach: queue tuning skipped", "device", name, "setting", file, "value", val, "err", err)
		}
	}
	set("scheduler", "none")
	if caps.Rotational {
		set("rotational", "1")
	} else {
		set("rotational", "0")
	}
	if kb := maxSectorsKB(q, caps); kb > 0 {
		set("max_sectors_kb", strconv.FormatUint(kb, 10))
	}
}

// maxRequestKB caps the request size the kernel sends (max_sectors_kb).
const maxRequestKB = 1024

// maxSectorsKB is the largest request size (KiB) not above the hardware
// limit and the backend's MaxBlock, a multiple of its preferred block.
func maxSectorsKB(queueDir string, caps backends.Caps) uint64 {
	b, err := os.ReadFile(filepath.Join(queueDir, "max_hw_sectors_kb"))
	if err != nil {
		return 0
	}
	hw, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || hw == 0 {
		return 0
	}
	// Bigger requests than the kernel's usual 1280 KiB only make the
	// server hold more memory per request and serialise what could have
	// been pipelined; 1 MiB unless the backend asks for less.
	kb := min(hw, maxRequestKB)
	if caps.MaxBlock >= 1024 {
		kb = min(kb, uint64(caps.MaxBlock)/1024)
	}
	if p := uint64(caps.PrefBlock) / 1024; p > 1 && kb >= p {
		kb -= kb % p
	}
	return kb
}

// syncDevice writes back the page cache of a block device and flushes it,
// before it is disconnected. Best effort and bounded: a dead device must
// not block a detach forever.
func syncDevice(ctx context.Context, path string) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return
		}
		defer f.Close()
		if err := f.Sync(); err != nil {
			klog.InfoS("attach: flushing the device before detach failed", "device", path, "err", err)
		}
	}()
	select {
	case <-done:
	case <-ctx.Done():
	case <-time.After(30 * time.Second):
		klog.InfoS("attach: flushing the device before detach takes too long; detaching anyway", "device", path)
	}
}

// findByBackend returns the index of the nbd device whose backend
// identifier is id, or -1: how a record written before CONNECT answered
// finds its device again.
func findByBackend(id string) int {
	ents, _ := os.ReadDir(sysBlock)
	for _, e := range ents {
		n := e.Name()
		if !strings.HasPrefix(n, "nbd") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(sysBlock, n, "backend"))
		if err != nil || strings.TrimSuffix(string(b), "\n") != id {
			continue
		}
		if i, err := strconv.Atoi(n[3:]); err == nil {
			return i
		}
	}
	return -1
}

// nbdPath is the device node of index i.
func nbdPath(i int) string { return "/dev/nbd" + strconv.Itoa(i) }

// ParseNBDPath returns the index of /dev/nbdN (or nbdN).
func ParseNBDPath(p string) (int, bool) {
	n := strings.TrimPrefix(filepath.Base(p), "nbd")
	if n == filepath.Base(p) || n == "" {
		return 0, false
	}
	i, err := strconv.Atoi(n)
	return i, err == nil && i >= 0
}

// Disconnect asks the kernel to tear down /dev/nbdN directly, without the
// serving process (which then sees NBD_CMD_DISC); for `csi-nbd detach`
// when no serving process is recorded.
func Disconnect(ctx context.Context, index int) error {
	k, err := openNetlink(ctx)
	if err != nil {
		return err
	}
	return k.Disconnect(ctx, uint32(index))
}
