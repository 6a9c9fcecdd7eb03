package nbd

import (
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"k8s.io/klog/v2"
)

// spinReader reads a TCP or unix socket like net.Conn.Read, but when the
// socket is empty it may first poll it for a few microseconds before
// parking in the runtime's netpoller (see spinChoice for when). Over TCP
// loopback, a parked reader is woken through epoll and an idle CPU some
// tens of microseconds after the data arrives; a client at queue depth 1
// sends its next request within the spin (here fio's 4k random reads
// went from a 46 us median to 7-19 us, and from 18k to 45-60k IOPS;
// yielding inside the spin is what lets a client woken on the spinning
// CPU run at once). At most one connection in the process spins at a
// time, so the spinning never takes more than one CPU from real work.
//
// Where it may, the spinning thread also drops to SCHED_IDLE for the
// spin and for the write of the replies before it (see idleSpin): the
// client is then woken on our CPU instead of on a halted one.
//
// It also reads with read(2) straight, not through the runtime's system
// call entry (see rawRead), and holds replies back for a deep queue (see
// hold.go).
type spinReader struct {
	conn    net.Conn
	rc      syscall.RawConn // nil: plain conn.Read (neither TCP nor unix)
	enabled bool            // read raw and spin (set before transmission, by the reader)
	eager   bool            // spin on the next read (set by the reader)
	held    bool            // this reader holds the spin slot
	idle    bool            // its thread is locked and SCHED_IDLE
	local   bool            // the peer is on this machine (loopback)
	// together: the last window found the request already there, so
	// the client ran on our CPU while we were writing.
	together bool
	singles  int // requests in a row that came alone (batch of 1)
	buf      []byte
	n        int
	err      error
	fn       func(fd uintptr) bool
	cpu      int // the client's CPU, or -1 (set by cpuFn)
	cpuFn    func(fd uintptr)

	choice spinChoice
	unix   bool // a unix socket: no SCHED_IDLE, no raw reads unless eager

	// Holding back replies (see hold.go).
	depthCur, depthPrev int // largest batch in this window and the last
	flushes             int // batches in this window
	more                bool
	one                 [1]byte
	peekFn              func(fd uintptr)
}

// spinning is the one spin slot shared by every connection.
var spinning atomic.Bool

const spinFor = 50 * time.Microsecond

func newSpinReader(c net.Conn) *spinReader {
	r := &spinReader{conn: c}
	r.fn = r.try
	r.cpuFn = r.incomingCPU
	r.peekFn = r.peek
	// A unix socket spins and holds replies back too, as spinChoice
	// finds best (fio 4k random reads at depth 4: 52-66k -> 150-194k
	// IOPS; depth 32: 213k -> 277-295k), but it never opens SCHED_IDLE
	// windows: it wakes its reader synchronously, on the writer's CPU,
	// already. Nor are its reads raw while it does not spin: at depth 1,
	// the sysmon wake-ups that raw system calls avoid are what keeps
	// the other vCPU from halting (35-39k IOPS, 6.4 us median, against
	// 21k and 60 us raw).
	if uc, ok := c.(*net.UnixConn); ok {
		r.rc, _ = uc.SyscallConn()
		r.unix = true
	}
	if tc, ok := c.(*net.TCPConn); ok {
		r.rc, _ = tc.SyscallConn()
		r.local = isLoopbackConn(tc)
	}
	return r
}

// idleMaxFlush is the most reply bytes written at SCHED_IDLE: a flush
// that may fill the socket and wait belongs at normal priority, and a
// big reply's round trip gains little from the placement anyway.
const idleMaxFlush = 64 << 10

// A client that has sent idleAfterSingles single requests in a row waits
// for each answer: the reader always spins for it, and at SCHED_IDLE on
// the client's CPU (see idleSpin). For any other, spinChoice decides. A
// deep queue also trickles single requests now and then (fio at depth
// 32: some 18k waits a second, 800 of them after 64 single requests in a
// row), which must not put the two on one CPU with the other idle.
const idleAfterSingles = 256

