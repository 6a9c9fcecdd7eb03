// Package fdstore keeps open file descriptors for other processes, by
// name, so that they outlive the process that made them: a FUSE server
// puts its /dev/fuse descriptor here, dies, and its successor gets the
// same descriptor back and carries on serving the same connection.
//
// A Server listens on a unix SOCK_SEQPACKET socket. Every connection
// carries exactly one request and its answer, so a slow or stuck client
// holds up only its own connection (which has a deadline), never the
// store. Descriptors travel with SCM_RIGHTS. Only clients with the
// server's user ID are served.
//
// # Messages
//
// A request is one packet: an operation byte followed by the name
// (1 to MaxName bytes, no NUL, no '/'): 'P' (put; the packet carries one
// descriptor, which replaces any stored under the name), 'G' (get), 'D'
// (delete) or 'L' (list; no name). An answer is one packet starting with a
// status byte: 'K' (done; for get it carries the descriptor), 'N' (no such
// name) or 'E' (bad request, the rest is a message). A list answer is a
// packet 'n'+name per stored name, then 'K'.
package fdstore

import (
	"errors"
	"fmt"
	"strings"
)

// MaxName is the longest name, in bytes.
const MaxName = 255

// Operations and statuses (see the package documentation).
const (
	opPut    = 'P'
	opGet    = 'G'
	opDelete = 'D'
	opList   = 'L'

	stOK       = 'K'
	stNotFound = 'N'
	stBad      = 'E'
	stName     = 'n'

	// maxPacket bounds every packet: an operation or status and a name
	// or message.
	maxPacket = 1 + 1024
)

// ErrNotFound is returned by Get and Delete for names the store does not hold.
var ErrNotFound = errors.New("fdstore: no such name")

// CheckName is nil for names the store accepts.
func CheckName(name string) error {
	switch {
	case name == "":
		return errors.New("fdstore: empty name")
	case len(name) > MaxName:
		return fmt.Errorf("fdstore: name of %d bytes is longer than %d", len(name), MaxName)
	case strings.ContainsAny(name, "\x00/"):
		return fmt.Errorf("fdstore: name %q contains NUL or '/'", name)
	}
	return nil
}

// request is a parsed request packet.
type request struct {
	op   byte
	name string
}

// parseRequest parses one request packet; nfds is how many descriptors
// came with it.
func parseRequest(b []byte, nfds int) (request, error) {
	if len(b) == 0 {
		return request{}, errors.New("empty request")
	}
	r := request{op: b[0], name: string(b[1:])}
	switch r.op {
	case opList:
		if r.name != "" {
			return r, errors.New("list takes no name")
		}
	case opPut, opGet, opDelete:
		if err := CheckName(r.name); err != nil {
			return r, err
		}
	default:
		return r, fmt.Errorf("unknown operation %q", r.op)
	}
	if want := btoi(r.op == opPut); nfds != want {
		return r, fmt.Errorf("operation %q with %d descriptors, want %d", r.op, nfds, want)
	}
	return r, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// answer is a parsed answer packet.
type answer struct {
	status byte
	text   string // name (stName) or message (stBad)
}

func parseAnswer(b []byte) (answer, error) {
	if len(b) == 0 {
		return answer{}, errors.New("fdstore: empty answer (store closed the connection?)")
	}
	a := answer{status: b[0], text: string(b[1:])}
	switch a.status {
	case stOK, stNotFound:
		if a.text != "" {
			return a, fmt.Errorf("fdstore: answer %q with %d bytes of payload", a.status, len(a.text))
		}
	case stBad:
	case stName:
		if err := CheckName(a.text); err != nil {
			return a, err
		}
	default:
		return a, fmt.Errorf("fdstore: unknown answer %q", a.status)
	}
	return a, nil
}
