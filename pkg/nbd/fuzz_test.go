package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// fuzzServe feeds input to a fresh server connection as if a client had
// sent it, reads and discards whatever the server answers, and requires
// the connection to end by itself (no hang, no panic).
func fuzzServe(t *testing.T, input []byte) {
	dev := newTestDevice(1 << 20)
	ro := newTestDevice(64 << 10)
	ro.caps.ReadOnly = true
	srv, err := NewServer(ServerConfig{
		Exports:          staticExports{"": {Device: dev}, "ro": {Device: ro}},
		HandshakeTimeout: 2 * time.Second,
		MaxInFlight:      4,
	})
	if err != nil {
		t.Fatal(err)
	}
	client, server := net.Pipe()
	srv.ServeConn(context.Background(), server)
	go io.Copy(io.Discard, client)
	client.SetWriteDeadline(time.Now().Add(5 * time.Second))
	client.Write(input)
	client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Shutdown waits for the connection: it must have ended on EOF.
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatalf("connection did not end: %v", err)
	}
}

func optBytes(opt uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// handshakePrefix negotiates structured replies and base:allocation and
// enters transmission on the default export.
func handshakePrefix(export string) []byte {
	b := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	b = append(b, optBytes(optStructuredReply, nil)...)
	b = append(b, optBytes(optSetMetaContext, rawMetaPayload(export, AllocationContext))...)
	return append(b, optBytes(optGo, rawGoPayload(export, infoBlockSize))...)
}

func FuzzHandshake(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	f.Add(handshakePrefix(""))
	f.Add(append(flags, optBytes(optList, nil)...))
	f.Add(append(flags, optBytes(optInfo, rawGoPayload("ro", infoName, infoDescription, infoBlockSize))...))
	f.Add(append(flags, optBytes(optExportName, []byte("ro"))...))
	f.Add(append(flags, optBytes(optListMetaContext, rawMetaPayload("", "base:"))...))
	f.Add(append(flags, optBytes(optStartTLS, nil)...))
	f.Add(append(flags, optBytes(99, []byte("junk"))...))
	f.Add(append(flags, optBytes(optAbort, nil)...))
	f.Add(append(append(flags, optBytes(optExtendedHeaders, nil)...), optBytes(optExportName, nil)...))
	f.Add(append(append(flags, optBytes(optExtendedHeaders, nil)...), optBytes(optStructuredReply, nil)...))
	f.Add(append(flags, optBytes(optGo, []byte{0, 0, 0, 9, 'x'})...))
	f.Add([]byte{0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzServe(t, data)
	})
}

// seeder returns a function adding the concatenation of its arguments to
// f's seed corpus.
func seeder(f *testing.F) func(parts ...[]byte) {
	return func(parts ...[]byte) {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		f.Add(b)
	}
}

func FuzzRequests(f *testing.F) {
	pre := handshakePrefix("")
	add := seeder(f)
	add(rawRequest(0, CmdRead, 1, 0, 4096))
	add(rawRequest(CmdFlagFUA, CmdWrite, 2, 4096, 8), []byte("abcdefgh"))
	add(rawRequest(CmdFlagReqOne, CmdBlockStatus, 3, 0, 1<<20))
	add(rawRequest(CmdFlagFastZero|CmdFlagNoHole, CmdWriteZeroes, 4, 0, 65536))
	add(rawRequest(0, CmdTrim, 5, 0, 65536), rawRequest(0, CmdFlush, 6, 0, 0))
	add(rawRequest(0, CmdCache, 7, 0, 4096), rawRequest(0, CmdDisc, 8, 0, 0))
	add(rawRequest(0, CmdRead, 9, 1<<20, 1))
	add(rawRequest(0xffff, 77, 10, 0, 0))
	add(rawRequest(0, CmdWrite, 11, 0, 1<<30))
	add(rawRequest(CmdFlagDF, CmdRead, 12, 100, 3))
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzServe(t, append(pre[:len(pre):len(pre)], data...))
	})
}
