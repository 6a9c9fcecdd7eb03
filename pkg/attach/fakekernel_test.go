package attach

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/nbd/netlink"
)

// fakeKernel imitates the nbd driver's netlink side in userspace: it takes
// its own references to the sockets it is given (as the kernel does) and
// lets tests speak the transmission phase on them, as the kernel would.
type fakeKernel struct {
	mu       sync.Mutex
	devs     map[uint32]*fakeDev
	next     uint32
	linkDead chan uint32
	reconfig []netlink.ReconfigureConfig
	// stillOpen keeps a disconnected device configured, as the kernel
	// does while someone still has it open (a mounted filesystem).
	stillOpen bool
}

type fakeDev struct {
	cfg       netlink.ConnectConfig
	socks     []*fakeSock
	connected bool
}

type fakeSock struct {
	c    net.Conn
	br   *bufio.Reader
	dead bool
	seq  uint64
}

func newFakeKernel() *fakeKernel {
	return &fakeKernel{devs: map[uint32]*fakeDev{}, linkDead: make(chan uint32, 8)}
}

func takeSocket(fd int) (*fakeSock, error) {
	nfd, err := unix.Dup(fd)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(nfd), "kernel-end")
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, err
	}
	return &fakeSock{c: c, br: bufio.NewReader(c)}, nil
}

func (k *fakeKernel) Connect(_ context.Context, cfg netlink.ConnectConfig) (uint32, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if cfg.Size == 0 || len(cfg.Sockets) == 0 {
		return 0, syscall.EINVAL
	}
	if len(cfg.Sockets) > 1 && cfg.ServerFlags&(1<<8) == 0 {
		return 0, syscall.EINVAL
	}
	d := &fakeDev{cfg: cfg, connected: true}
	for _, fd := range cfg.Sockets {
		s, err := takeSocket(fd)
		if err != nil {
			return 0, err
		}
		d.socks = append(d.socks, s)
	}
	idx := k.next
	k.next++
	k.devs[idx] = d
	return idx, nil
}

func (k *fakeKernel) Reconfigure(_ context.Context, cfg netlink.ReconfigureConfig) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devs[cfg.Index]
	if d == nil || !d.connected {
		return syscall.EINVAL
	}
	if d.cfg.BackendIdentifier != "" && cfg.BackendIdentifier != d.cfg.BackendIdentifier {
		return syscall.EINVAL
	}
	k.reconfig = append(k.reconfig, cfg)
	if cfg.Size != 0 {
		d.cfg.Size = cfg.Size
	}
	for _, fd := range cfg.Sockets {
		replaced := false
		for i, s := range d.socks {
			if s.dead {
				ns, err := takeSocket(fd)
				if err != nil {
					return err
				}
				d.socks[i] = ns
				replaced = true
				break
			}
		}
		if !replaced {
			break // -ENOSPC, reported as success; the kernel drops the rest
		}
	}
	return nil
}

func (k *fakeKernel) Disconnect(_ context.Context, index uint32) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devs[index]
	if d == nil {
		return syscall.EINVAL
	}
	for _, s := range d.socks {
		if !s.dead {
			var hdr [28]byte
			binary.BigEndian.PutUint32(hdr[0:], 0x25609513)
			binary.BigEndian.PutUint16(hdr[6:], 2) // NBD_CMD_DISC
			_, _ = s.c.Write(hdr[:])
			s.c.Close()
			s.dead = true
		}
	}
	d.connected = k.stillOpen
	return nil
}

func (k *fakeKernel) Status(_ context.Context, index int) ([]netlink.DeviceStatus, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devs[uint32(index)]
	if d == nil {
		return nil, nil
	}
	return []netlink.DeviceStatus{{Index: uint32(index), Connected: d.connected}}, nil
}

func (k *fakeKernel) WatchLinkDead(ctx context.Context) (<-chan uint32, error) {
	return k.linkDead, nil
}

// kill breaks connection i of device idx from the kernel's side, as a
// request timeout does, and announces it (or not: notifications can be
// lost).
func (k *fakeKernel) kill(idx uint32, i int, announce bool) {
	k.mu.Lock()
	s := k.devs[idx].socks[i]
	s.dead = true
	s.c.Close()
	k.mu.Unlock()
	if announce {
		k.linkDead <- idx
	}
}

// serverDied marks every socket of idx dead, as the kernel does when the
// serving process exits.
func (k *fakeKernel) serverDied(idx uint32) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, s := range k.devs[idx].socks {
		s.dead = true
		s.c.Close()
	}
}

func (k *fakeKernel) sock(t *testing.T, idx uint32, i int) *fakeSock {
	t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	d := k.devs[idx]
	if d == nil || i >= len(d.socks) {
		t.Fatalf("no socket %d on nbd%d", i, idx)
	}
	return d.socks[i]
}

func (k *fakeKernel) liveSocks(idx uint32) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, s := range k.devs[idx].socks {
		if !s.dead {
			n++
		}
	}
	return n
}

// request sends one request as the kernel does and returns the reply's
// error and data.
func (s *fakeSock) request(typ uint16, off uint64, length uint32, data []byte) (uint32, []byte, error) {
	s.seq++
	_ = s.c.SetDeadline(time.Now().Add(20 * time.Second))
	hdr := make([]byte, 28, 28+len(data))
	binary.BigEndian.PutUint32(hdr[0:], 0x25609513)
	binary.BigEndian.PutUint16(hdr[6:], typ)
	binary.BigEndian.PutUint64(hdr[8:], s.seq)
	binary.BigEndian.PutUint64(hdr[16:], off)
	binary.BigEndian.PutUint32(hdr[24:], length)
	if _, err := s.c.Write(append(hdr, data...)); err != nil {
		return 0, nil, err
	}
	var rep [16]byte
	if _, err := io.ReadFull(s.br, rep[:]); err != nil {
		return 0, nil, err
	}
	if m := binary.BigEndian.Uint32(rep[0:]); m != 0x67446698 {
		return 0, nil, fmt.Errorf("reply magic %#x", m)
	}
	if h := binary.BigEndian.Uint64(rep[8:]); h != s.seq {
		return 0, nil, fmt.Errorf("reply handle %d, want %d", h, s.seq)
	}
	errno := binary.BigEndian.Uint32(rep[4:])
	if typ != 0 || errno != 0 {
		return errno, nil, nil
	}
	buf := make([]byte, length)
	_, err := io.ReadFull(s.br, buf)
	return 0, buf, err
}

func (s *fakeSock) write(t *testing.T, off uint64, data []byte) {
	t.Helper()
	errno, _, err := s.request(1, off, uint32(len(data)), data)
	if err != nil || errno != 0 {
		t.Fatalf("write at %d: errno %d, %v", off, errno, err)
	}
}

func (s *fakeSock) read(t *testing.T, off uint64, n uint32) []byte {
	t.Helper()
	errno, b, err := s.request(0, off, n, nil)
	if err != nil || errno != 0 {
		t.Fatalf("read at %d: errno %d, %v", off, errno, err)
	}
	return b
}

func (s *fakeSock) flush(t *testing.T) {
	t.Helper()
	errno, _, err := s.request(3, 0, 0, nil)
	if err != nil || errno != 0 {
		t.Fatalf("flush: errno %d, %v", errno, err)
	}
}
