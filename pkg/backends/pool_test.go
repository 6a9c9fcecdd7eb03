package backends_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
)

// gate makes opens of url block until the returned func is called.
func gate(url string) (open func()) {
	ch := make(chan struct{})
	fakeMu.Lock()
	fakeGates[url] = ch
	fakeMu.Unlock()
	return func() { close(ch) }
}

func opens(url string) int {
	fakeMu.Lock()
	defer fakeMu.Unlock()
	return fakeOpens[url]
}

func TestPoolSharesOneOpen(t *testing.T) {
	p := backends.NewPool(backends.Env{})
	defer p.Close()
	ctx := context.Background()
	const url = "fake:pool-share"
	unblock := gate(url)

	const n = 20
	devs := make([]backends.Device, n)
	rels := make([]func(), n)
	var wg sync.WaitGroup
	for i := range n {
		// Equivalent spellings share the device.
		spec := url
		if i%2 == 1 {
			spec = "size=1024Ki;" + url
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			dev, rel, err := p.Acquire(ctx, mustParse(t, spec))
			if err != nil {
				t.Error(err)
				return
			}
			devs[i], rels[i] = dev, rel
		}()
	}
	time.Sleep(10 * time.Millisecond) // let them pile up on the open
	unblock()
	wg.Wait()
	if got := opens(url); got != 1 {
		t.Errorf("opened %d times; want 1", got)
	}
	for i := range devs {
		if devs[i] != devs[0] || devs[i] == nil {
			t.Fatalf("Acquire %d returned a different device", i)
		}
	}
	s := mustParse(t, url)
	if got := backends.PoolRefs(p, s); got != n {
		t.Errorf("refs = %d; want %d", got, n)
	}
	for _, rel := range rels {
		rel()
		rel() // idempotent
	}
	if got := backends.PoolRefs(p, s); got != 0 {
		t.Errorf("refs after release = %d; want 0", got)
	}
	// Still open after the last release: no new open.
	dev, rel, err := p.Acquire(ctx, s)
	if err != nil || dev != devs[0] || opens(url) != 1 {
		t.Errorf("re-Acquire = %v, %v after %d opens", dev, err, opens(url))
	}
	rel()
}

func TestPoolOpenFailureRetries(t *testing.T) {
	p := backends.NewPool(backends.Env{})
	defer p.Close()
	ctx := context.Background()
	const url = "fake:pool-openfail"
	unblock := gate(url)
	errs := make(chan error, 5)
	for range 5 {
		go func() {
			_, _, err := p.Acquire(ctx, mustParse(t, url))
			errs <- err
		}()
	}
	time.Sleep(10 * time.Millisecond)
	unblock()
	for range 5 {
		if err := <-errs; err == nil {
			t.Error("Acquire of a failing device succeeded")
		}
	}
	before := opens(url)
	if before < 1 || before > 5 {
		t.Fatalf("opened %d times", before)
	}
	if _, _, err := p.Acquire(ctx, mustParse(t, url)); err == nil {
		t.Error("Acquire succeeded")
	}
	if opens(url) != before+1 {
		t.Errorf("failed open not retried: %d opens, then %d", before, opens(url))
	}
}

func TestPoolWaiterContext(t *testing.T) {
	p := backends.NewPool(backends.Env{})
	defer p.Close()
	const url = "fake:pool-ctx"
	unblock := gate(url)
	done := make(chan error)
	go func() {
		_, rel, err := p.Acquire(context.Background(), mustParse(t, url))
		if err == nil {
			rel()
		}
		done <- err
	}()
	time.Sleep(10 * time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := p.Acquire(ctx, mustParse(t, url)); !errors.Is(err, context.Canceled) {
		t.Errorf("waiter error = %v; want context.Canceled", err)
	}
	unblock()
	if err := <-done; err != nil {
		t.Errorf("opener: %v", err)
	}
}

func TestPoolClose(t *testing.T) {
	p := backends.NewPool(backends.Env{})
	ctx := context.Background()
	dev, _, err := p.Acquire(ctx, mustParse(t, "fake:pool-close"))
	if err != nil {
		t.Fatal(err)
	}
	// An open still in flight when Close runs is closed when it ends.
	const slow = "fake:pool-close-slow"
	unblock := gate(slow)
	slowErr := make(chan error)
	go func() {
		_, _, err := p.Acquire(ctx, mustParse(t, slow))
		slowErr <- err
	}()
	time.Sleep(10 * time.Millisecond)

	if err := p.Close(); err != nil { // the reference is not released: Close does not wait
		t.Fatal(err)
	}
	f := dev.(*fakeDev)
	if f.closed != 1 || f.flushed != 1 {
		t.Errorf("device closed %d, flushed %d times; want 1, 1", f.closed, f.flushed)
	}
	unblock()
	if err := <-slowErr; !errors.Is(err, backends.ErrPoolClosed) {
		t.Errorf("in-flight Acquire error = %v; want ErrPoolClosed", err)
	}
	fakeMu.Lock()
	for _, d := range fakeDevs {
		if d.name == slow && d.closed != 1 {
			t.Errorf("in-flight device closed %d times; want 1", d.closed)
		}
	}
	fakeMu.Unlock()
	if _, _, err := p.Acquire(ctx, mustParse(t, "fake:pool-close")); !errors.Is(err, backends.ErrPoolClosed) {
		t.Errorf("Acquire after Close error = %v", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// A memory volume keeps its data across connections.
func TestPoolMemoryPersists(t *testing.T) {
	p := backends.NewPool(backends.Env{})
	defer p.Close()
	ctx := context.Background()
	s := mustParse(t, "size=1Mi;memory:persist")
	dev, rel, err := p.Acquire(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if err := dev.WriteAt(ctx, []byte("kept"), 4096, false); err != nil {
		t.Fatal(err)
	}
	rel()
	dev, rel, err = p.Acquire(ctx, mustParse(t, "size=1024Ki;memory:persist"))
	if err != nil {
		t.Fatal(err)
	}
	defer rel()
	buf := make([]byte, 4)
	if err := dev.ReadAt(ctx, buf, 4096); err != nil || !bytes.Equal(buf, []byte("kept")) {
		t.Errorf("read back %q, %v", buf, err)
	}
}
