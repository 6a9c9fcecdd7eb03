package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
)

// clientWindow is how many requests of one split transfer are in flight
// at a time.
const clientWindow = 16

func clientLocalErr(cmd uint16, errno uint32, format string, args ...any) error {
	return &Error{Cmd: uint32(cmd), Errno: errno, Message: "client: " + fmt.Sprintf(format, args...)}
}

// checkAlign enforces the minimum block size the client promised to honour
// by requesting NBD_INFO_BLOCK_SIZE (a short final block at the end of the
// export is allowed); requests past the end are left to the server to
// refuse.
func (c *Client) checkAlign(cmd uint16, off, length uint64) error {
	if c.minBS <= 1 {
		return nil
	}
	m := uint64(c.minBS)
	if off%m != 0 || (length%m != 0 && off+length != c.size) {
		return clientLocalErr(cmd, EINVAL, "offset %d / length %d not aligned to the minimum block size %d", off, length, m)
	}
	return nil
}

func (c *Client) checkFlags(cmd uint16, flags, allowed uint16) error {
	if flags&^allowed != 0 {
		return clientLocalErr(cmd, EINVAL, "unsupported command flags %#x", flags&^allowed)
	}
	return nil
}

func (c *Client) checkWritable(cmd uint16) error {
	if c.flags&FlagReadOnly != 0 {
		return clientLocalErr(cmd, EPERM, "export is read-only")
	}
	return nil
}

// fua strips CmdFlagFUA if the server cannot honour it, in which case the
// caller emulates it with a flush afterwards (if flush is available).
func (c *Client) fua(flags uint16) (uint16, bool) {
	if flags&CmdFlagFUA != 0 && c.flags&FlagSendFUA == 0 {
		return flags &^ CmdFlagFUA, c.flags&FlagSendFlush != 0
	}
	return flags, false
}

func (r *clientReq) set(cmd, flags uint16, off uint64, length uint32, buf []byte) {
	r.cmd, r.flags, r.off, r.length = cmd, flags, off, length
	if cmd == CmdWrite {
		r.payload = buf
	} else {
		r.buf = buf
	}
}

// xfer runs a command over [off, off+length), split into requests of at
// most piece bytes with up to clientWindow of them in flight. buf is the
// READ destination or WRITE payload (len == length), or nil.
func (c *Client) xfer(ctx context.Context, cmd, flags uint16, off, length uint64, buf []byte, piece uint64) error {
	if length <= piece {
		r := clientGetReq()
		r.set(cmd, flags, off, uint32(length), buf)
		return c.do(ctx, r)
	}
	var win [clientWindow]*clientReq
	var firstErr error
	issued, waited := 0, 0
	for pos := uint64(0); ; {
		if pos < length && firstErr == nil && issued-waited < clientWindow {
			n := min(piece, length-pos)
			var sub []byte
			if buf != nil {
				sub = buf[pos : pos+n]
			}
			r := clientGetReq()
			r.set(cmd, flags, off+pos, uint32(n), sub)
			if err := c.start(ctx, r); err != nil {
				clientPutReq(r)
				firstErr = err
				continue
			}
			win[issued%clientWindow] = r
			issued++
			pos += n
			continue
		}
		if waited == issued {
			return firstErr
		}
		r := win[waited%clientWindow]
		win[waited%clientWindow] = nil
		waited++
		err, reuse := c.wait(ctx, r)
		if reuse {
			clientPutReq(r)
		}
		if err != nil && firstErr == nil {
			firstErr = err
		}
	}
}

// ReadAt reads len(p) bytes at off. Large reads are split into requests
// of at most the maximum payload size, sent concurrently. Holes in
// structured replies are zero-filled. If ctx is done before the reply
// arrives, ctx.Err() is returned and p is no longer written to.
func (c *Client) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if len(p) == 0 {
		return nil
	}
	if err := c.checkAlign(CmdRead, off, uint64(len(p))); err != nil {
		return err
	}
	return c.xfer(ctx, CmdRead, 0, off, uint64(len(p)), p, uint64(c.maxReq))
}

// WriteAt writes p at off; flags may contain CmdFlagFUA (emulated with a
// flush if the server lacks FlagSendFUA). p is not retained after return.
func (c *Client) WriteAt(ctx context.Context, p []byte, off uint64, flags uint16) error {
	if err := c.checkFlags(CmdWrite, flags, CmdFlagFUA); err != nil {
		return err
	}
	if err := c.checkWritable(CmdWrite); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	if err := c.checkAlign(CmdWrite, off, uint64(len(p))); err != nil {
		return err
	}
	flags, flush := c.fua(flags)
	if err := c.xfer(ctx, CmdWrite, flags, off, uint64(len(p)), p, uint64(c.maxReq)); err != nil {
		return err
	}
	if flush {
		return c.Flush(ctx)
	}
	return nil
}

// Flush asks the server to persist all completed writes. It is a no-op if
// the server does not advertise FlagSendFlush.
func (c *Client) Flush(ctx context.Context) error {
	if c.flags&FlagSendFlush == 0 {
		return nil
	}
	r := clientGetReq()
	r.set(CmdFlush, 0, 0, 0, nil)
	return c.do(ctx, r)
}

// Trim discards [off, off+length); flags may contain CmdFlagFUA.
func (c *Client) Trim(ctx context.Context, off, length uint64, flags uint16) error {
	if err := c.checkFlags(CmdTrim, flags, CmdFlagFUA); err != nil {
		return err
	}
	if err := c.checkWritable(CmdTrim); err != nil {
		return err
	}
	if c.flags&FlagSendTrim == 0 {
		return clientLocalErr(CmdTrim, ENOTSUP, "server does not support NBD_CMD_TRIM")
	}
	return c.effect(ctx, CmdTrim, flags, off, length)
}

