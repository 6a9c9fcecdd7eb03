package nbd

// Constants the client needs that proto.go does not define.
const (
	// BlockStatusHole and BlockStatusZero are the base:allocation status
	// bits (NBD_STATE_HOLE, NBD_STATE_ZERO) passed to BlockStatus callbacks.
	BlockStatusHole = 1 << 0
	BlockStatusZero = 1 << 1

	// clientOldstyleMagic is the second magic of the (unsupported)
	// oldstyle handshake.
	clientOldstyleMagic = 0x00420281861253

	clientDefaultPort = "10809"

	// clientDefaultMinBlock etc. are the size constraints assumed when
	// the server does not send NBD_INFO_BLOCK_SIZE.
	clientDefaultMinBlock  = 1
	clientDefaultPrefBlock = 4096
	clientDefaultMaxBlock  = DefaultMaxPayload

	// clientMaxBlockLimit bounds the min block size a server may
	// advertise (the spec's 64 KiB).
	clientMaxBlockLimit = 64 << 10

	// clientMaxEffect is the largest length we put in one TRIM,
	// WRITE_ZEROES, CACHE or BLOCK_STATUS request (2 GiB, aligned to any
	// legal minimum block size); longer ranges are split.
	clientMaxEffect = 1 << 31

	// clientMaxReplyAlloc caps how much memory the client allocates on
	// behalf of one reply (block-status descriptors of a request).
	clientMaxReplyAlloc = 64 << 20

	// clientMaxErrorChunk caps the payload of an error chunk: error (4),
	// message length (2), message (<= 64 KiB) and a trailing offset (8).
	clientMaxErrorChunk = 6 + 65535 + 8

	// clientMaxString is the spec's limit on names and descriptions.
	clientMaxString = 4096

	// clientMaxOptReplies bounds the number of replies we accept to one
	// option (NBD_OPT_LIST, NBD_OPT_GO, ...), so a hostile server cannot
	// make us loop or grow memory forever.
	clientMaxOptReplies = 1 << 16
)
