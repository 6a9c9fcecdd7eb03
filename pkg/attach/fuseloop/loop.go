package fuseloop

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	loopControl = "/dev/loop-control"
	sysBlock    = "/sys/block"
	// markerPrefix starts the lo_file_name of every loop device we
	// configure; the rest names the directory (hashed) and the file.
	markerPrefix = "csi-nbd:"
)

// loopMarker is the lo_file_name identifying our loop devices for dir.
// lo_file_name holds 63 bytes; the name is cut to fit, the dir part is
// what CleanupStale matches.
func loopMarker(dir, name string) string {
	m := dirMarker(dir) + name
	if len(m) > unix.LO_NAME_SIZE-1 {
		m = m[:unix.LO_NAME_SIZE-1]
	}
	return m
}

// dirMarker is "csi-nbd:<24 hex digits of sha256(dir)>:".
func dirMarker(dir string) string {
	sum := sha256.Sum256([]byte(dir))
	return markerPrefix + hex.EncodeToString(sum[:12]) + ":"
}

// loopDev is one configured loop device, held open.
type loopDev struct {
	index int
	f     *os.File
}

func (l *loopDev) path() string { return loopPath(l.index) }

func loopPath(index int) string { return "/dev/loop" + strconv.Itoa(index) }

// configureLoop attaches a free loop device to backing in one step
// (LOOP_CONFIGURE). Another process may take the free device between our
// LOOP_CTL_GET_FREE and LOOP_CONFIGURE (EBUSY); then we ask again, as
// losetup does.
func configureLoop(ctx context.Context, backing int, blockSize uint32, readOnly bool, marker string) (*loopDev, error) {
	ctl, err := os.OpenFile(loopControl, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("loop control: %w", err)
	}
	defer ctl.Close()

	var cfg unix.LoopConfig
	cfg.Fd = uint32(backing)
	cfg.Size = blockSize
	// AUTOCLEAR: the loop detaches itself on its last close. We hold a
	// descriptor for the life of the attachment, so this only matters
	// after we died: the loop then goes away with its last user instead
	// of lingering over a dead FUSE file.
	cfg.Info.Flags = unix.LO_FLAGS_DIRECT_IO | unix.LO_FLAGS_AUTOCLEAR
	if readOnly {
		cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	copy(cfg.Info.File_name[:unix.LO_NAME_SIZE-1], marker)

	mode := os.O_RDWR
	if readOnly {
		mode = os.O_RDONLY
	}
	var lastErr error
	for try := 0; try < 16; try++ {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		index, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("loop control: get free device: %w", err)
		}
		f, err := os.OpenFile(loopPath(index), mode, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", loopPath(index), err)
		}
		err = unix.IoctlLoopConfigure(int(f.Fd()), &cfg)
		if err == nil {
			return &loopDev{index: index, f: f}, nil
		}
		f.Close()
		if !errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("configure %s: %w", loopPath(index), err)
		}
		lastErr = err
	}
	return nil, fmt.Errorf("no free loop device after 16 tries: %w", lastErr)
}

// loopInfo is what sysfs says about one bound loop device.
type loopInfo struct {
	index   int
	backing string // backing file path as the kernel prints it
	dio     bool
}

// readLoopInfo returns the state of loop device index; ok is false when
// it is not bound to a file.
func readLoopInfo(index int) (info loopInfo, ok bool) {
	dir := filepath.Join(sysBlock, "loop"+strconv.Itoa(index), "loop")
	b, err := os.ReadFile(filepath.Join(dir, "backing_file"))
	if err != nil {
		return loopInfo{}, false
	}
	info = loopInfo{index: index, backing: strings.TrimSuffix(string(b), "\n")}
	if d, err := os.ReadFile(filepath.Join(dir, "dio")); err == nil {
		info.dio = strings.TrimSpace(string(d)) == "1"
	}
	return info, true
}

// loopIndexes lists the loop devices the kernel knows, bound or not.
func loopIndexes() ([]int, error) {
	ents, err := os.ReadDir(sysBlock)
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range ents {
		n, ok := strings.CutPrefix(e.Name(), "loop")
		if !ok {
			continue
		}
		if i, err := strconv.Atoi(n); err == nil && i >= 0 {
			out = append(out, i)
		}
	}
	return out, nil
}

// loopFileName reads lo_file_name of a loop device (LOOP_GET_STATUS64, as
// losetup -a does). Opening read-only changes nothing on the device.
func loopFileName(index int) (string, error) {
	f, err := os.OpenFile(loopPath(index), os.O_RDONLY, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return "", err
	}
	name := st.File_name[:]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return string(name), nil
}

// clearLoop asks the kernel to detach loop index once its last user
// closes it (LOOP_CLR_FD only marks a device in use for autoclear).
func clearLoop(index int) error {
	f, err := os.OpenFile(loopPath(index), os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("%s: LOOP_CLR_FD: %w", loopPath(index), err)
	}
	return nil
}

// isOurs reports whether loop index is bound and ours for dir: its
// backing file lies under dir, or (once the FUSE mount was lazily
// unmounted and the path no longer says so) its lo_file_name carries our
// marker for dir.
func isOurs(index int, dir string) (loopInfo, bool) {
	info, ok := readLoopInfo(index)
	if !ok {
		return info, false
	}
	if under(info.backing, dir) && info.backing != dir {
		return info, true
	}
	name, err := loopFileNameTimeout(index, statusTimeout)
	return info, err == nil && strings.HasPrefix(name, dirMarker(dir))
}

// statusTimeout bounds LOOP_GET_STATUS64 on loop devices that may not be
// ours: the kernel stats the backing file for it, which never returns if
// that file lives on a FUSE or network file system whose server hangs.
const statusTimeout = 2 * time.Second

// loopFileNameTimeout is loopFileName giving up after d; the stuck call,
// if any, is left behind (it is uninterruptible) rather than hanging the
// caller.
func loopFileNameTimeout(index int, d time.Duration) (string, error) {
	type result struct {
		name string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		name, err := loopFileName(index)
		ch <- result{name, err}
	}()
	select {
	case r := <-ch:
		return r.name, r.err
	case <-time.After(d):
		return "", fmt.Errorf("%s: LOOP_GET_STATUS64 did not return within %v (backing file unreachable?)", loopPath(index), d)
	}
}

// waitLoopGone waits until loop index is no longer ours for dir (the
// kernel may finish detaching after the last close returns).
func waitLoopGone(ctx context.Context, index int, dir string) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		if _, ours := isOurs(index, dir); !ours {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s is still in use (open or mounted): it detaches when its last user closes it: %w",
				loopPath(index), ctx.Err())
		case <-t.C:
		}
	}
}
