package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// errHardDisconnect ends negotiation without further replies: the client
// broke the protocol in a way that leaves no safe reply (or asked to go).
var errHardDisconnect = errors.New("client ended negotiation")

// negotiation is the state of the option haggling phase of one connection.
type negotiation struct {
	c          *serverConn
	w          *bufio.Writer
	fixed      bool // client speaks fixed newstyle
	noZeroes   bool
	tls        bool
	structured bool // chunked replies: structured, or extended
	extended   bool // NBD_OPT_EXTENDED_HEADERS: 32-byte headers both ways
	// Meta contexts chosen by the last SET_META_CONTEXT and the export
	// name it referred to; they apply only if GO names the same export.
	metaSet    bool
	metaExport string
	metaAlloc  bool
}

// negotiate runs the fixed newstyle handshake and option phase. It returns
// the export to serve, with its release function, once the client sends
// NBD_OPT_GO or NBD_OPT_EXPORT_NAME.
func (c *serverConn) negotiate(ctx context.Context) (*Export, func(), error) {
	c.setDeadline(time.Now().Add(c.srv.cfg.HandshakeTimeout))
	n := &negotiation{c: c, w: bufio.NewWriterSize(c.conn, 4096)}

	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.conn.Write(hello[:]); err != nil {
		return nil, nil, fmt.Errorf("sending greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return nil, nil, fmt.Errorf("reading client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return nil, nil, fmt.Errorf("client sent unknown handshake flags %#x", flags)
	}
	n.fixed = flags&clientFlagFixedNewstyle != 0
	n.noZeroes = flags&clientFlagNoZeroes != 0

	for {
		exp, release, done, err := n.option(ctx)
		if err != nil || done {
			if err == nil {
				c.setDeadline(time.Time{})
				c.structured = n.structured
				c.extended = n.extended
				c.metaAlloc = n.metaAlloc
			}
			return exp, release, err
		}
	}
}

// option reads and answers one option; done reports entry into
// transmission.
func (n *negotiation) option(ctx context.Context) (exp *Export, release func(), done bool, err error) {
	c := n.c
	var hdr [16]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return nil, nil, false, fmt.Errorf("reading option: %w", err)
	}
	if m := binary.BigEndian.Uint64(hdr[0:]); m != optMagic {
		return nil, nil, false, fmt.Errorf("bad option magic %#x", m)
	}
	opt := binary.BigEndian.Uint32(hdr[8:])
	length := binary.BigEndian.Uint32(hdr[12:])

	if length > maxOptionLen {
		// Too big to be legitimate. Skip a moderately sized payload so
		// the client hears why; anything larger is an attack.
		if opt == optExportName || length > 16<<20 {
			return nil, nil, false, fmt.Errorf("option %d payload of %d bytes is too large", opt, length)
		}
		if _, err := io.CopyN(io.Discard, c.br, int64(length)); err != nil {
			return nil, nil, false, fmt.Errorf("skipping option payload: %w", err)
		}
		return nil, nil, false, n.replyErr(opt, repErrTooBig, "option payload too large")
	}
	data := make([]byte, length)
	if _, err := io.ReadFull(c.br, data); err != nil {
		return nil, nil, false, fmt.Errorf("reading option %d payload: %w", opt, err)
	}

	if c.srv.cfg.TLSMode == TLSRequire && !n.tls {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			return nil, nil, false, errors.New("client chose an export before TLS, which is required")
		default:
			return nil, nil, false, n.replyErr(opt, repErrTLSReqd, "TLS is required: send NBD_OPT_STARTTLS first")
		}
	}

	switch opt {
	case optExportName:
		return n.exportName(ctx, string(data))
	case optAbort:
		// Best effort: the client may already have gone.
		_ = n.reply(opt, repAck, nil)
		return nil, nil, false, errHardDisconnect
	case optList:
		return nil, nil, false, n.list(ctx, data)
	case optStartTLS:
		return nil, nil, false, n.startTLS(ctx, data)
	case optInfo, optGo:
		return n.infoGo(ctx, opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return nil, nil, false, n.replyErr(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no payload")
		}
		if n.extended {
			return nil, nil, false, n.replyErr(opt, repErrExtHeaderReq, "extended headers are already negotiated and take precedence")
		}
		n.structured = true
		return nil, nil, false, n.reply(opt, repAck, nil)
	case optExtendedHeaders:
		if len(data) != 0 {
			return nil, nil, false, n.replyErr(opt, repErrInvalid, "NBD_OPT_EXTENDED_HEADERS takes no payload")
		}
		// Everything structured replies enable comes with them.
		n.extended, n.structured = true, true
		return nil, nil, false, n.reply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return nil, nil, false, n.metaContext(opt, data)
	default:
		if !n.fixed {
			return nil, nil, false, fmt.Errorf("unsupported option %d from a client without fixed newstyle", opt)
		}
		return nil, nil, false, n.replyErr(opt, repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
	}
}

func (n *negotiation) reply(opt, typ uint32, payload []byte) error {
	var hdr [20]byte
	binary.BigEndian.PutUint64(hdr[0:], optReplyMagic)
	binary.BigEndian.PutUint32(hdr[8:], opt)
	binary.BigEndian.PutUint32(hdr[12:], typ)
	binary.BigEndian.PutUint32(hdr[16:], uint32(len(payload)))
	n.w.Write(hdr[:])
	n.w.Write(payload)
	if err := n.w.Flush(); err != nil {
		return fmt.Errorf("sending option reply: %w", err)
	}
	return nil
}

// replyErr sends an NBD_REP_ERR_* with a message for humans.
func (n *negotiation) replyErr(opt, typ uint32, msg string) error {
	if len(msg) > 4096 {
		msg = msg[:4096]
	}
	return n.reply(opt, typ, []byte(msg))
}

func (n *negotiation) exportName(ctx context.Context, name string) (*Export, func(), bool, error) {
	if n.extended {
		// Forbidden to the client (proto.md), and this option has no
		// error reply.
		return nil, nil, false, fmt.Errorf("NBD_OPT_EXPORT_NAME %q after extended headers were negotiated", truncate(name))
	}
	exp, release, err := n.c.srv.cfg.Exports.Open(ctx, name)
	if err != nil {
		// This option has no error reply: all we can do is hang up.
		return nil, nil, false, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", truncate(name), err)
	}
	if n.metaSet && n.metaExport != name {
		n.metaAlloc = false
	}
	size, tflags := exportFlags(exp, n.structured)
	buf := make([]byte, 10, 134)
	binary.BigEndian.PutUint64(buf[0:], size)
	binary.BigEndian.PutUint16(buf[8:], tflags)
	if !n.noZeroes {
		buf = buf[:134]
	}
	if _, err := n.c.conn.Write(buf); err != nil {
		release()
		return nil, nil, false, fmt.Errorf("sending export info: %w", err)
	}
	return exp, release, true, nil
}

func (n *negotiation) list(ctx context.Context, data []byte) error {
	if len(data) != 0 {
		return n.replyErr(optList, repErrInvalid, "NBD_OPT_LIST takes no payload")
	}
	for _, e := range n.c.srv.cfg.Exports.List(ctx) {
		p := make([]byte, 4, 4+len(e.Name)+len(e.Description))
		binary.BigEndian.PutUint32(p, uint32(len(e.Name)))
		p = append(p, e.Name...)
		p = append(p, e.Description...)
		if err := n.reply(optList, repServer, p); err != nil {
			return err
		}
	}
	return n.reply(optList, repAck, nil)
}

func (n *negotiation) startTLS(ctx context.Context, data []byte) error {
	c := n.c
	switch {
	case len(data) != 0:
		return n.replyErr(optStartTLS, repErrInvalid, "NBD_OPT_STARTTLS takes no payload")
	case c.srv.cfg.TLSMode == TLSOff:
		return n.replyErr(optStartTLS, repErrPolicy, "TLS is not enabled on this server")
	case n.tls:
		return n.replyErr(optStartTLS, repErrInvalid, "TLS is already active")
	}
	if err := n.reply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	if c.br.Buffered() > 0 {
		return errors.New("client sent data before the TLS handshake")
	}
	tc := tls.Server(c.conn, c.srv.cfg.TLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.mu.Lock()
	c.conn = tc
	c.mu.Unlock()
	c.br.Reset(tc)
	c.src = tc
	n.w.Reset(tc)
	n.tls = true
	// Everything negotiated in clear text is forgotten (proto.md STARTTLS).
	n.structured, n.extended, n.metaSet, n.metaAlloc, n.metaExport = false, false, false, false, ""
	return nil
}

// infoGo answers NBD_OPT_INFO and NBD_OPT_GO.
func (n *negotiation) infoGo(ctx context.Context, opt uint32, data []byte) (*Export, func(), bool, error) {
	if len(data) < 6 {
		return nil, nil, false, n.replyErr(opt, repErrInvalid, "option payload too short")
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen)+6 > uint64(len(data)) {
		return nil, nil, false, n.replyErr(opt, repErrInvalid, "export name length exceeds payload")
	}
	name := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return nil, nil, false, n.replyErr(opt, repErrInvalid, "information request count does not match payload")
	}
	var wantName, wantDesc bool
	for i := 0; i < nreq; i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}

	exp, release, err := n.c.srv.cfg.Exports.Open(ctx, name)
	if err != nil {
		code := uint32(repErrUnknown)
		if errors.Is(err, ErrNotAllowed) {
			code = repErrPolicy
		}
		logConn(n.c).V(1).Info("Refused export", "export", truncate(name), "err", err)
		return nil, nil, false, n.replyErr(opt, code, err.Error())
	}
	ok := false
	defer func() {
		if !ok {
			release()
		}
	}()

	if opt == optGo && n.metaSet && n.metaExport != name {
		n.metaAlloc = false
	}
	size, tflags := exportFlags(exp, n.structured)
	p := make([]byte, 12)
	binary.BigEndian.PutUint16(p[0:], infoExport)
	binary.BigEndian.PutUint64(p[2:], size)
	binary.BigEndian.PutUint16(p[10:], tflags)
	if err := n.reply(opt, repInfo, p); err != nil {
		return nil, nil, false, err
	}
	if wantName {
		p = binary.BigEndian.AppendUint16(nil, infoName)
		if err := n.reply(opt, repInfo, append(p, name...)); err != nil {
			return nil, nil, false, err
		}
	}
	if wantDesc && exp.Description != "" {
		p = binary.BigEndian.AppendUint16(nil, infoDescription)
		if err := n.reply(opt, repInfo, append(p, exp.Description...)); err != nil {
			return nil, nil, false, err
		}
	}
	// Block sizes are sent even unrequested: clients that cannot honour
	// them simply ignore them, and the limits still apply.
	minB, prefB, maxB := blockSizes(exp.Device.Caps())
	p = binary.BigEndian.AppendUint16(nil, infoBlockSize)
	p = binary.BigEndian.AppendUint32(p, minB)
	p = binary.BigEndian.AppendUint32(p, prefB)
	p = binary.BigEndian.AppendUint32(p, maxB)
	if err := n.reply(opt, repInfo, p); err != nil {
		return nil, nil, false, err
	}
	if err := n.reply(opt, repAck, nil); err != nil {
		return nil, nil, false, err
	}
	if opt == optInfo {
		return nil, nil, false, nil
	}
	ok = true
	return exp, release, true, nil
}