// Zero writes zeroes to [off, off+length) with NBD_CMD_WRITE_ZEROES.
// flags may contain CmdFlagNoHole (allocate, don't punch a hole),
// CmdFlagFastZero (fail with ENOTSUP rather than be slow) and CmdFlagFUA.
func (c *Client) Zero(ctx context.Context, off, length uint64, flags uint16) error {
	if err := c.checkFlags(CmdWriteZeroes, flags, CmdFlagFUA|CmdFlagNoHole|CmdFlagFastZero); err != nil {
		return err
	}
	if err := c.checkWritable(CmdWriteZeroes); err != nil {
		return err
	}
	if c.flags&FlagSendWriteZeroes == 0 {
		return clientLocalErr(CmdWriteZeroes, ENOTSUP, "server does not support NBD_CMD_WRITE_ZEROES")
	}
	if flags&CmdFlagFastZero != 0 && c.flags&FlagSendFastZero == 0 {
		return clientLocalErr(CmdWriteZeroes, ENOTSUP, "server does not support fast zeroing")
	}
	return c.effect(ctx, CmdWriteZeroes, flags, off, length)
}

// Cache asks the server to prefetch [off, off+length).
func (c *Client) Cache(ctx context.Context, off, length uint64) error {
	if c.flags&FlagSendCache == 0 {
		return clientLocalErr(CmdCache, ENOTSUP, "server does not support NBD_CMD_CACHE")
	}
	return c.effect(ctx, CmdCache, 0, off, length)
}

// effect runs a payload-less range command, split into 2 GiB requests.
func (c *Client) effect(ctx context.Context, cmd, flags uint16, off, length uint64) error {
	if length == 0 {
		return nil
	}
	if err := c.checkAlign(cmd, off, length); err != nil {
		return err
	}
	flags, flush := c.fua(flags)
	if err := c.xfer(ctx, cmd, flags, off, length, nil, clientMaxEffect); err != nil {
		return err
	}
	if flush {
		return c.Flush(ctx)
	}
	return nil
}

// BlockStatus queries the negotiated meta contexts for [off, off+length)
// (flags may contain CmdFlagReqOne). For each context's chunk, fn is
// called once per extent, in order, with the context id (see
// MetaContext), the extent length and its status bits (BlockStatusHole,
// BlockStatusZero for base:allocation). The server may describe less (or,
// for the last extent, more) than was asked. fn runs on the caller's
// goroutine after the whole reply has arrived. Lengths above 2 GiB are
// clamped.
func (c *Client) BlockStatus(ctx context.Context, off, length uint64, flags uint16, fn func(contextID uint32, length uint64, status uint32)) error {
	if err := c.checkFlags(CmdBlockStatus, flags, CmdFlagReqOne); err != nil {
		return err
	}
	if len(c.metaIDs) == 0 {
		return clientLocalErr(CmdBlockStatus, ENOTSUP, "no meta context was negotiated")
	}
	if length == 0 {
		return nil
	}
	length = min(length, clientMaxEffect)
	if err := c.checkAlign(CmdBlockStatus, off, length); err != nil {
		return err
	}
	r := clientGetReq()
	r.set(CmdBlockStatus, flags, off, uint32(length), nil)
	if err := c.start(ctx, r); err != nil {
		clientPutReq(r)
		return err
	}
	err, reuse := c.wait(ctx, r)
	if !reuse {
		return err
	}
	if err == nil && fn != nil {
		for b := r.bs; len(b) > 0; {
			n := binary.BigEndian.Uint32(b)
			chunk := b[4 : 4+n]
			b = b[4+n:]
			id := binary.BigEndian.Uint32(chunk)
			for d := chunk[4:]; len(d) >= 8; d = d[8:] {
				fn(id, uint64(binary.BigEndian.Uint32(d)), binary.BigEndian.Uint32(d[4:]))
			}
		}
	}
	clientPutReq(r)
	return err
}

// Do sends a raw request, bypassing the client's checks and splitting
// (for testing servers' error paths), and returns the server's verdict.
// For NBD_CMD_WRITE, payload must be length bytes; other commands take no
// payload. For NBD_CMD_READ, data goes to readBuf[:length] if readBuf is
// non-nil (it must be at least length bytes) and is discarded otherwise.
// Block status replies are validated and discarded. NBD_CMD_DISC is
// refused: use Close.
func (c *Client) Do(ctx context.Context, cmd uint16, flags uint16, off uint64, length uint32, payload []byte, readBuf []byte) error {
	if cmd == CmdDisc {
		return errors.New("nbd: Do cannot send NBD_CMD_DISC; use Close")
	}
	var buf []byte
	if cmd == CmdWrite {
		if uint64(len(payload)) != uint64(length) {
			return fmt.Errorf("nbd: Do: NBD_CMD_WRITE payload is %d bytes, length is %d", len(payload), length)
		}
		buf = payload
	} else if len(payload) != 0 {
		return fmt.Errorf("nbd: Do: payload given for %s", clientCmdName(uint32(cmd)))
	}
	if cmd == CmdRead && readBuf != nil {
		if uint64(len(readBuf)) < uint64(length) {
			return fmt.Errorf("nbd: Do: read buffer of %d bytes for length %d", len(readBuf), length)
		}
		buf = readBuf[:length]
	}
	r := clientGetReq()
	r.set(cmd, flags, off, length, buf)
	return c.do(ctx, r)
}
