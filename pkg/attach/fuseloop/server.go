package fuseloop

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

const (
	// bufSize is one request buffer: the kernel refuses reads into less
	// than max_write plus room for the headers (FUSE_MIN_READ_BUFFER,
	// 8 KiB). The reply is built in the same buffer, after the request.
	bufSize = maxWrite + 8192
	// maxIdle is how many goroutines may wait for requests at once. Each
	// serves what it read itself (no hand-off), and one more starts when
	// none is left waiting, so there are as many goroutines as requests
	// in flight, plus up to maxIdle.
	maxIdle = 2
	// maxReaders bounds the readers, and so the requests served at once:
	// the kernel sends at most max_background asynchronous requests,
	// plus synchronous ones (few here).
	maxReaders = 2 * maxBackground

	opInit         = 26 // FUSE_INIT
	inHeaderSize   = 40 // struct fuse_in_header
	outHeaderSize  = 16 // struct fuse_out_header
	notifyInval    = 2  // FUSE_NOTIFY_INVAL_INODE
	notifyResend   = 7  // FUSE_NOTIFY_RESEND (Linux 6.9)
	invalInodeSize = 24 // struct fuse_notify_inval_inode_out
)

// server serves one FUSE connection: it reads requests from /dev/fuse
// itself and answers them through go-fuse's ProtocolServer, rather than
// using fuse.Server, which insists on starting with the INIT handshake and
// so cannot take over a connection another process started (see Resume).
type server struct {
	fd  int // our /dev/fuse descriptor; closed by close
	ps  *fuse.ProtocolServer
	fs  *volumeFS
	dir string // the mount point, for waking readers (stop)

	readerWG sync.WaitGroup
	readers  atomic.Int32 // reader goroutines
	idle     atomic.Int32 // readers waiting in read(2), or about to
	stopping atomic.Bool
	// abandoned makes answers be dropped: a simulated crash (tests).
	abandoned atomic.Bool
	dropped   atomic.Int64 // answers not sent because abandoned

	done    chan struct{} // closed when every reader has returned
	endOnce sync.Once
	endErr  error // why the readers returned, when not stop

	initMu   sync.Mutex
	initReq  []byte        // the INIT request as the kernel sent it
	initDone chan struct{} // closed once INIT was answered (or fed, on Resume)

	// resumed is when Resume started; the first answered request after
	// it is logged with the time it took.
	resumed   time.Time
	firstSeen atomic.Bool

	bufs     chan []byte // free request buffers
	shutOnce sync.Once
}

func newServer(fd int, fs *volumeFS, dir string) (*server, error) {
	// Blocking reads: the flag belongs to the open file, shared with
	// every copy of the descriptor (a keeper's, a predecessor's).
	if err := unix.SetNonblock(fd, false); err != nil {
		return nil, fmt.Errorf("/dev/fuse: %w", err)
	}
	s := &server{
		fd: fd, fs: fs, dir: dir,
		done:     make(chan struct{}),
		initDone: make(chan struct{}),
	}
	s.ps = fuse.NewProtocolServer(fs, &fuse.MountOptions{
		MaxWrite:      maxWrite,
		MaxBackground: maxBackground,
		// Loop direct I/O is asynchronous; without ASYNC_DIO FUSE would
		// serve each loop request synchronously.
		ExtraCapabilities: fuse.CAP_ASYNC_DIO,
		DisableXAttrs:     true,
		Logger:            klog.NewStandardLogger("WARNING"),
	})
	s.bufs = make(chan []byte, maxBackground+2*maxIdle)
	return s, nil
}

func (s *server) start() {
	s.spawn()
	go func() {
		s.readerWG.Wait()
		close(s.done)
	}()
}

// spawn starts a reader, counted as waiting from now on: a reader that
// has been started but has not run yet must stop others from starting
// more (they would, one per request, while the scheduler is behind).
func (s *server) spawn() {
	if s.readers.Add(1) > maxReaders {
		s.readers.Add(-1)
		return
	}
	s.idle.Add(1)
	s.readerWG.Add(1)
	go s.reader()
}

func (s *server) end(err error) {
	s.endOnce.Do(func() { s.endErr = err })
}

// reader reads and serves requests until the connection ends (ENODEV:
// unmounted or aborted), stop, or enough others wait. It is counted in
// idle whenever it is not serving.
func (s *server) reader() {
	defer s.readerWG.Done()
	defer s.readers.Add(-1)
	buf := s.getBuf()
	defer s.putBuf(buf)
	for {
		if s.stopping.Load() {
			s.idle.Add(-1)
			return
		}
		n, err := unix.Read(s.fd, buf)
		if s.idle.Add(-1) == 0 && err == nil && !s.stopping.Load() {
			s.spawn()
		}
		switch {
		case err == nil:
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.ENOENT):
			// ENOENT: the request was interrupted before we got it.
			s.idle.Add(1)
			continue
		case errors.Is(err, unix.ENODEV):
			s.end(errors.New("unmounted or aborted"))
			return
		default:
			s.end(fmt.Errorf("read /dev/fuse: %w", err))
			klog.ErrorS(err, "fuseloop: reading FUSE requests")
			return
		}
		if n >= inHeaderSize {
			init := binary.LittleEndian.Uint32(buf[4:8]) == opInit
			if init {
				s.initMu.Lock()
				s.initReq = append([]byte(nil), buf[:n]...)
				s.initMu.Unlock()
			}
			s.serve(buf, n)
			if init {
				select {
				case <-s.initDone:
				default:
					close(s.initDone)
				}
			}
		}
		if s.idle.Load() >= maxIdle {
			return
		}
		s.idle.Add(1)
	}
}