// metaContext answers LIST_META_CONTEXT and SET_META_CONTEXT. The only
// context we know is base:allocation.
func (n *negotiation) metaContext(opt uint32, data []byte) error {
	if opt == optSetMetaContext {
		// SET replaces all previously set contexts "including when this
		// command fails" (proto.md), so forget them before any error
		// return below.
		n.metaSet, n.metaExport, n.metaAlloc = true, "", false
	}
	if opt == optSetMetaContext && !n.structured {
		return n.replyErr(opt, repErrInvalid, "NBD_OPT_SET_META_CONTEXT needs structured replies or extended headers first")
	}
	bad := func(why string) error { return n.replyErr(opt, repErrInvalid, why) }
	if len(data) < 8 {
		return bad("option payload too short")
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen)+8 > uint64(len(data)) {
		return bad("export name length exceeds payload")
	}
	export := string(data[4 : 4+nameLen])
	rest := data[4+nameLen:]
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for i := uint32(0); i < nq; i++ {
		if len(rest) < 4 {
			return bad("query count exceeds payload")
		}
		ql := binary.BigEndian.Uint32(rest)
		if uint64(ql)+4 > uint64(len(rest)) {
			return bad("query length exceeds payload")
		}
		queries = append(queries, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	if len(rest) != 0 {
		return bad("trailing bytes after queries")
	}

	match := false
	if opt == optListMetaContext && nq == 0 {
		match = true // an empty list query asks for everything
	}
	for _, q := range queries {
		if q == AllocationContext || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	if opt == optSetMetaContext {
		n.metaSet, n.metaExport, n.metaAlloc = true, export, match
	}
	if match {
		// The id in LIST replies "is reserved and SHOULD be set to zero"
		// (proto.md); only SET assigns one.
		id := uint32(0)
		if opt == optSetMetaContext {
			id = allocationContextID
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := n.reply(opt, repMetaContext, append(p, AllocationContext...)); err != nil {
			return err
		}
	}
	return n.reply(opt, repAck, nil)
}

// allocationContextID is the id we give base:allocation.
const allocationContextID = 1

func truncate(s string) string {
	if len(s) > 100 {
		return s[:100] + "…"
	}
	return s
}
