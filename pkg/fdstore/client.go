package fdstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Client talks to the store listening on Socket. Each call is one short
// connection; a Client is safe for concurrent use.
type Client struct {
	Socket string
}

// Put stores a duplicate of f under name, replacing (and closing) any
// descriptor stored under it. f stays the caller's.
func (c *Client) Put(ctx context.Context, name string, f *os.File) error {
	if err := CheckName(name); err != nil {
		return err
	}
	_, _, err := c.call(ctx, append([]byte{opPut}, name...), f)
	if err != nil {
		return fmt.Errorf("fdstore: put %q: %w", name, err)
	}
	return nil
}

// Get returns a new descriptor of the file stored under name, or an error
// wrapping ErrNotFound.
func (c *Client) Get(ctx context.Context, name string) (*os.File, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	_, f, err := c.call(ctx, append([]byte{opGet}, name...), nil)
	if err != nil {
		return nil, fmt.Errorf("fdstore: get %q: %w", name, err)
	}
	if f == nil {
		return nil, fmt.Errorf("fdstore: get %q: the store sent no descriptor", name)
	}
	return f, nil
}

// Delete closes the store's descriptor under name; an error wrapping
// ErrNotFound if there is none.
func (c *Client) Delete(ctx context.Context, name string) error {
	if err := CheckName(name); err != nil {
		return err
	}
	if _, _, err := c.call(ctx, append([]byte{opDelete}, name...), nil); err != nil {
		return fmt.Errorf("fdstore: delete %q: %w", name, err)
	}
	return nil
}

// List returns the stored names, sorted.
func (c *Client) List(ctx context.Context) ([]string, error) {
	names, _, err := c.call(ctx, []byte{opList}, nil)
	if err != nil {
		return nil, fmt.Errorf("fdstore: list: %w", err)
	}
	return names, nil
}

// call sends one request (with f, if not nil) and reads the answer: the
// names of a list, and the descriptor of a get.
func (c *Client) call(ctx context.Context, req []byte, f *os.File) (names []string, got *os.File, err error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unixpacket", c.Socket)
	if err != nil {
		return nil, nil, err
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(connTimeout)
	}
	uc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { uc.SetDeadline(time.Now()) })
	defer stop()

	var oob []byte
	if f != nil {
		oob = unix.UnixRights(int(f.Fd()))
	}
	if _, _, err := uc.WriteMsgUnix(req, oob, nil); err != nil {
		return nil, nil, ctxErr(ctx, err)
	}
	buf := make([]byte, maxPacket+1)
	oobBuf := make([]byte, unix.CmsgSpace(4*4))
	for {
		n, oobn, flags, _, err := uc.ReadMsgUnix(buf, oobBuf)
		if err != nil {
			return nil, nil, ctxErr(ctx, err)
		}
		var files []*os.File
		if oobn > 0 {
			files = receivedFiles(oobBuf[:oobn])
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || len(files) > 1 || (len(files) == 1 && req[0] != opGet) {
			closeFiles(files)
			return nil, nil, errors.New("malformed answer")
		}
		a, err := parseAnswer(buf[:n])
		if err != nil {
			closeFiles(files)
			return nil, nil, err
		}
		switch a.status {
		case stName:
			closeFiles(files)
			if req[0] != opList {
				return nil, nil, errors.New("malformed answer: a name to a request other than list")
			}
			names = append(names, a.text)
			continue
		case stNotFound:
			closeFiles(files)
			return nil, nil, ErrNotFound
		case stBad:
			closeFiles(files)
			return nil, nil, fmt.Errorf("store refused: %s", a.text)
		}
		if len(files) == 1 {
			got = files[0]
		}
		return names, got, nil
	}
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
	return err
}