// setBatch tells how many requests the reader served since it last
// waited for the client (0: none inline, which changes nothing).
func (r *spinReader) setBatch(n int) {
	if n == 0 {
		return
	}
	if n == 1 {
		r.singles++
	} else {
		r.singles = 0
	}
	r.noteBatch(n)
	r.eager = r.choice.served(n, time.Now()) || (r.waitsEachAnswer() && !r.unix)
}

// waitsEachAnswer tells whether the client has long sent one request at
// a time.
func (r *spinReader) waitsEachAnswer() bool { return r.singles >= idleAfterSingles }

// prepare is called by the reader of a client that waits for each
// answer just before it writes the replies it holds (no more than
// idleMaxFlush) and waits for the next request: it takes the spin slot
// and, if it may, lowers the thread for the write and the spin. Every
// prepare is followed by a Read or a release on the same goroutine.
func (r *spinReader) prepare() {
	if !r.enabled || r.unix || !r.eager || r.held || !spinning.CompareAndSwap(false, true) {
		return
	}
	r.held = true
	// A local client is best met on the CPU it last sent from (see
	// idleSpin); not worth the two system calls while the last request
	// was already waiting when the replies had been written.
	r.cpu = -1
	if r.local && !r.together {
		_ = r.rc.Control(r.cpuFn)
	}
	r.idle = idle.enter(r.cpu)
}

// incomingCPU sets cpu to the CPU the client last sent from (bound once
// as cpuFn, so that asking allocates nothing).
func (r *spinReader) incomingCPU(fd uintptr) {
	if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_INCOMING_CPU); err == nil {
		r.cpu = v
	}
}

// release ends what prepare began: the thread gets its policy back and
// the slot is freed.
func (r *spinReader) release() {
	if r.idle {
		r.idle = false
		idle.leave()
	}
	if r.held {
		r.held = false
		spinning.Store(false)
	}
}

// rawRead is read(2) on a non-blocking socket without the runtime's
// system call entry and exit: such a read never blocks, and at tens of
// thousands of waits a second the entry's bookkeeping, and the sysmon
// thread it wakes each time the process was idle, cost more than the
// read (fio 4k random reads at depth 32 over TCP: +11% IOPS with
// writeRaw; nbdcopy sequential reads: +10-20%).
func rawRead(fd uintptr, p []byte) (int, error) {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
		switch e {
		case 0:
			return int(n), nil
		case syscall.EINTR:
		default:
			return 0, e
		}
	}
}

func (r *spinReader) try(fd uintptr) bool {
	n, err := rawRead(fd, r.buf)
	if r.idle {
		r.together = err != syscall.EAGAIN
	}
	if err == syscall.EAGAIN && !r.held && r.eager && spinning.CompareAndSwap(false, true) {
		r.held = true
	}
	if err == syscall.EAGAIN && r.held {
		deadline := time.Now().Add(spinFor)
		for err == syscall.EAGAIN && time.Now().Before(deadline) {
			if !r.idle {
				// The client we just answered may have been woken on
				// this CPU: let it run rather than spin in its way.
				// (A SCHED_IDLE spinner is preempted by it anyway.)
				syscall.RawSyscall(syscall.SYS_SCHED_YIELD, 0, 0, 0)
			}
			n, err = rawRead(fd, r.buf)
		}
	}
	r.release()
	if err == syscall.EAGAIN {
		return false // park until readable
	}
	if err != nil {
		err = os.NewSyscallError("read", err)
	}
	r.n, r.err = n, err
	return true
}

func (r *spinReader) Read(p []byte) (int, error) {
	if !r.enabled || (r.unix && !r.eager) { // (enabled implies rc)
		return r.conn.Read(p) // nothing prepared: prepare needs enabled
	}
	if len(p) == 0 {
		return 0, nil
	}
	r.buf = p
	r.n, r.err = 0, nil
	err := r.rc.Read(r.fn)
	r.release() // if rc.Read failed before calling try
	r.buf = nil
	if err != nil {
		return 0, err
	}
	if r.err != nil {
		return 0, r.err
	}
	if r.n == 0 {
		return 0, io.EOF
	}
	return r.n, nil
}

