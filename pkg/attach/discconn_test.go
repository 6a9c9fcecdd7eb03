package attach

import (
	"encoding/binary"
	"testing"
)

func discHeader(typ uint16) []byte {
	h := make([]byte, requestHeaderLen)
	binary.BigEndian.PutUint32(h[0:], requestMagic)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], 77)
	return h
}

func TestDiscConnRemembersTheLastHeader(t *testing.T) {
	write := append(discHeader(1), make([]byte, 4096)...)
	for _, tc := range []struct {
		name   string
		chunks [][]byte
		want   bool
	}{
		{"disc alone", [][]byte{discHeader(cmdDisc)}, true},
		{"disc after a write, one read", [][]byte{append(append([]byte{}, write...), discHeader(cmdDisc)...)}, true},
		{"disc split over reads", [][]byte{write, discHeader(cmdDisc)[:5], discHeader(cmdDisc)[5:20], discHeader(cmdDisc)[20:]}, true},
		{"ends with a flush", [][]byte{discHeader(cmdDisc), discHeader(3)}, false},
		{"ends inside a payload", [][]byte{discHeader(1), make([]byte, 100)}, false},
		{"short", [][]byte{discHeader(cmdDisc)[:27]}, false},
		{"nothing", nil, false},
	} {
		var c discConn
		for _, ch := range tc.chunks {
			c.remember(ch)
		}
		if got := c.sawDisc(); got != tc.want {
			t.Errorf("%s: sawDisc %v, want %v", tc.name, got, tc.want)
		}
	}
}
