package nbd

import (
	"testing"
	"time"
)

// choiceRun serves a client whose rate depends on whether the reader
// spins, one request per call, for the given number of epochs, and
// returns how many of them spun.
func choiceRun(c *spinChoice, now *time.Time, epochs int, rate func(spin bool) float64) (spun int) {
	for e := c.epochs + epochs; c.epochs < e; {
		before := c.epochs
		spin := c.spin
		*now = now.Add(time.Duration(float64(time.Second) / rate(spin)))
		c.served(1, *now)
		if c.epochs != before && spin {
			spun++
		}
	}
	return spun
}

// served is a client served at without requests a second by a reader that
// does not spin, at with by one that does.
func served(without, with float64) func(spin bool) float64 {
	return func(spin bool) float64 {
		if spin {
			return with
		}
		return without
	}
}

func TestSpinChoice(t *testing.T) {
	now := time.Unix(1e9, 0)
	var c spinChoice
	// Depth 2 over TCP: spinning serves three times as many.
	shallow := served(25e3, 75e3)
	choiceRun(&c, &now, 2, shallow) // one epoch each way
	if spun := choiceRun(&c, &now, 10*choiceExplore, shallow); spun != 10*choiceExplore-10 {
		t.Errorf("%d of %d epochs spun for a client served 3x faster so: want all but one in %d", spun, 10*choiceExplore, choiceExplore)
	}
	// A pause in an epoch leaves the rates as they were.
	rates := c.rate
	c.served(1, now.Add(time.Second))
	if now = now.Add(time.Second); c.rate != rates {
		t.Errorf("an epoch with a pause of a second changed the rates from %v to %v", rates, c.rate)
	}
	// The client turns to a deep queue: spinning now serves fewer, and
	// the reader stops within a few trials of not spinning.
	deep := served(170e3, 130e3)
	choiceRun(&c, &now, 4*choiceExplore, deep)
	if spun := choiceRun(&c, &now, 10*choiceExplore, deep); spun != 10 {
		t.Errorf("%d of %d epochs spun for a client served slower so: want one in %d", spun, 10*choiceExplore, choiceExplore)
	}
	// Within the margin, the CPU is not worth it.
	close := served(100e3, 115e3)
	choiceRun(&c, &now, 4*choiceExplore, close)
	if spun := choiceRun(&c, &now, 10*choiceExplore, close); spun != 10 {
		t.Errorf("%d of %d epochs spun for 15%% more: want one in %d", spun, 10*choiceExplore, choiceExplore)
	}
}
