package attach

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// countTaskFlag reads the kernel's per-thread flags (field 9 of
// /proc/self/task/*/stat) and counts the threads with flag set.
func countTaskFlag(flag uint64) (marked, total int, err error) {
	dirs, err := filepath.Glob("/proc/self/task/*/stat")
	if err != nil {
		return 0, 0, err
	}
	for _, p := range dirs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // the thread exited
		}
		s := string(b)
		// The command name (field 2) is in parentheses and may hold spaces.
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			return 0, 0, fmt.Errorf("%s: unexpected format", p)
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 7 {
			return 0, 0, fmt.Errorf("%s: unexpected format", p)
		}
		v, err := strconv.ParseUint(f[6], 10, 64) // field 9 overall
		if err != nil {
			return 0, 0, fmt.Errorf("%s: flags: %w", p, err)
		}
		total++
		if v&flag != 0 {
			marked++
		}
	}
	return marked, total, nil
}

// pfMemallocNoIO is the thread flag PR_SET_IO_FLUSHER sets
// (PF_MEMALLOC_NOIO, include/linux/sched.h).
const pfMemallocNoIO = 0x00080000

// IOFlusherThreads reports how many of this process's threads are marked
// by SetIOFlusher, and how many there are.
func IOFlusherThreads() (marked, total int, err error) { return countTaskFlag(pfMemallocNoIO) }