// idleSpin lowers the spinning thread to SCHED_IDLE while it writes its
// replies and waits for the next request.
//
// Why: at queue depth 1 the client sleeps in poll() for each answer, and
// the scheduler wakes it on an idle CPU rather than on the busy one that
// answered. In a VM an idle vCPU is halted, and waking it costs 15-40 us,
// twice the whole round trip. A CPU whose only runnable thread is
// SCHED_IDLE counts as idle to the scheduler, so the client is woken on
// ours, preempts the spinner at once, sends its next request and sleeps
// again; the spinner finds it with no wake-up on either side. That takes
// the two to share a CPU, which the scheduler may not arrange by itself
// (its wake-affine heuristics look at the Go runtime's other threads as
// well), so for a client on this machine the window's thread is pinned
// to the CPU the client last sent from (SO_INCOMING_CPU) until the
// window ends. fio's 4k random reads at depth 1 over TCP: median 14-20
// us -> 8-9 us, 30-35k -> 55-70k IOPS, steadily run after run.
//
// The risk is starvation: a SCHED_IDLE thread gets almost no CPU while a
// normal one wants it. A watchdog reads how long the thread of an open
// window has waited on a run queue (schedstat); past idleStarved it
// raises the thread itself and windows stop opening for a while: 10 ms
// after a stray starvation, doubling up to about a second while they
// keep coming (a CPU hog), so one starved wait costs a few milliseconds
// and a busy machine about one such wait a second.
type idleSpin struct {
	once  sync.Once
	ok    atomic.Bool // SCHED_IDLE windows are possible
	tid   atomic.Int32
	since atomic.Int64 // when the open window opened (UnixNano); 0: none
	until atomic.Int64 // no windows before this (UnixNano): backing off
	wake  chan struct{}
	// windows and starved count what happened, for tests and logs.
	windows, starved atomic.Int64

	narrowed bool // the window's thread is pinned to its client's CPU
	mask     unix.CPUSet

	// The watchdog's own.
	streak       uint   // starvations in a row
	lastStarved  int64  // windows when the last one was
	watchedSince int64  // the window being watched
	delay0       uint64 // its thread's run-queue wait when first seen
}

var idle = &idleSpin{wake: make(chan struct{}, 1)}

const (
	schedOther = 0
	schedIdle  = 5

	// idleStarved is how long an open window's thread may wait on a run
	// queue: far above a client's turn on our CPU, far below a
	// scheduler's slice for a CPU hog.
	idleStarved  = 500 * time.Microsecond
	idleBackoff  = 10 * time.Millisecond
	idleMaxShift = 7 // backoff up to 1.28 s
	// A starvation within this many windows of the last one counts as
	// a streak: the machine is busy, not unlucky.
	idleStreakWindows = 1000
	idleTick          = time.Millisecond
)

func setPolicy(tid int, policy int) error {
	var param struct{ prio int32 }
	_, _, e := syscall.RawSyscall(syscall.SYS_SCHED_SETSCHEDULER, uintptr(tid), uintptr(policy), uintptr(unsafe.Pointer(&param)))
	if e != 0 {
		return e
	}
	return nil
}

func getPolicy() int {
	p, _, _ := syscall.RawSyscall(syscall.SYS_SCHED_GETSCHEDULER, 0, 0, 0)
	return int(p)
}

// runDelay is the time thread tid has spent runnable but not running,
// in nanoseconds (the second field of its schedstat).
func runDelay(tid int) (uint64, error) {
	b, err := os.ReadFile("/proc/self/task/" + strconv.Itoa(tid) + "/schedstat")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("schedstat of thread %d: %q", tid, b)
	}
	return strconv.ParseUint(f[1], 10, 64)
}

// probe tells whether a thread here may go SCHED_IDLE and come back, and
// whether starvation can be seen: coming back takes CAP_SYS_NICE or a
// RLIMIT_NICE that allows nice 0, and a process already under another
// policy is left alone. It runs on a thread of its own that exits with
// it, whatever the outcome.
func (s *idleSpin) probe() bool {
	ok := make(chan bool)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with us
		_, err := runDelay(syscall.Gettid())
		ok <- err == nil && getPolicy() == schedOther && setPolicy(0, schedIdle) == nil && setPolicy(0, schedOther) == nil
	}()
	return <-ok
}

