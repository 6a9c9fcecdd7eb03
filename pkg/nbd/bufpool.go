package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from power-of-two size classes (4 KiB … 32 MiB) so
// that steady-state READ and WRITE handling allocates nothing.
const (
	minBufShift = 12
	maxBufShift = 25
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// getBuf returns a buffer of length n. n must not exceed 1<<maxBufShift.
func getBuf(n int) *[]byte {
	c := bufClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minBufShift))
	return &b
}

func putBuf(p *[]byte) {
	if p == nil {
		return
	}
	c := bufClass(cap(*p))
	if c < len(bufPools) && cap(*p) == 1<<(c+minBufShift) {
		bufPools[c].Put(p)
	}
}

// Lent-read iovecs are pooled too.
var vecPool = sync.Pool{New: func() any { v := make([][]byte, 0, 16); return &v }}

func getVec() *[][]byte { return vecPool.Get().(*[][]byte) }

func putVec(v *[][]byte) {
	if v == nil {
		return
	}
	clear(*v) // drop the references to the device's memory
	*v = (*v)[:0]
	vecPool.Put(v)
}
