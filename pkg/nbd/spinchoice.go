package nbd

import "time"

// spinChoice decides whether the reader spins for a client that does not
// wait for each answer, by measuring: the reader serves it in epochs of
// choiceEpoch, spinning or not, and goes the way that served more
// requests a second, trying the other way every choiceExplore epochs.
//
// Why measure: which way is better turns on how the client paces its
// requests, and nothing the reader sees tells it well. fio 4k random
// reads over TCP, without -> with spinning: depth 2, 22k -> 76-87k IOPS
// (a request that finds the reader parked waits for a halted vCPU to
// wake); depth 4, 47k -> 113-117k; but depth 8, 158k -> 124k and depth
// 32, -10% (the client keeps both CPUs busy by itself, and the spinner
// reading each request as it comes ends the batching of replies that
// hold.go arranges). Batch sizes were tried as the sign and failed: at
// depth 32 a run of single requests made the reader spin, and spinning
// keeps batches single. Spinning costs a CPU, so it must win by
// choiceMargin.
type spinChoice struct {
	start  time.Time  // when this epoch began (zero: none yet)
	reqs   int        // requests served in it
	spin   bool       // this epoch spins
	rate   [2]float64 // requests a second without, with spinning (0: unknown)
	epochs int
}

const (
	choiceEpoch = 20 * time.Millisecond
	// An epoch this long saw the client pause: it measures nothing.
	choiceMaxEpoch = 4 * choiceEpoch
	choiceExplore  = 16
	choiceMargin   = 1.25
)

// served counts n requests answered by now and tells whether to spin
// until the next call.
func (c *spinChoice) served(n int, now time.Time) bool {
	if c.start.IsZero() {
		c.start = now
	}
	c.reqs += n
	d := now.Sub(c.start)
	if d < choiceEpoch {
		return c.spin
	}
	if d <= choiceMaxEpoch {
		r := float64(c.reqs) / d.Seconds()
		i := 0
		if c.spin {
			i = 1
		}
		if c.rate[i] == 0 {
			c.rate[i] = r
		} else {
			c.rate[i] += (r - c.rate[i]) / 2
		}
	}
	c.start, c.reqs = now, 0
	c.epochs++
	better := c.rate[1] > c.rate[0]*choiceMargin
	switch {
	case c.rate[0] == 0:
		c.spin = false
	case c.rate[1] == 0:
		c.spin = true
	case c.epochs%choiceExplore == 0:
		c.spin = !better
	default:
		c.spin = better
	}
	return c.spin
}
