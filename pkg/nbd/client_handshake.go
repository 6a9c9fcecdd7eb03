package nbd

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"strconv"
	"time"
)

// clientNeg carries the state of the option-haggling phase. It reads and
// writes the connection unbuffered, so that nothing is lost when the
// connection is upgraded to TLS.
type clientNeg struct {
	raw      net.Conn // the connection as handed to us
	conn     net.Conn // raw, or the TLS connection layered on it
	noZeroes bool
	tls      bool
}

// clientWatchCtx applies ctx's deadline to conn and arranges for a
// cancellation of ctx to abort any blocked I/O on conn. The returned
// function undoes both.
func clientWatchCtx(ctx context.Context, conn net.Conn) (stop func()) {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stopAfter := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		stopAfter()
		conn.SetDeadline(time.Time{})
	}
}

// clientCtxErr prefers ctx's error over the I/O error it caused.
func clientCtxErr(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("nbd: handshake: %w", ctx.Err())
		}
	}
	return err
}

func clientIOErr(what string, err error) error {
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("nbd: %s: %w", what, err)
}

// greet performs the fixed newstyle greeting.
func (n *clientNeg) greet() error {
	var b [18]byte
	if _, err := io.ReadFull(n.conn, b[:]); err != nil {
		return clientIOErr("reading server greeting", err)
	}
	if binary.BigEndian.Uint64(b[0:]) != nbdMagic {
		return clientProtoErr("bad greeting magic %#x: not an NBD server", binary.BigEndian.Uint64(b[0:]))
	}
	switch m := binary.BigEndian.Uint64(b[8:]); m {
	case optMagic:
	case clientOldstyleMagic:
		return errors.New("nbd: server uses the oldstyle handshake, which is not supported")
	default:
		return clientProtoErr("bad greeting magic %#x", m)
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	if hflags&flagFixedNewstyle == 0 {
		return errors.New("nbd: server does not support fixed newstyle negotiation")
	}
	cflags := uint32(clientFlagFixedNewstyle)
	if hflags&flagNoZeroes != 0 {
		cflags |= clientFlagNoZeroes
		n.noZeroes = true
	}
	var cb [4]byte
	binary.BigEndian.PutUint32(cb[:], cflags)
	if _, err := n.conn.Write(cb[:]); err != nil {
		return clientIOErr("sending client flags", err)
	}
	return nil
}

func (n *clientNeg) sendOpt(opt uint32, data []byte) error {
	buf := make([]byte, 16+len(data))
	binary.BigEndian.PutUint64(buf[0:], optMagic)
	binary.BigEndian.PutUint32(buf[8:], opt)
	binary.BigEndian.PutUint32(buf[12:], uint32(len(data)))
	copy(buf[16:], data)
	if _, err := n.conn.Write(buf); err != nil {
		return clientIOErr("sending "+clientOptName(opt), err)
	}
	return nil
}

// readReply reads one option reply, checking that it answers opt.
func (n *clientNeg) readReply(opt uint32) (typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(n.conn, h[:]); err != nil {
		return 0, nil, clientIOErr("reading reply to "+clientOptName(opt), err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != optReplyMagic {
		return 0, nil, clientProtoErr("bad option reply magic %#x in reply to %s", m, clientOptName(opt))
	}
	if o := binary.BigEndian.Uint32(h[8:]); o != opt {
		return 0, nil, clientProtoErr("reply for %s while waiting for %s", clientOptName(o), clientOptName(opt))
	}
	typ = binary.BigEndian.Uint32(h[12:])
	length := binary.BigEndian.Uint32(h[16:])
	if length > maxOptionLen {
		return 0, nil, clientProtoErr("%s reply to %s has length %d (limit %d)", clientRepName(typ), clientOptName(opt), length, maxOptionLen)
	}
	if typ == repAck && length != 0 {
		return 0, nil, clientProtoErr("NBD_REP_ACK to %s has length %d", clientOptName(opt), length)
	}
	if length > 0 {
		data = make([]byte, length)
		if _, err := io.ReadFull(n.conn, data); err != nil {
			return 0, nil, clientIOErr("reading reply to "+clientOptName(opt), err)
		}
	}
	return typ, data, nil
}

func clientIsErrRep(typ uint32) bool { return typ&(1<<31) != 0 }

func clientOptErr(opt, typ uint32, data []byte) *OptionError {
	msg := data
	if len(msg) > clientMaxString {
		msg = msg[:clientMaxString]
	}
	return &OptionError{Option: opt, Reply: typ, Message: string(msg)}
}

// startTLS sends NBD_OPT_STARTTLS and upgrades the connection.
func (n *clientNeg) startTLS(ctx context.Context, cfg *tls.Config) error {
	if err := n.sendOpt(optStartTLS, nil); err != nil {
		return err
	}
	typ, data, err := n.readReply(optStartTLS)
	if err != nil {
		return err
	}
	if typ != repAck {
		if clientIsErrRep(typ) {
			return fmt.Errorf("nbd: server refused TLS: %w", clientOptErr(optStartTLS, typ, data))
		}
		return clientProtoErr("unexpected %s reply to NBD_OPT_STARTTLS", clientRepName(typ))
	}
	tc := tls.Client(n.raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	n.conn = tc
	n.tls = true
	return nil
}

// abort politely ends option haggling (soft disconnect), best effort.
func (n *clientNeg) abort() {
	n.conn.SetDeadline(time.Now().Add(time.Second))
	if n.sendOpt(optAbort, nil) == nil {
		n.readReply(optAbort) // the server may also just close
	}
}

// clientNegotiated is the outcome of a successful handshake.
type clientNegotiated struct {
	size                  uint64
	flags                 uint16
	minBS, prefBS, maxBS  uint32
	name, desc            string
	structured            bool
	metaNames             []string // index i has id metaIDs[i]
	metaIDs               []uint32
	sawBlockSize, usedOld bool
}

func (n *clientNeg) handshake(ctx context.Context, cfg ClientConfig) (*clientNegotiated, error) {
	if len(cfg.ExportName) > clientMaxString {
		return nil, fmt.Errorf("nbd: export name longer than %d bytes", clientMaxString)
	}
	if err := n.greet(); err != nil {
		return nil, err
	}
	if cfg.TLS != nil {
		if err := n.startTLS(ctx, cfg.TLS); err != nil {
			return nil, err
		}
	}
	res := &clientNegotiated{
		name:   cfg.ExportName,
		minBS:  clientDefaultMinBlock,
		prefBS: clientDefaultPrefBlock,
		maxBS:  clientDefaultMaxBlock,
	}
	if !cfg.NoStructuredReplies {
		if err := n.sendOpt(optStructuredReply, nil); err != nil {
			return nil, err
		}
		typ, data, err := n.readReply(optStructuredReply)
		if err != nil {
			return nil, err
		}
		switch {
		case typ == repAck:
			res.structured = true
		case typ == repErrTLSReqd, typ == repErrShutdown:
			n.abort()
			return nil, clientOptErr(optStructuredReply, typ, data)
		case clientIsErrRep(typ):
			// Not supported: simple replies only.
		default:
			return nil, clientProtoErr("unexpected %s reply to NBD_OPT_STRUCTURED_REPLY", clientRepName(typ))
		}
	}
	if res.structured {
		metas := cfg.MetaContexts
		if metas == nil {
			metas = []string{AllocationContext}
		}
		if len(metas) > 0 {
			if err := n.setMeta(cfg.ExportName, metas, res); err != nil {
				return nil, err
			}
		}
	}
	if err := n.goOpt(cfg.ExportName, res); err != nil {
		return nil, err
	}
	if res.flags&FlagHasFlags == 0 {
		res.flags = 0
	}
	return res, nil
}

func clientPutString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

func (n *clientNeg) setMeta(export string, queries []string, res *clientNegotiated) error {
	data := clientPutString(nil, export)
	data = binary.BigEndian.AppendUint32(data, uint32(len(queries)))
	for _, q := range queries {
		if len(q) > clientMaxString {
			return fmt.Errorf("nbd: meta context query longer than %d bytes", clientMaxString)
		}
		data = clientPutString(data, q)
	}
	if len(data) > maxOptionLen {
		return errors.New("nbd: too many meta context queries")
	}
	if err := n.sendOpt(optSetMetaContext, data); err != nil {
		return err
	}
	var names []string
	var ids []uint32
	for i := 0; ; i++ {
		if i > clientMaxOptReplies {
			return clientProtoErr("too many replies to NBD_OPT_SET_META_CONTEXT")
		}
		typ, data, err := n.readReply(optSetMetaContext)
		if err != nil {
			return err
		}
		switch {
		case typ == repMetaContext:
			if len(data) < 5 || len(data)-4 > clientMaxString {
				return clientProtoErr("NBD_REP_META_CONTEXT with bad length %d", len(data))
			}
			id := binary.BigEndian.Uint32(data)
			for _, old := range ids {
				if old == id {
					return clientProtoErr("meta context id %d assigned twice", id)
				}
			}
			names = append(names, string(data[4:]))
			ids = append(ids, id)
		case typ == repAck:
			res.metaNames, res.metaIDs = names, ids
			return nil
		case typ == repErrTLSReqd, typ == repErrShutdown:
			n.abort()
			e := clientOptErr(optSetMetaContext, typ, data)
			e.Export, e.HasExport = export, true
			return e
		case clientIsErrRep(typ):
			// Meta contexts are optional: carry on without any (and
			// disregard those already sent, as the spec requires).
			return nil
		default:
			return clientProtoErr("unexpected %s reply to NBD_OPT_SET_META_CONTEXT", clientRepName(typ))
		}
	}
}

func (n *clientNeg) goOpt(export string, res *clientNegotiated) error {
	data := clientPutString(nil, export)
	data = binary.BigEndian.AppendUint16(data, 3)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	data = binary.BigEndian.AppendUint16(data, infoName)
	data = binary.BigEndian.AppendUint16(data, infoDescription)
	if err := n.sendOpt(optGo, data); err != nil {
		return err
	}
	sawExport := false
	for i := 0; ; i++ {
		if i > clientMaxOptReplies {
			return clientProtoErr("too many replies to NBD_OPT_GO")
		}
		typ, data, err := n.readReply(optGo)
		if err != nil {
			return err
		}
		switch {
		case typ == repInfo:
			if len(data) < 2 {
				return clientProtoErr("NBD_REP_INFO with length %d", len(data))
			}
			switch it := binary.BigEndian.Uint16(data); it {
			case infoExport:
				if len(data) != 12 {
					return clientProtoErr("NBD_INFO_EXPORT with length %d", len(data))
				}
				res.size = binary.BigEndian.Uint64(data[2:])
				res.flags = binary.BigEndian.Uint16(data[10:])
				sawExport = true
			case infoName:
				if len(data)-2 > clientMaxString {
					return clientProtoErr("NBD_INFO_NAME longer than %d bytes", clientMaxString)
				}
				res.name = string(data[2:])
			case infoDescription:
				if len(data)-2 > clientMaxString {
					return clientProtoErr("NBD_INFO_DESCRIPTION longer than %d bytes", clientMaxString)
				}
				res.desc = string(data[2:])
			case infoBlockSize:
				if len(data) != 14 {
					return clientProtoErr("NBD_INFO_BLOCK_SIZE with length %d", len(data))
				}
				minBS := binary.BigEndian.Uint32(data[2:])
				prefBS := binary.BigEndian.Uint32(data[6:])
				maxBS := binary.BigEndian.Uint32(data[10:])
				if minBS == 0 || minBS > clientMaxBlockLimit || bits.OnesCount32(minBS) != 1 ||
					prefBS < minBS || bits.OnesCount32(prefBS) != 1 || maxBS < minBS {
					return clientProtoErr("invalid block sizes min=%d preferred=%d max=%d", minBS, prefBS, maxBS)
				}
				res.minBS, res.prefBS, res.maxBS = minBS, prefBS, maxBS
				res.sawBlockSize = true
			}
		case typ == repAck:
			if !sawExport {
				return clientProtoErr("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
			}
			return nil
		case typ == repErrUnsup:
			return n.exportName(export, res)
		case clientIsErrRep(typ):
			n.abort()
			e := clientOptErr(optGo, typ, data)
			e.Export, e.HasExport = export, true
			return e
		default:
			return clientProtoErr("unexpected %s reply to NBD_OPT_GO", clientRepName(typ))
		}
	}
}

// exportName is the fallback for servers without NBD_OPT_GO.
func (n *clientNeg) exportName(export string, res *clientNegotiated) error {
	if err := n.sendOpt(optExportName, []byte(export)); err != nil {
		return err
	}
	want := 10
	if !n.noZeroes {
		want += 124
	}
	b := make([]byte, want)
	if _, err := io.ReadFull(n.conn, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("nbd: NBD_OPT_EXPORT_NAME for export %s: server closed the connection (unknown export or refused): %w",
				strconv.Quote(export), io.ErrUnexpectedEOF)
		}
		return clientIOErr("NBD_OPT_EXPORT_NAME", err)
	}
	res.size = binary.BigEndian.Uint64(b)
	res.flags = binary.BigEndian.Uint16(b[8:])
	res.usedOld = true
	// Any block sizes seen in the failed GO still apply.
	return nil
}

// ExportEntry is one export reported by NBD_OPT_LIST.
type ExportEntry struct {
	Name        string
	Description string
}

// List asks the server for its exports (NBD_OPT_LIST), then ends the
// session with NBD_OPT_ABORT. If tlsCfg is non-nil, NBD_OPT_STARTTLS is
// negotiated first. List takes ownership of conn and closes it.
func List(ctx context.Context, conn net.Conn, tlsCfg *tls.Config) ([]ExportEntry, error) {
	n := &clientNeg{raw: conn, conn: conn}
	stop := clientWatchCtx(ctx, conn)
	list, err := n.list(ctx, tlsCfg)
	stop()
	if err == nil {
		n.abort()
	}
	n.conn.SetDeadline(time.Now().Add(time.Second))
	n.conn.Close()
	if err != nil {
		return nil, clientCtxErr(ctx, err)
	}
	return list, nil
}

func (n *clientNeg) list(ctx context.Context, tlsCfg *tls.Config) ([]ExportEntry, error) {
	if err := n.greet(); err != nil {
		return nil, err
	}
	if tlsCfg != nil {
		if err := n.startTLS(ctx, tlsCfg); err != nil {
			return nil, err
		}
	}
	if err := n.sendOpt(optList, nil); err != nil {
		return nil, err
	}
	var list []ExportEntry
	for {
		if len(list) > clientMaxOptReplies {
			return nil, clientProtoErr("too many replies to NBD_OPT_LIST")
		}
		typ, data, err := n.readReply(optList)
		if err != nil {
			return nil, err
		}
		switch {
		case typ == repServer:
			if len(data) < 4 {
				return nil, clientProtoErr("NBD_REP_SERVER with length %d", len(data))
			}
			nl := binary.BigEndian.Uint32(data)
			if uint64(nl) > uint64(len(data)-4) {
				return nil, clientProtoErr("NBD_REP_SERVER name length %d exceeds reply length %d", nl, len(data))
			}
			list = append(list, ExportEntry{Name: string(data[4 : 4+nl]), Description: string(data[4+nl:])})
		case typ == repAck:
			return list, nil
		case clientIsErrRep(typ):
			n.abort()
			return nil, clientOptErr(optList, typ, data)
		default:
			return nil, clientProtoErr("unexpected %s reply to NBD_OPT_LIST", clientRepName(typ))
		}
	}
}
