package fdstore

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// connTimeout bounds one connection, request and answer together.
const connTimeout = 10 * time.Second

// Server is the store. The zero value is not usable; use NewServer.
type Server struct {
	mu     sync.Mutex
	fds    map[string]*os.File
	closed bool
	uid    int
}

// NewServer returns an empty store serving clients with this process's
// effective user ID.
func NewServer() *Server {
	return &Server{fds: map[string]*os.File{}, uid: os.Geteuid()}
}

// Listen makes a SOCK_SEQPACKET unix socket at path (mode 0600; a stale
// socket file left there is replaced) for Serve.
func Listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("fdstore: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.Dial("unixpacket", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("fdstore: another store is listening on %s", path)
		}
		os.Remove(path)
	}
	old := unix.Umask(0o177)
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	unix.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("fdstore: %w", err)
	}
	return l, nil
}

// Serve answers connections on l until l is closed.
func (s *Server) Serve(l *net.UnixListener) error {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// EMFILE and the like: back off rather than spin.
			klog.ErrorS(err, "fdstore: accept")
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go s.handle(c)
	}
}

// Close closes every stored descriptor; the store answers nothing after.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for n, f := range s.fds {
		f.Close()
		delete(s.fds, n)
	}
	return nil
}

// Len is how many descriptors are stored.
func (s *Server) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.fds)
}

func (s *Server) handle(c *net.UnixConn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(connTimeout))
	if err := s.checkPeer(c); err != nil {
		klog.InfoS("fdstore: refusing client", "err", err)
		c.Write(append([]byte{stBad}, err.Error()...))
		return
	}
	buf := make([]byte, maxPacket+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return
	}
	var files []*os.File
	if oobn > 0 {
		files = receivedFiles(oob[:oobn])
	}
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}()
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		c.Write(append([]byte{stBad}, "request or its descriptors truncated"...))
		return
	}
	req, err := parseRequest(buf[:n], len(files))
	if err != nil {
		c.Write(append([]byte{stBad}, err.Error()...))
		return
	}
	switch req.op {
	case opPut:
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Write(append([]byte{stBad}, "store closed"...))
			return
		}
		if old := s.fds[req.name]; old != nil {
			old.Close()
		}
		s.fds[req.name] = files[0]
		files[0] = nil
		s.mu.Unlock()
		klog.V(2).InfoS("fdstore: put", "name", req.name)
		c.Write([]byte{stOK})
	case opGet:
		// A dup, so that a Delete racing with the send cannot close
		// the descriptor under it.
		s.mu.Lock()
		var dup int = -1
		if f := s.fds[req.name]; f != nil {
			dup, err = unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		}
		s.mu.Unlock()
		if err != nil {
			c.Write(append([]byte{stBad}, fmt.Sprintf("dup: %v", err)...))
			return
		}
		if dup < 0 {
			c.Write([]byte{stNotFound})
			return
		}
		c.WriteMsgUnix([]byte{stOK}, unix.UnixRights(dup), nil)
		unix.Close(dup)
	case opDelete:
		s.mu.Lock()
		f := s.fds[req.name]
		delete(s.fds, req.name)
		s.mu.Unlock()
		if f == nil {
			c.Write([]byte{stNotFound})
			return
		}
		f.Close()
		klog.V(2).InfoS("fdstore: deleted", "name", req.name)
		c.Write([]byte{stOK})
	case opList:
		s.mu.Lock()
		names := make([]string, 0, len(s.fds))
		for n := range s.fds {
			names = append(names, n)
		}
		s.mu.Unlock()
		sort.Strings(names)
		for _, n := range names {
			if _, err := c.Write(append([]byte{stName}, n...)); err != nil {
				return
			}
		}
		c.Write([]byte{stOK})
	}
}

// checkPeer refuses clients running as another user.
func (s *Server) checkPeer(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if cerr != nil {
		return cerr
	}
	if int(cred.Uid) != s.uid {
		return fmt.Errorf("peer uid %d is not %d", cred.Uid, s.uid)
	}
	return nil
}

// receivedFiles wraps every descriptor in the control messages.
func receivedFiles(oob []byte) []*os.File {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var out []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			out = append(out, os.NewFile(uintptr(fd), "fdstore"))
		}
	}
	return out
}
