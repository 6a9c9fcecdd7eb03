package s3

import (
	"math/bits"
	"sync"
)

// chunkSet records which chunk objects exist: a sparse bitmap of 64-chunk
// words, so its memory follows the stored data, not the volume size.
type chunkSet struct {
	mu    sync.RWMutex
	words map[uint64]uint64
	n     int // chunks present
}

func newChunkSet() *chunkSet { return &chunkSet{words: map[uint64]uint64{}} }

func (s *chunkSet) set(i uint64, present bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w, bit := s.words[i/64], uint64(1)<<(i%64)
	switch {
	case present && w&bit == 0:
		s.n++
		s.words[i/64] = w | bit
	case !present && w&bit != 0:
		s.n--
		if w &^= bit; w == 0 {
			delete(s.words, i/64)
		} else {
			s.words[i/64] = w
		}
	}
}

func (s *chunkSet) has(i uint64) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.words[i/64]&(1<<(i%64)) != 0
}

func (s *chunkSet) count() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.n
}

// next returns the first index ≥ i whose presence is not want, or end if
// there is none before end. Whole absent words are skipped 64 at a time.
func (s *chunkSet) next(i, end uint64, want bool) uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for i < end {
		w := s.words[i/64]
		if !want {
			w = ^w
		}
		w >>= i % 64 // set bits: chunks from i on whose status is want
		// The shift filled the top with zeros, so the run of ones is
		// never longer than what is left of this word.
		run := uint64(bits.TrailingZeros64(^w))
		if run < 64-i%64 {
			return min(i+run, end)
		}
		i += run
	}
	return end
}
