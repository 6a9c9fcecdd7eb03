package nbd

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"strconv"
	"syscall"
)

// Error is an error the server returned for a transmission-phase request
// (or one the client raised locally for a request it refused to send, in
// which case Message says so). Unwrap returns the matching syscall.Errno,
// so errors.Is(err, syscall.ENOSPC) works.
type Error struct {
	Cmd     uint32 // NBD_CMD_* of the failed request
	Errno   uint32 // NBD_E* value as sent by the server
	Message string // human-readable message from an error chunk, if any
}

func (e *Error) Error() string {
	s := "nbd: " + clientCmdName(e.Cmd) + ": " + clientErrnoName(e.Errno)
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap returns the syscall.Errno equivalent of Errno (EIO for values the
// protocol does not define).
func (e *Error) Unwrap() error { return clientErrno(e.Errno) }

func clientErrno(v uint32) syscall.Errno {
	switch v {
	case EPERM:
		return syscall.EPERM
	case EIO:
		return syscall.EIO
	case ENOMEM:
		return syscall.ENOMEM
	case EINVAL:
		return syscall.EINVAL
	case ENOSPC:
		return syscall.ENOSPC
	case EOVERFLOW:
		return syscall.EOVERFLOW
	case ENOTSUP:
		return syscall.ENOTSUP
	case ESHUTDOWN:
		return syscall.ESHUTDOWN
	}
	return syscall.EIO
}

// OptionError is a negative reply (NBD_REP_ERR_*) to a handshake option.
// Unwrap maps NBD_REP_ERR_UNKNOWN to fs.ErrNotExist, NBD_REP_ERR_POLICY to
// fs.ErrPermission and NBD_REP_ERR_UNSUP to errors.ErrUnsupported.
type OptionError struct {
	Option    uint32 // NBD_OPT_*
	Reply     uint32 // NBD_REP_ERR_*
	Export    string // export name, if the option names one
	HasExport bool
	Message   string // server's message, if any
}

func (e *OptionError) Error() string {
	s := "nbd: " + clientOptName(e.Option)
	if e.HasExport {
		s += " for export " + strconv.Quote(e.Export)
	}
	s += ": " + clientRepName(e.Reply)
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

func (e *OptionError) Unwrap() error {
	switch e.Reply {
	case repErrUnknown:
		return fs.ErrNotExist
	case repErrPolicy:
		return fs.ErrPermission
	case repErrUnsup:
		return errors.ErrUnsupported
	}
	return nil
}

// ErrClientClosed is returned for requests on a Client after Close. It
// wraps net.ErrClosed.
var ErrClientClosed = fmt.Errorf("nbd: client closed: %w", net.ErrClosed)

// ErrClientProtocol is wrapped by every error caused by the server
// violating the protocol; the connection is closed when one is detected.
var ErrClientProtocol = errors.New("nbd: protocol violation by server")

func clientProtoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrClientProtocol, fmt.Sprintf(format, args...))
}

func clientCmdName(cmd uint32) string {
	switch cmd {
	case CmdRead:
		return "NBD_CMD_READ"
	case CmdWrite:
		return "NBD_CMD_WRITE"
	case CmdDisc:
		return "NBD_CMD_DISC"
	case CmdFlush:
		return "NBD_CMD_FLUSH"
	case CmdTrim:
		return "NBD_CMD_TRIM"
	case CmdCache:
		return "NBD_CMD_CACHE"
	case CmdWriteZeroes:
		return "NBD_CMD_WRITE_ZEROES"
	case CmdBlockStatus:
		return "NBD_CMD_BLOCK_STATUS"
	}
	return "NBD_CMD_" + strconv.FormatUint(uint64(cmd), 10)
}

func clientErrnoName(v uint32) string {
	var name string
	switch v {
	case EPERM:
		name = "EPERM"
	case EIO:
		name = "EIO"
	case ENOMEM:
		name = "ENOMEM"
	case EINVAL:
		name = "EINVAL"
	case ENOSPC:
		name = "ENOSPC"
	case EOVERFLOW:
		name = "EOVERFLOW"
	case ENOTSUP:
		name = "ENOTSUP"
	case ESHUTDOWN:
		name = "ESHUTDOWN"
	default:
		return "error " + strconv.FormatUint(uint64(v), 10) + " (treated as EIO)"
	}
	return name + " (" + clientErrno(v).Error() + ")"
}

func clientOptName(opt uint32) string {
	switch opt {
	case optExportName:
		return "NBD_OPT_EXPORT_NAME"
	case optAbort:
		return "NBD_OPT_ABORT"
	case optList:
		return "NBD_OPT_LIST"
	case optStartTLS:
		return "NBD_OPT_STARTTLS"
	case optInfo:
		return "NBD_OPT_INFO"
	case optGo:
		return "NBD_OPT_GO"
	case optStructuredReply:
		return "NBD_OPT_STRUCTURED_REPLY"
	case optListMetaContext:
		return "NBD_OPT_LIST_META_CONTEXT"
	case optSetMetaContext:
		return "NBD_OPT_SET_META_CONTEXT"
	case optExtendedHeaders:
		return "NBD_OPT_EXTENDED_HEADERS"
	}
	return "NBD_OPT_" + strconv.FormatUint(uint64(opt), 10)
}

func clientRepName(rep uint32) string {
	switch rep {
	case repAck:
		return "NBD_REP_ACK"
	case repServer:
		return "NBD_REP_SERVER"
	case repInfo:
		return "NBD_REP_INFO"
	case repMetaContext:
		return "NBD_REP_META_CONTEXT"
	case repErrUnsup:
		return "NBD_REP_ERR_UNSUP"
	case repErrPolicy:
		return "NBD_REP_ERR_POLICY"
	case repErrInvalid:
		return "NBD_REP_ERR_INVALID"
	case repErrPlatform:
		return "NBD_REP_ERR_PLATFORM"
	case repErrTLSReqd:
		return "NBD_REP_ERR_TLS_REQD"
	case repErrUnknown:
		return "NBD_REP_ERR_UNKNOWN"
	case repErrShutdown:
		return "NBD_REP_ERR_SHUTDOWN"
	case repErrBlockSizeReq:
		return "NBD_REP_ERR_BLOCK_SIZE_REQD"
	case repErrTooBig:
		return "NBD_REP_ERR_TOO_BIG"
	case repErrExtHeaderReq:
		return "NBD_REP_ERR_EXT_HEADER_REQD"
	}
	if rep&(1<<31) != 0 {
		return "NBD_REP_ERR_" + strconv.FormatUint(uint64(rep&^(1<<31)), 10)
	}
	return "NBD_REP_" + strconv.FormatUint(uint64(rep), 10)
}
