package attach

import (
	"runtime"
	"time"
)

// lockAndSpin holds an OS thread for a moment, forcing Go to start others.
func lockAndSpin() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	time.Sleep(20 * time.Millisecond)
}