// getcpu is the CPU the calling thread runs on.
func getcpu() int {
	var cpu uint32
	syscall.RawSyscall(unix.SYS_GETCPU, uintptr(unsafe.Pointer(&cpu)), 0, 0)
	return int(cpu)
}

// enter opens a window on the calling goroutine's thread, moving it to
// cpu unless that is -1; true if it did, and then the caller must call
// leave on the same goroutine.
func (s *idleSpin) enter(cpu int) bool {
	s.once.Do(func() {
		s.ok.Store(s.probe() && unix.SchedGetaffinity(0, &s.mask) == nil)
		if s.ok.Load() {
			go s.watch()
		}
	})
	if !s.ok.Load() {
		return false
	}
	now := time.Now().UnixNano()
	if now < s.until.Load() {
		return false
	}
	runtime.LockOSThread()
	s.tid.Store(int32(syscall.Gettid()))
	s.since.Store(now)
	if setPolicy(0, schedIdle) != nil {
		s.since.Store(0)
		runtime.UnlockOSThread()
		return false
	}
	if cpu >= 0 && getcpu() != cpu {
		var set unix.CPUSet
		set.Set(cpu)
		if unix.SchedSetaffinity(0, &set) == nil {
			s.narrowed = true
		}
	}
	s.windows.Add(1)
	select {
	case s.wake <- struct{}{}:
	default:
	}
	return true
}

func (s *idleSpin) leave() {
	if err := setPolicy(0, schedOther); err != nil {
		// Cannot happen once probe passed; if it does, this thread
		// stays locked to its goroutine and ends with it rather than
		// serve others at SCHED_IDLE, and no window opens again.
		s.ok.Store(false)
		s.since.Store(0)
		s.until.Store(1 << 62)
		klog.ErrorS(err, "NBD server: cannot restore the scheduling policy of a spinning thread; spinning at SCHED_IDLE is off")
		return
	}
	if s.narrowed {
		s.narrowed = false
		if unix.SchedSetaffinity(0, &s.mask) != nil {
			// The CPUs the process started with are gone (a cpuset
			// changed): all it may use now, as the kernel clamps.
			var all unix.CPUSet
			for cpu := range len(all) * 64 {
				all.Set(cpu)
			}
			_ = unix.SchedSetaffinity(0, &all)
		}
	}
	s.since.Store(0)
	runtime.UnlockOSThread()
}

// watch raises a thread starved at SCHED_IDLE: the thread cannot do it
// while it is starved. It sleeps while no window opens.
func (s *idleSpin) watch() {
	t := time.NewTicker(idleTick)
	quiet := 0
	for range t.C {
		since := s.since.Load()
		if since == 0 {
			if quiet++; quiet > 1000 {
				t.Stop()
				<-s.wake
				quiet = 0
				t.Reset(idleTick)
			}
			continue
		}
		quiet = 0
		tid := int(s.tid.Load())
		d, err := runDelay(tid)
		if err != nil || s.since.Load() != since {
			continue // closed meanwhile
		}
		if since != s.watchedSince {
			s.watchedSince, s.delay0 = since, d
			continue
		}
		if time.Duration(d-s.delay0) > idleStarved {
			s.backOff()
			// If the window closed since, the thread is normal already
			// or in a newer window that only loses its placement.
			_ = setPolicy(tid, schedOther)
			s.watchedSince = 0
		}
	}
}

func (s *idleSpin) backOff() {
	w := s.windows.Load()
	if s.starved.Add(1) > 1 && w-s.lastStarved < idleStreakWindows {
		s.streak = min(s.streak+1, idleMaxShift)
	} else {
		s.streak = 0
	}
	s.lastStarved = w
	d := idleBackoff << s.streak
	s.until.Store(time.Now().Add(d).UnixNano())
	klog.V(4).InfoS("NBD server: a spinning thread was starved at SCHED_IDLE; spinning at normal priority for a while", "for", d)
}
