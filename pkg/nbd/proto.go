// Package nbd implements the NBD (Network Block Device) protocol: a server
// that serves backends.Device volumes to any NBD client, a client, and the
// kernel attach path. It knows nothing of CSI.
//
// The wire format follows doc/proto.md of the NetworkBlockDevice project
// (fixed newstyle negotiation, structured replies, base:allocation), and
// the extended headers of its extension-ext-header branch (64-bit lengths).
package nbd

// Handshake magics and flags.
const (
	nbdMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic        = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic   = 0x0003e889045565a9
	requestMagic    = 0x25609513
	simpleMagic     = 0x67446698
	structuredMagic = 0x668e33ef

	extendedRequestMagic = 0x21e41c71 // NBD_OPT_EXTENDED_HEADERS
	extendedReplyMagic   = 0x6e8a278c

	flagFixedNewstyle = 1 << 0 // server handshake flags
	flagNoZeroes      = 1 << 1

	clientFlagFixedNewstyle = 1 << 0 // client flags
	clientFlagNoZeroes      = 1 << 1
)

// Option codes (NBD_OPT_*).
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
	optExtendedHeaders = 11
)

// Option reply types (NBD_REP_*). Errors have bit 31 set.
const (
	repAck             = 1
	repServer          = 2
	repInfo            = 3
	repMetaContext     = 4
	repErrUnsup        = 1<<31 | 1
	repErrPolicy       = 1<<31 | 2
	repErrInvalid      = 1<<31 | 3
	repErrPlatform     = 1<<31 | 4
	repErrTLSReqd      = 1<<31 | 5
	repErrUnknown      = 1<<31 | 6
	repErrShutdown     = 1<<31 | 7
	repErrBlockSizeReq = 1<<31 | 8
	repErrTooBig       = 1<<31 | 9
	repErrExtHeaderReq = 1<<31 | 10
)

// NBD_INFO_* types inside NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags (per export).
const (
	FlagHasFlags        = 1 << 0
	FlagReadOnly        = 1 << 1
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagRotational      = 1 << 4
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagSendDF          = 1 << 7
	FlagCanMultiConn    = 1 << 8
	FlagSendResize      = 1 << 9
	FlagSendCache       = 1 << 10
	FlagSendFastZero    = 1 << 11
)

// Commands (NBD_CMD_*).
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6
	CmdBlockStatus = 7
)

// Command flags (NBD_CMD_FLAG_*).
const (
	CmdFlagFUA      = 1 << 0
	CmdFlagNoHole   = 1 << 1
	CmdFlagDF       = 1 << 2
	CmdFlagReqOne   = 1 << 3
	CmdFlagFastZero = 1 << 4
	// CmdFlagPayloadLen marks an extended request whose length is that
	// of a payload following it (always so for WRITE), not an effect
	// length.
	CmdFlagPayloadLen = 1 << 5
)

// Structured reply chunk types and flags.
const (
	replyFlagDone = 1 << 0

	replyTypeNone           = 0
	replyTypeOffsetData     = 1
	replyTypeOffsetHole     = 2
	replyTypeBlockStatus    = 5
	replyTypeBlockStatusExt = 6 // 64-bit extents, extended headers only
	replyTypeError          = 1<<15 | 1
	replyTypeErrorOffset    = 1<<15 | 2
)

// Protocol error numbers (NBD_E*); they match Linux errno values.
const (
	EPERM     = 1
	EIO       = 5
	ENOMEM    = 12
	EINVAL    = 22
	ENOSPC    = 28
	EOVERFLOW = 75
	ENOTSUP   = 95
	ESHUTDOWN = 108
)

// Sizes and limits.
const (
	requestHeaderSize    = 28
	simpleReplySize      = 16
	structuredHeaderSize = 20
	extendedHeaderSize   = 32 // extended requests and replies alike

	// DefaultMaxPayload is the largest READ/WRITE we accept (the size
	// the reference server and qemu use); advertised through INFO_BLOCK_SIZE.
	DefaultMaxPayload = 32 << 20
	// maxOptionLen bounds option payloads during negotiation: a name is
	// at most 4 KiB, and nothing legitimate needs more than a few of them.
	maxOptionLen = 64 << 10
	// AllocationContext is the only meta context we serve.
	AllocationContext = "base:allocation"
)