// getBuf returns a request buffer. They are kept on a free list rather
// than in a sync.Pool, which the garbage collector empties: at 512 KiB
// each, reallocating them after every collection costs.
func (s *server) getBuf() []byte {
	select {
	case b := <-s.bufs:
		return b
	default:
		return make([]byte, bufSize)
	}
}

func (s *server) putBuf(b []byte) {
	select {
	case s.bufs <- b:
	default: // more than ever needed at once: let it go
	}
}

// serve answers the request in buf[:n], building the reply in buf[n:].
func (s *server) serve(buf []byte, n int) {
	out := buf[n:]
	w, st := s.ps.HandleRequest([][]byte{buf[:n]}, [][]byte{out})
	if !st.Ok() || w == 0 {
		return // no reply (FORGET, INTERRUPT)
	}
	if s.abandoned.Load() {
		s.dropped.Add(1) // a simulated crash
		return
	}
	if err := s.reply(out[:w]); err != nil &&
		!errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENODEV) {
		// ENOENT: the kernel no longer waits for it (interrupted).
		klog.ErrorS(err, "fuseloop: answering a FUSE request",
			"opcode", binary.LittleEndian.Uint32(buf[4:8]))
	}
	if !s.resumed.IsZero() && s.firstSeen.CompareAndSwap(false, true) {
		klog.InfoS("fuseloop: first request served after resuming", "elapsed", time.Since(s.resumed))
	}
}

// reply writes one reply.
func (s *server) reply(b []byte) error {
	_, err := unix.Write(s.fd, b)
	return err
}

// initRequest is a copy of the INIT request the kernel sent.
func (s *server) initRequest() []byte {
	s.initMu.Lock()
	defer s.initMu.Unlock()
	return append([]byte(nil), s.initReq...)
}

// replayInit feeds the INIT request of the connection's first server to
// ours, so that it negotiates the same settings; the answer is dropped
// (the kernel got it long ago).
func (s *server) replayInit(init []byte) error {
	if len(init) < inHeaderSize || binary.LittleEndian.Uint32(init[4:8]) != opInit {
		return errors.New("the saved INIT request is not one")
	}
	buf := make([]byte, len(init)+4096)
	copy(buf, init)
	if _, st := s.ps.HandleRequest([][]byte{buf[:len(init)]}, [][]byte{buf[len(init):]}); !st.Ok() {
		return fmt.Errorf("replaying INIT: %v", st)
	}
	s.initMu.Lock()
	s.initReq = append([]byte(nil), init...)
	s.initMu.Unlock()
	close(s.initDone)
	return nil
}

// notify writes a notification: unique 0, and the notification code
// (positive) where a reply has its error.
func (s *server) notify(code uint32, payload []byte) error {
	b := make([]byte, outHeaderSize+len(payload))
	binary.LittleEndian.PutUint32(b[0:], uint32(len(b)))
	binary.LittleEndian.PutUint32(b[4:], code)
	copy(b[outHeaderSize:], payload)
	_, err := unix.Write(s.fd, b)
	return err
}

// resend asks the kernel to queue again every request a server read but
// did not answer (FUSE_NOTIFY_RESEND).
func (s *server) resend() error { return s.notify(notifyResend, nil) }

// invalidateAttr makes the kernel forget the file's cached attributes.
func (s *server) invalidateAttr() error {
	var p [invalInodeSize]byte
	binary.LittleEndian.PutUint64(p[0:], fileID)
	binary.LittleEndian.PutUint64(p[8:], ^uint64(0)) // offset -1: attributes only
	return s.notify(notifyInval, p[:])
}

// stop makes the readers return and waits for them, and so for every
// request being served. A reader waiting in read(2) cannot be interrupted;
// it returns once it served one more request, so stop makes requests:
// each statfs of the mount is a FUSE_STATFS for one waiting reader. It
// gives up after a while (the mount gone, say): closing the last
// descriptor then aborts the connection, which wakes them all.
func (s *server) stop() {
	s.stopping.Store(true)
	deadline := time.After(5 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if s.idle.Load() > 0 {
			go func() {
				var st unix.Statfs_t
				unix.Statfs(s.dir, &st)
			}()
		}
		select {
		case <-s.done:
			return
		case <-deadline:
			klog.InfoS("fuseloop: FUSE readers did not stop; closing underneath them", "dir", s.dir)
			return
		case <-tick.C:
		}
	}
}

// close releases our descriptors; call after stop.
func (s *server) close() {
	unix.Close(s.fd)
}

// shutdown is stop and close, once.
func (s *server) shutdown() {
	s.shutOnce.Do(func() {
		s.stop()
		s.close()
	})
}
