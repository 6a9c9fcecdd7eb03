package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math/rand/v2"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-nbd/csi-nbd/pkg/backends"
	"github.com/csi-nbd/csi-nbd/pkg/backends/memory"
)

// unreadBytes is what waits in c's receive queue (FIONREAD).
func unreadBytes(t *testing.T, c net.Conn) int {
	t.Helper()
	rc, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var ierr error
	if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil || ierr != nil {
		t.Fatal(err, ierr)
	}
	return n
}

// countingGivers is a memory device that counts the bytes its givers
// are asked for, so a test can tell that the path it covers is taken.
type countingGivers struct {
	*memory.Device
	asked atomic.Uint64
}

type countingGiver struct {
	backends.PageGiver
	asked *atomic.Uint64
}

func (d *countingGivers) NewGiver(consumed func() bool) backends.PageGiver {
	return countingGiver{d.Device.NewGiver(consumed), &d.asked}
}

func (g countingGiver) GiveRead(off, length uint64, give func([]byte, bool) error) error {
	g.asked.Add(length)
	return g.PageGiver.GiveRead(off, length, give)
}

// A large read over a unix socket goes to the client by reference to the
// volume's pages (give.go). Bytes the server has put in the socket before
// a write to the same range must reach the client as they were: the
// write, on another connection, must not change them under the socket.
func TestGivenReadSurvivesLaterWrite(t *testing.T) {
	const size = 8 << 20
	dev := &countingGivers{Device: memory.New(size)}
	rng := rand.New(rand.NewPCG(5, 6))
	old, next := make([]byte, size), make([]byte, size)
	for i := range old {
		old[i] = byte(rng.UintN(255) + 1)
		next[i] = ^old[i]
	}
	if err := dev.WriteAt(context.Background(), old, 0, false); err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(ServerConfig{Exports: staticExports{}})
	if err != nil {
		t.Fatal(err)
	}
	serve := func() net.Conn {
		client, server := socketPair(t)
		done := make(chan struct{})
		go func() {
			srv.ServeTransmission(context.Background(), server, &Export{Device: dev})
			close(done)
		}()
		t.Cleanup(func() { client.Close(); <-done })
		return client
	}
	a, b := serve(), serve()

	// A asks for the whole volume and reads nothing yet: the server puts
	// what the socket takes in it, then waits.
	if _, err := a.Write(rawRequest(0, CmdRead, 1, 0, size)); err != nil {
		t.Fatal(err)
	}
	queued := 0
	for stable := 0; stable < 20; time.Sleep(5 * time.Millisecond) {
		if n := unreadBytes(t, a); n != queued {
			queued, stable = n, 0
		} else {
			stable++
		}
	}
	if queued < 16+giveMin || queued >= 16+size {
		t.Fatalf("%d bytes queued for the client: want a part of the reply, at least %d", queued, 16+giveMin)
	}
	if dev.asked.Load() == 0 {
		t.Fatal("the reply's payload was not given by reference: this test covers nothing")
	}

	// B overwrites the whole volume.
	if _, err := b.Write(append(rawRequest(0, CmdWrite, 2, 0, size), next...)); err != nil {
		t.Fatal(err)
	}
	var rep [16]byte
	if _, err := io.ReadFull(b, rep[:]); err != nil {
		t.Fatal(err)
	}
	if errno := binary.BigEndian.Uint32(rep[4:]); errno != 0 {
		t.Fatalf("write failed: errno %d", errno)
	}

	got := make([]byte, 16+size)
	if _, err := io.ReadFull(a, got); err != nil {
		t.Fatal(err)
	}
	if errno := binary.BigEndian.Uint32(got[4:]); errno != 0 || binary.BigEndian.Uint64(got[8:]) != 1 {
		t.Fatalf("read reply header %x", got[:16])
	}
	payload := got[16:]
	// What was in the socket before the write is the old data; the rest
	// of the reply raced with the write, so each byte is old or new.
	if n := queued - 16; !bytes.Equal(payload[:n], old[:n]) {
		t.Fatalf("the write changed bytes already in the socket: %d of %d differ", countDiff(payload[:n], old[:n]), n)
	}
	for i := queued - 16; i < size; i++ {
		if payload[i] != old[i] && payload[i] != next[i] {
			t.Fatalf("byte %d is %#x: neither old %#x nor new %#x", i, payload[i], old[i], next[i])
		}
	}
	// And the volume holds the write.
	back := make([]byte, size)
	if err := dev.ReadAt(context.Background(), back, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, next) {
		t.Fatal("the volume lost the write")
	}
}

func countDiff(a, b []byte) int {
	n := 0
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

// captureGiver records the consumed function a connection hands its
// device.
type captureGiver struct {
	consumed func() bool
	closed   bool
}

func (c *captureGiver) NewGiver(consumed func() bool) backends.PageGiver {
	c.consumed = consumed
	return c
}
func (c *captureGiver) GiveRead(uint64, uint64, func([]byte, bool) error) error { return nil }
func (c *captureGiver) Close()                                                  { c.closed = true }

// consumed, what the device's settling asks, is true exactly when the
// client has read everything sent, and keeps answering after the
// connection is closed, until the giving ends.
func TestGiveConsumed(t *testing.T) {
	client, server := socketPair(t)
	defer client.Close()
	rc, err := server.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var rw replyWriter
	rw.useRaw(rc)
	dev := &captureGiver{}
	rw.useGive(dev, rc)
	if rw.give == nil || dev.consumed == nil {
		t.Fatal("no giving over a unix socket")
	}
	if !dev.consumed() {
		t.Fatal("nothing sent, yet not consumed")
	}
	if _, err := server.Write(make([]byte, 5000)); err != nil {
		t.Fatal(err)
	}
	if dev.consumed() {
		t.Fatal("5000 bytes unread, yet consumed")
	}
	if _, err := io.ReadFull(client, make([]byte, 4999)); err != nil {
		t.Fatal(err)
	}
	if dev.consumed() {
		t.Fatal("1 byte unread, yet consumed")
	}
	server.Write([]byte{1})
	server.Close() // the giving outlives the connection's descriptor
	if dev.consumed() {
		t.Fatal("2 bytes unread after close, yet consumed")
	}
	io.ReadFull(client, make([]byte, 2))
	if !dev.consumed() {
		t.Fatal("all read, yet not consumed")
	}
	rw.give.close()
	if !dev.closed {
		t.Fatal("the giver was not closed")
	}
}
