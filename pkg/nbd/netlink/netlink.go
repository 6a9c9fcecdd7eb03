// Package netlink configures the kernel's nbd driver (/dev/nbdN) through its
// generic netlink family "nbd" (include/uapi/linux/nbd-netlink.h): CONNECT
// hands the kernel connected sockets whose peers speak the NBD transmission
// phase, RECONFIGURE replaces dead ones, DISCONNECT tears a device down,
// STATUS lists devices, and the "nbd_mc_group" multicast group announces
// connections that died (LINK_DEAD).
//
// It knows nothing of volumes or servers: callers bring the sockets.
package netlink

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/mdlayher/genetlink"
	mnl "github.com/mdlayher/netlink"
	"k8s.io/klog/v2"
)

// ErrNotAvailable is wrapped by Open when the running kernel has no "nbd"
// generic netlink family (the nbd module is not loaded or not built).
var ErrNotAvailable = errors.New("the kernel has no nbd generic netlink family (is the nbd module loaded?)")

// Client sends nbd commands. Each command uses its own netlink socket, so
// a late acknowledgement can never be taken for the answer to the next
// request, and a Client is safe for concurrent use.
type Client struct {
	family uint16
	group  uint32 // 0 if the kernel announced no multicast group
}

// Open resolves the nbd family. It fails with ErrNotAvailable when the
// family does not exist.
func Open(ctx context.Context) (*Client, error) {
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("nbd netlink: dial generic netlink: %w", err)
	}
	defer conn.Close()
	stop := bindContext(ctx, conn)
	defer stop()
	fam, err := conn.GetFamily(FamilyName)
	if err != nil {
		if mnl.IsNotExist(err) {
			return nil, ErrNotAvailable
		}
		return nil, fmt.Errorf("nbd netlink: resolve family %q: %w", FamilyName, err)
	}
	c := &Client{family: fam.ID}
	for _, g := range fam.Groups {
		if g.Name == MulticastGroup {
			c.group = g.ID
		}
	}
	return c, nil
}

// bindContext makes blocking calls on conn give up when ctx is done.
func bindContext(ctx context.Context, conn *genetlink.Conn) (stop func()) {
	if d, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(d)
	}
	s := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	return func() { s() }
}

// execute sends one command and returns the messages answering it with
// that command (the acknowledgement is consumed or discarded).
func (c *Client) execute(ctx context.Context, cmd uint8, attrs []byte) ([]genetlink.Message, error) {
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("dial generic netlink: %w", err)
	}
	defer conn.Close()
	stop := bindContext(ctx, conn)
	defer stop()
	req := genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: FamilyVersion},
		Data:   attrs,
	}
	// Always ask for an acknowledgement: DISCONNECT and RECONFIGURE send
	// nothing else on success, and CONNECT or STATUS answer first, so the
	// first message read is the answer either way.
	msgs, err := conn.Execute(req, c.family, mnl.Request|mnl.Acknowledge)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return nil, err
	}
	var out []genetlink.Message
	for _, m := range msgs {
		if m.Header.Command == cmd {
			out = append(out, m)
		}
	}
	return out, nil
}

// Connect configures a device with c and returns its index.
func (c *Client) Connect(ctx context.Context, cfg ConnectConfig) (uint32, error) {
	attrs, err := encodeConnect(cfg)
	if err != nil {
		return 0, err
	}
	msgs, err := c.execute(ctx, cmdConnect, attrs)
	if err != nil {
		return 0, fmt.Errorf("nbd netlink: connect (index %d, %d sockets): %w", cfg.Index, len(cfg.Sockets), err)
	}
	if len(msgs) == 0 {
		// The kernel configured the device but could not allocate its
		// reply; only a chosen index is known then.
		if cfg.Index != AnyIndex {
			return uint32(cfg.Index), nil
		}
		return 0, errors.New("nbd netlink: connect: the kernel sent no reply naming the device")
	}
	return decodeIndex(msgs[0].Data)
}

// Reconfigure changes a connected device: fresh sockets for dead ones, a
// new size, new timeouts.
func (c *Client) Reconfigure(ctx context.Context, cfg ReconfigureConfig) error {
	attrs, err := encodeReconfigure(cfg)
	if err != nil {
		return err
	}
	if _, err := c.execute(ctx, cmdReconfigure, attrs); err != nil {
		return fmt.Errorf("nbd netlink: reconfigure nbd%d: %w", cfg.Index, err)
	}
	return nil
}

// Disconnect tears the device down: the kernel sends NBD_CMD_DISC on every
// socket and shuts them down.
func (c *Client) Disconnect(ctx context.Context, index uint32) error {
	attrs, err := encodeIndex(index)
	if err != nil {
		return err
	}
	if _, err := c.execute(ctx, cmdDisconnect, attrs); err != nil {
		return fmt.Errorf("nbd netlink: disconnect nbd%d: %w", index, err)
	}
	return nil
}

// Status reports one device (index ≥ 0) or every device (AnyIndex). A
// device that does not exist is simply absent from the result.
func (c *Client) Status(ctx context.Context, index int) ([]DeviceStatus, error) {
	var attrs []byte
	if index != AnyIndex {
		if index < 0 {
			return nil, fmt.Errorf("nbd netlink: status: invalid index %d", index)
		}
		var err error
		if attrs, err = encodeIndex(uint32(index)); err != nil {
			return nil, err
		}
	}
	msgs, err := c.execute(ctx, cmdStatus, attrs)
	if err != nil {
		return nil, fmt.Errorf("nbd netlink: status: %w", err)
	}
	var out []DeviceStatus
	for _, m := range msgs {
		st, err := decodeStatus(m.Data)
		if err != nil {
			return nil, err
		}
		out = append(out, st...)
	}
	return out, nil
}

// WatchLinkDead joins the LINK_DEAD multicast group and sends the index of
// every device one of whose connections died, until ctx is done (then the
// channel is closed). Notifications can be lost (a full socket buffer), so
// callers should poll Status as a backstop.
func (c *Client) WatchLinkDead(ctx context.Context) (<-chan uint32, error) {
	if c.group == 0 {
		return nil, errors.New("nbd netlink: the kernel announced no nbd multicast group")
	}
	conn, err := genetlink.Dial(nil)
	if err != nil {
		return nil, fmt.Errorf("nbd netlink: dial generic netlink: %w", err)
	}
	if err := conn.JoinGroup(c.group); err != nil {
		conn.Close()
		return nil, fmt.Errorf("nbd netlink: join group %q: %w", MulticastGroup, err)
	}
	ch := make(chan uint32, 16)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Unix(1, 0)) })
	go func() {
		defer close(ch)
		defer conn.Close()
		defer stop()
		for {
			msgs, _, err := conn.Receive()
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				// ENOBUFS: notifications were dropped; the caller's
				// polling finds what they said.
				klog.V(2).InfoS("nbd netlink: multicast receive failed", "err", err)
				select {
				case <-ctx.Done():
					return
				case <-time.After(100 * time.Millisecond):
				}
				continue
			}
			for _, m := range msgs {
				if m.Header.Command != cmdLinkDead {
					continue
				}
				idx, err := decodeIndex(m.Data)
				if err != nil {
					klog.V(2).InfoS("nbd netlink: bad LINK_DEAD notification", "err", err)
					continue
				}
				select {
				case ch <- idx:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return ch, nil
}
