package attach

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// SetIOFlusher marks every thread of the process with PR_SET_IO_FLUSHER
// (Linux 5.6+, CAP_SYS_RESOURCE): their allocations never wait for I/O to
// free memory and they are not throttled as dirtiers. Without it, the
// kernel can reclaim memory by writing dirty pages to /dev/nbdN, whose
// server then needs memory to serve that write: a deadlock.
//
// Go runs goroutines on any of its threads, so marking only the serving
// goroutines' threads would not hold; instead every existing thread is
// marked (syscall.AllThreadsSyscall, which requires a binary built without
// cgo), and threads Go creates later inherit the flag from the thread that
// clones them. Call it early, before serving; the serving process should
// not do unrelated work that would then run with the same privilege.
func SetIOFlusher() error {
	_, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0)
	if errno == syscall.ENOTSUP {
		// Built with cgo: only the calling thread can be marked, which
		// is not enough; say so rather than pretend.
		return fmt.Errorf("PR_SET_IO_FLUSHER on every thread needs a binary built with CGO_ENABLED=0: %w", errno)
	}
	if errno != 0 {
		return fmt.Errorf("prctl(PR_SET_IO_FLUSHER): %w", errno)
	}
	return nil
}

// LockMemory locks the process's memory (mlockall with MCL_ONFAULT, so
// only pages actually touched are locked) so that serving never waits for
// its own pages to be swapped back in.
func LockMemory() error {
	if err := unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT); err != nil {
		return fmt.Errorf("mlockall: %w", err)
	}
	return nil
}
