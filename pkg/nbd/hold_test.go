package nbd

import (
	"bytes"
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// tcpPair is a connected pair of loopback TCP connections.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// The reader holds replies back only for a client that has lately had
// more than twice as many requests in flight as it holds, and only while
// one more may come; the wait ends when a request arrives, and frees the
// spin slot.
func TestHoldDecisions(t *testing.T) {
	client, server := tcpPair(t)
	r := newSpinReader(server)
	r.enabled = true
	if r.hold(1, 0) {
		t.Fatal("held back for a client never seen with two requests in flight")
	}
	r.setBatch(8)
	if r.depth() != 8 {
		t.Fatalf("depth %d after a batch of 8", r.depth())
	}
	waits := holdStats.waits.Load()
	start := time.Now()
	if r.hold(1, 0) {
		t.Fatal("a wait on an empty socket found a request")
	}
	t.Logf("an empty wait took %v", time.Since(start))
	if holdStats.waits.Load() != waits+1 || spinning.Load() || r.held {
		t.Fatal("the wait was not counted or left the spin slot held")
	}
	if _, err := client.Write([]byte{0x25}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !r.hold(1, 0) { // the byte may take a moment over loopback
		if time.Now().After(deadline) {
			t.Fatal("a wait never saw the byte the client sent")
		}
	}
	if !r.hold(3, holdMaxBytes) {
		t.Fatal("the peek consumed the byte, or 64 KiB held was too much")
	}
	for _, c := range []struct {
		what      string
		n, queued int
	}{
		{"nothing held", 0, 0},
		{"half as many as the client had in flight", 4, 0},
		{"more than 64 KiB", 1, holdMaxBytes + 1},
	} {
		if r.hold(c.n, c.queued) {
			t.Errorf("held back with %s", c.what)
		}
	}
	spinning.Store(true) // another connection spins
	if r.hold(1, 0) {
		t.Error("held back while another connection had the spin slot")
	}
	spinning.Store(false)
	r.setBatch(16)
	if r.hold(holdMax, 0) {
		t.Errorf("held back %d replies", holdMax)
	}
	r.enabled = false
	if r.hold(1, 0) {
		t.Error("held back on a connection that does not spin (TLS)")
	}
	r.enabled = true
	// A client that turns to one request at a time stops being held
	// back within two windows.
	for range 2 * depthWindow {
		r.setBatch(1)
	}
	if r.depth() != 1 || r.hold(1, 0) {
		t.Errorf("depth %d after %d single requests; still held back", r.depth(), 2*depthWindow)
	}
	var b [1]byte
	if _, err := io.ReadFull(r.conn, b[:]); err != nil || b[0] != 0x25 {
		t.Fatalf("read %x, %v after the peeks: want the byte sent", b, err)
	}
	if n := testing.AllocsPerRun(100, func() { r.setBatch(4); r.hold(1, 0) }); n != 0 {
		t.Errorf("%v allocations per wait", n)
	}
}

// readReplies reads n replies to 4 KiB reads, each one OFFSET_DATA chunk
// with the done flag, and returns their data by cookie.
func readReplies(r *rawConn, n int) map[uint64][]byte {
	r.t.Helper()
	got := map[uint64][]byte{}
	for range n {
		rep := r.readReply()
		if rep.typ != replyTypeOffsetData || rep.flags&replyFlagDone == 0 || len(rep.data) != 4096 {
			r.t.Fatalf("reply chunk of type %d, flags %#x and %d bytes: want 4 KiB of data, done", rep.typ, rep.flags, len(rep.data))
		}
		got[rep.cookie] = rep.data
	}
	return got
}

// Over a real connection, TCP or unix: a burst sent in pieces is
// answered in full, and a single request sent after a deep queue is
// answered without another to end the wait.
func TestHold(t *testing.T) {
	dev := memory.New(1 << 20)
	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = byte(i * 7 / 4096)
	}
	if err := dev.WriteAt(context.Background(), want, 0, false); err != nil {
		t.Fatal(err)
	}
	s := startServer(t, staticExports{"": {Device: dev}})
	for _, n := range []struct{ network, addr string }{{"tcp", s.tcp}, {"unix", s.sock}} {
		t.Run(n.network, func(t *testing.T) {
			r := rawDialAddr(t, n.network, n.addr)
			r.negotiate("", true)
			testHold(t, r, want)
		})
	}
}

func testHold(t *testing.T, r *rawConn, want []byte) {
	check := func(got map[uint64][]byte, cookies ...uint64) {
		t.Helper()
		for _, k := range cookies {
			if off := k * 4096; !bytes.Equal(got[k], want[off:off+4096]) {
				t.Fatalf("reply to read %d: wrong or missing data", k)
			}
		}
	}
	var burst []byte
	for k := range uint64(6) {
		burst = append(burst, rawRequest(0, CmdRead, k, k*4096, 4096)...)
	}
	r.write(burst) // one batch of 6: depth 6
	check(readReplies(r, 6), 0, 1, 2, 3, 4, 5)
	waits, filled := holdStats.waits.Load(), holdStats.filled.Load()
	r.send(0, CmdRead, 7, 7*4096, 4096, nil)
	check(readReplies(r, 1), 7)
	if holdStats.waits.Load() == waits {
		t.Fatal("no wait for more after one request from a client at depth 6")
	}
	if holdStats.filled.Load() != filled {
		t.Fatal("a wait was ended by a request nobody sent")
	}
	// The pieces of a burst, a millisecond apart: every request is
	// answered, whether it arrived within a wait or after one.
	for k := uint64(8); k < 40; k++ {
		r.send(0, CmdRead, k, k*4096, 4096, nil)
		if k%4 == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	got := readReplies(r, 32)
	for k := uint64(8); k < 40; k++ {
		check(got, k)
	}
	t.Logf("%d waits, %d ended by a request", holdStats.waits.Load()-waits, holdStats.filled.Load()-filled)
}
