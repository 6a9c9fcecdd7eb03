package attach

import (
	"encoding/binary"
	"net"
)

// discConn is our end of one kernel connection. It remembers the last
// request header read, so that when serving ends we know whether the
// kernel said goodbye (NBD_CMD_DISC: the device is being disconnected) or
// the connection broke (a timeout, an error: replace it). Embedding the
// concrete *net.UnixConn keeps the writev path of net.Buffers.
type discConn struct {
	*net.UnixConn
	tail [requestHeaderLen]byte
	n    int
}

const (
	requestHeaderLen = 28
	requestMagic     = 0x25609513
	cmdDisc          = 2
)

func (c *discConn) Read(p []byte) (int, error) {
	n, err := c.UnixConn.Read(p)
	if n > 0 {
		c.remember(p[:n])
	}
	return n, err
}

func (c *discConn) remember(b []byte) {
	if len(b) >= requestHeaderLen {
		copy(c.tail[:], b[len(b)-requestHeaderLen:])
		c.n = requestHeaderLen
		return
	}
	keep := min(c.n, requestHeaderLen-len(b))
	copy(c.tail[:keep], c.tail[c.n-keep:c.n])
	copy(c.tail[keep:], b)
	c.n = keep + len(b)
}

// sawDisc reports whether the last bytes read were an NBD_CMD_DISC
// request (which has no payload, so nothing follows it).
func (c *discConn) sawDisc() bool {
	return c.n == requestHeaderLen &&
		binary.BigEndian.Uint32(c.tail[0:]) == requestMagic &&
		binary.BigEndian.Uint16(c.tail[6:]) == cmdDisc
}
