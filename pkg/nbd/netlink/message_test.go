package netlink

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"
	"time"
)

// The kernel's layout, spelled out by hand: struct nlattr {u16 nla_len;
// u16 nla_type}, payload, padding to 4 bytes; integers in host order.

func nla(typ uint16, payload []byte) []byte {
	b := make([]byte, 4, 4+len(payload)+3)
	binary.NativeEndian.PutUint16(b[0:], uint16(4+len(payload)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }
func u64(v uint64) []byte { return binary.NativeEndian.AppendUint64(nil, v) }

const nlaFNested = 0x8000 // NLA_F_NESTED

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func TestEncodeConnect(t *testing.T) {
	got, err := encodeConnect(ConnectConfig{
		Index:             3,
		Size:              1 << 30,
		BlockSize:         4096,
		ServerFlags:       1 | 4 | 256,
		ClientFlags:       DisconnectOnClose,
		Timeout:           1500 * time.Millisecond, // rounds up to 2 s
		DeadConnTimeout:   time.Minute,
		BackendIdentifier: "pvc-1",
		Sockets:           []int{7, 9},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := cat(
		nla(1, u32(3)),       // NBD_ATTR_INDEX
		nla(2, u64(1<<30)),   // NBD_ATTR_SIZE_BYTES
		nla(3, u64(4096)),    // NBD_ATTR_BLOCK_SIZE_BYTES
		nla(4, u64(2)),       // NBD_ATTR_TIMEOUT, seconds
		nla(5, u64(1|4|256)), // NBD_ATTR_SERVER_FLAGS
		nla(6, u64(2)),       // NBD_ATTR_CLIENT_FLAGS
		nla(7|nlaFNested, cat( // NBD_ATTR_SOCKETS
			nla(1|nlaFNested, nla(1, u32(7))), // NBD_SOCK_ITEM{NBD_SOCK_FD}
			nla(1|nlaFNested, nla(1, u32(9))),
		)),
		nla(8, u64(60)),              // NBD_ATTR_DEAD_CONN_TIMEOUT
		nla(10, []byte("pvc-1\x00")), // NBD_ATTR_BACKEND_IDENTIFIER, NUL-terminated
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("connect attributes:\n got %x\nwant %x", got, want)
	}
}

func TestEncodeConnectAnyIndexMinimal(t *testing.T) {
	got, err := encodeConnect(ConnectConfig{Index: AnyIndex, Size: 512, Sockets: []int{0}})
	if err != nil {
		t.Fatal(err)
	}
	want := cat(
		nla(2, u64(512)),
		nla(5, u64(0)),
		nla(7|nlaFNested, nla(1|nlaFNested, nla(1, u32(0)))),
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("connect attributes:\n got %x\nwant %x", got, want)
	}
}

func TestEncodeConnectErrors(t *testing.T) {
	ok := ConnectConfig{Index: AnyIndex, Size: 1 << 20, Sockets: []int{3}}
	for name, mut := range map[string]func(*ConnectConfig){
		"no size":          func(c *ConnectConfig) { c.Size = 0 },
		"no sockets":       func(c *ConnectConfig) { c.Sockets = nil },
		"negative fd":      func(c *ConnectConfig) { c.Sockets = []int{-1} },
		"bad index":        func(c *ConnectConfig) { c.Index = -2 },
		"block size 1000":  func(c *ConnectConfig) { c.BlockSize = 1000 },
		"block size 256":   func(c *ConnectConfig) { c.BlockSize = 256 },
		"negative timeout": func(c *ConnectConfig) { c.Timeout = -time.Second },
		"NUL in backend":   func(c *ConnectConfig) { c.BackendIdentifier = "a\x00b" },
		"long backend":     func(c *ConnectConfig) { c.BackendIdentifier = strings.Repeat("x", MaxBackendIdentifier+1) },
	} {
		c := ok
		mut(&c)
		if _, err := encodeConnect(c); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := encodeConnect(ok); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
}

func TestEncodeReconfigure(t *testing.T) {
	cf := ClientFlags(0)
	got, err := encodeReconfigure(ReconfigureConfig{
		Index:             5,
		Size:              2 << 30,
		ClientFlags:       &cf,
		BackendIdentifier: "vol",
		Sockets:           []int{11},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := cat(
		nla(1, u32(5)),
		nla(2, u64(2<<30)),
		nla(6, u64(0)),
		nla(7|nlaFNested, nla(1|nlaFNested, nla(1, u32(11)))),
		nla(10, []byte("vol\x00")),
	)
	if !bytes.Equal(got, want) {
		t.Fatalf("reconfigure attributes:\n got %x\nwant %x", got, want)
	}
	// Nothing but the index: a no-op the kernel accepts.
	got, err = encodeReconfigure(ReconfigureConfig{Index: 0})
	if err != nil {
		t.Fatal(err)
	}
	if want := nla(1, u32(0)); !bytes.Equal(got, want) {
		t.Fatalf("bare reconfigure:\n got %x\nwant %x", got, want)
	}
}

// statusReply is what nbd_genl_status builds: nla_nest_start_noflag, so no
// NLA_F_NESTED bit.
func statusReply(devs ...DeviceStatus) []byte {
	var items [][]byte
	for _, d := range devs {
		var c byte
		if d.Connected {
			c = 1
		}
		items = append(items, nla(1, cat(nla(1, u32(d.Index)), nla(2, []byte{c}))))
	}
	return nla(9, cat(items...))
}

func TestDecodeStatus(t *testing.T) {
	want := []DeviceStatus{{0, true}, {1, false}, {15, true}}
	got, err := decodeStatus(statusReply(want...))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	// A missing device: an empty list.
	got, err = decodeStatus(nla(9, nil))
	if err != nil || len(got) != 0 {
		t.Fatalf("empty list: %v, %v", got, err)
	}
}

func TestDecodeStatusErrors(t *testing.T) {
	for name, b := range map[string][]byte{
		"truncated":       statusReply(DeviceStatus{Index: 1})[:10],
		"item sans index": nla(9, nla(1, nla(2, []byte{1}))),
		"short index":     nla(9, nla(1, nla(1, []byte{1, 2}))),
		"wide connected":  nla(9, nla(1, cat(nla(1, u32(1)), nla(2, u32(1))))),
	} {
		if got, err := decodeStatus(b); err == nil {
			t.Errorf("%s: decoded %v, want an error", name, got)
		}
	}
}

func TestDecodeIndex(t *testing.T) {
	idx, err := decodeIndex(nla(1, u32(42)))
	if err != nil || idx != 42 {
		t.Fatalf("got %d, %v", idx, err)
	}
	if _, err := decodeIndex(nla(2, u64(1))); err == nil {
		t.Fatal("reply without an index accepted")
	}
	if _, err := decodeIndex(nla(1, u64(1))); err == nil {
		t.Fatal("8-byte index accepted")
	}
}

func FuzzDecodeStatus(f *testing.F) {
	f.Add(statusReply(DeviceStatus{0, true}, DeviceStatus{7, false}))
	f.Add(nla(9, nil))
	f.Add(nla(1, u32(3)))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		devs, err := decodeStatus(b)
		if err != nil {
			return
		}
		// Whatever decodes re-encodes to something that decodes the same.
		again, err := decodeStatus(statusReply(devs...))
		if err != nil || len(again) != len(devs) {
			t.Fatalf("round trip of %v: %v, %v", devs, again, err)
		}
		for i := range devs {
			if again[i] != devs[i] {
				t.Fatalf("round trip of %v: %v", devs, again)
			}
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	f.Add(nla(1, u32(3)))
	f.Add(cat(nla(2, u64(1)), nla(1, u32(9))))
	f.Add([]byte{4, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		idx, err := decodeIndex(b)
		if err != nil {
			return
		}
		if again, err := decodeIndex(nla(1, u32(idx))); err != nil || again != idx {
			t.Fatalf("round trip of %d: %d, %v", idx, again, err)
		}
	})
}
