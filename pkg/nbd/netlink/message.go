package netlink

import (
	"errors"
	"fmt"
	"math"
	"time"

	mnl "github.com/mdlayher/netlink"
)

// Names and numbers of include/uapi/linux/nbd-netlink.h (kernel ABI: the
// values never change, new ones are only appended).
const (
	FamilyName     = "nbd"
	FamilyVersion  = 1
	MulticastGroup = "nbd_mc_group"
)

// Commands (NBD_CMD_*).
const (
	cmdConnect     = 1
	cmdDisconnect  = 2
	cmdReconfigure = 3
	cmdLinkDead    = 4
	cmdStatus      = 5
)

// Top-level attributes (NBD_ATTR_*).
const (
	attrIndex             = 1  // u32
	attrSizeBytes         = 2  // u64
	attrBlockSizeBytes    = 3  // u64
	attrTimeout           = 4  // u64, seconds
	attrServerFlags       = 5  // u64
	attrClientFlags       = 6  // u64
	attrSockets           = 7  // nested NBD_SOCK_ITEMs
	attrDeadConnTimeout   = 8  // u64, seconds
	attrDeviceList        = 9  // nested NBD_DEVICE_ITEMs (STATUS reply)
	attrBackendIdentifier = 10 // NUL-terminated string (kernel 5.14+)
)

// Nested attributes.
const (
	sockItem = 1 // NBD_SOCK_ITEM, holding:
	sockFD   = 1 // NBD_SOCK_FD u32

	deviceItem      = 1 // NBD_DEVICE_ITEM, holding:
	deviceIndex     = 1 // NBD_DEVICE_INDEX u32
	deviceConnected = 2 // NBD_DEVICE_CONNECTED u8
)

// ClientFlags are NBD_CFLAG_*: how the kernel manages the device.
type ClientFlags uint64

const (
	// DestroyOnDisconnect removes /dev/nbdN when it is disconnected.
	DestroyOnDisconnect ClientFlags = 1 << 0
	// DisconnectOnClose disconnects when the last opener closes it.
	DisconnectOnClose ClientFlags = 1 << 1
)

// MaxBackendIdentifier bounds BackendIdentifier: it is a single netlink
// attribute, and a path component in sysfs tooling besides.
const MaxBackendIdentifier = 1024

// ConnectConfig is everything NBD_CMD_CONNECT takes.
type ConnectConfig struct {
	// Index is the device to configure (/dev/nbdIndex); AnyIndex lets the
	// kernel choose a free one (or create one).
	Index int
	// Size is the device size in bytes (required).
	Size uint64
	// BlockSize is the logical block size: a power of two from 512 to the
	// page size. 0 leaves the kernel default (1024).
	BlockSize uint64
	// ServerFlags are the NBD transmission flags (NBD_FLAG_*) the server
	// would have sent in the handshake; the kernel uses READ_ONLY,
	// SEND_FLUSH, SEND_FUA, SEND_TRIM, CAN_MULTI_CONN, ROTATIONAL and, on
	// newer kernels, SEND_WRITE_ZEROES.
	ServerFlags uint64
	ClientFlags ClientFlags
	// Timeout is the per-request timeout; 0 leaves the kernel default
	// (30 s on kernels since 4.x). With one connection, only a nonzero
	// Timeout makes the kernel requeue requests when the connection dies.
	Timeout time.Duration
	// DeadConnTimeout is how long requests wait for a RECONFIGURE when
	// every connection is dead before they fail; 0 fails them at once.
	DeadConnTimeout time.Duration
	// BackendIdentifier names what serves the device; RECONFIGURE must
	// then carry the same string. Shown in /sys/block/nbdN/backend.
	BackendIdentifier string
	// Sockets are file descriptors of connected stream sockets whose
	// peers speak the NBD transmission phase. The kernel takes its own
	// references; the caller may close them once Connect returns.
	Sockets []int
}

// AnyIndex asks the kernel to pick the device.
const AnyIndex = -1

// ReconfigureConfig is what NBD_CMD_RECONFIGURE takes. Zero values leave
// the kernel's settings as they are.
type ReconfigureConfig struct {
	Index uint32
	// Size grows (or shrinks) the device; 0 keeps it.
	Size uint64
	// Timeout and DeadConnTimeout change the timeouts when nonzero.
	Timeout         time.Duration
	DeadConnTimeout time.Duration
	// ClientFlags replaces the client flags when non-nil.
	ClientFlags *ClientFlags
	// BackendIdentifier must match the one given at CONNECT, if any.
	BackendIdentifier string
	// Sockets replace dead connections, one each; extra ones are ignored
	// (the kernel drops them).
	Sockets []int
}

// DeviceStatus is one entry of NBD_CMD_STATUS. Connected means the kernel
// holds a configuration for it (it has been connected and not yet torn
// down), not that every socket is alive.
type DeviceStatus struct {
	Index     uint32
	Connected bool
}

func seconds(name string, d time.Duration) (uint64, error) {
	if d < 0 {
		return 0, fmt.Errorf("nbd netlink: %s %v is negative", name, d)
	}
	// The kernel counts whole seconds; round up so a short timeout does not
	// become "none".
	return uint64((d + time.Second - 1) / time.Second), nil
}

func checkBlockSize(bs uint64) error {
	if bs == 0 {
		return nil
	}
	if bs < 512 || bs > 65536 || bs&(bs-1) != 0 {
		return fmt.Errorf("nbd netlink: block size %d is not a power of two from 512 to the page size", bs)
	}
	return nil
}

func encodeSockets(ae *mnl.AttributeEncoder, fds []int) error {
	if len(fds) == 0 {
		return errors.New("nbd netlink: at least one socket is required")
	}
	for _, fd := range fds {
		if fd < 0 || fd > math.MaxInt32 {
			return fmt.Errorf("nbd netlink: invalid socket descriptor %d", fd)
		}
	}
	ae.Nested(attrSockets, func(nae *mnl.AttributeEncoder) error {
		for _, fd := range fds {
			nae.Nested(sockItem, func(s *mnl.AttributeEncoder) error {
				s.Uint32(sockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
	return nil
}

func encodeBackend(ae *mnl.AttributeEncoder, id string) error {
	if id == "" {
		return nil
	}
	if len(id) > MaxBackendIdentifier {
		return fmt.Errorf("nbd netlink: backend identifier is %d bytes, more than %d", len(id), MaxBackendIdentifier)
	}
	for i := 0; i < len(id); i++ {
		if id[i] == 0 {
			return errors.New("nbd netlink: backend identifier contains a NUL byte")
		}
	}
	ae.String(attrBackendIdentifier, id)
	return nil
}

// encodeConnect returns the attributes of a CONNECT request.
func encodeConnect(c ConnectConfig) ([]byte, error) {
	if c.Size == 0 {
		return nil, errors.New("nbd netlink: connect: size is required")
	}
	if c.Index < AnyIndex || c.Index > math.MaxInt32 {
		return nil, fmt.Errorf("nbd netlink: connect: invalid index %d", c.Index)
	}
	if err := checkBlockSize(c.BlockSize); err != nil {
		return nil, err
	}
	to, err := seconds("timeout", c.Timeout)
	if err != nil {
		return nil, err
	}
	dead, err := seconds("dead connection timeout", c.DeadConnTimeout)
	if err != nil {
		return nil, err
	}
	ae := mnl.NewAttributeEncoder()
	if c.Index != AnyIndex {
		ae.Uint32(attrIndex, uint32(c.Index))
	}
	ae.Uint64(attrSizeBytes, c.Size)
	if c.BlockSize != 0 {
		ae.Uint64(attrBlockSizeBytes, c.BlockSize)
	}
	if to != 0 {
		ae.Uint64(attrTimeout, to)
	}
	ae.Uint64(attrServerFlags, c.ServerFlags)
	if c.ClientFlags != 0 {
		ae.Uint64(attrClientFlags, uint64(c.ClientFlags))
	}
	if err := encodeSockets(ae, c.Sockets); err != nil {
		return nil, err
	}
	if dead != 0 {
		ae.Uint64(attrDeadConnTimeout, dead)
	}
	if err := encodeBackend(ae, c.BackendIdentifier); err != nil {
		return nil, err
	}
	return ae.Encode()
}

// encodeReconfigure returns the attributes of a RECONFIGURE request.
func encodeReconfigure(c ReconfigureConfig) ([]byte, error) {
	if c.Index > math.MaxInt32 {
		return nil, fmt.Errorf("nbd netlink: reconfigure: invalid index %d", c.Index)
	}
	to, err := seconds("timeout", c.Timeout)
	if err != nil {
		return nil, err
	}
	dead, err := seconds("dead connection timeout", c.DeadConnTimeout)
	if err != nil {
		return nil, err
	}
	ae := mnl.NewAttributeEncoder()
	ae.Uint32(attrIndex, c.Index)
	if c.Size != 0 {
		ae.Uint64(attrSizeBytes, c.Size)
	}
	if to != 0 {
		ae.Uint64(attrTimeout, to)
	}
	if c.ClientFlags != nil {
		ae.Uint64(attrClientFlags, uint64(*c.ClientFlags))
	}
	if len(c.Sockets) > 0 {
		if err := encodeSockets(ae, c.Sockets); err != nil {
			return nil, err
		}
	}
	if dead != 0 {
		ae.Uint64(attrDeadConnTimeout, dead)
	}
	if err := encodeBackend(ae, c.BackendIdentifier); err != nil {
		return nil, err
	}
	return ae.Encode()
}

// encodeIndex returns a lone NBD_ATTR_INDEX (DISCONNECT, STATUS of one).
func encodeIndex(index uint32) ([]byte, error) {
	ae := mnl.NewAttributeEncoder()
	ae.Uint32(attrIndex, index)
	return ae.Encode()
}

// decodeIndex finds NBD_ATTR_INDEX in a CONNECT reply or a LINK_DEAD
// notification.
func decodeIndex(b []byte) (uint32, error) {
	ad, err := mnl.NewAttributeDecoder(b)
	if err != nil {
		return 0, fmt.Errorf("nbd netlink: decoding reply: %w", err)
	}
	var (
		idx   uint32
		found bool
	)
	for ad.Next() {
		if ad.Type() == attrIndex {
			if len(ad.Bytes()) != 4 {
				return 0, fmt.Errorf("nbd netlink: index attribute has %d bytes, want 4", len(ad.Bytes()))
			}
			idx, found = ad.Uint32(), true
		}
	}
	if err := ad.Err(); err != nil {
		return 0, fmt.Errorf("nbd netlink: decoding reply: %w", err)
	}
	if !found {
		return 0, errors.New("nbd netlink: reply carries no device index")
	}
	return idx, nil
}

// decodeStatus parses a STATUS reply: NBD_ATTR_DEVICE_LIST holding one
// NBD_DEVICE_ITEM per device.
func decodeStatus(b []byte) ([]DeviceStatus, error) {
	ad, err := mnl.NewAttributeDecoder(b)
	if err != nil {
		return nil, fmt.Errorf("nbd netlink: decoding status: %w", err)
	}
	var out []DeviceStatus
	for ad.Next() {
		if ad.Type() != attrDeviceList {
			continue
		}
		ad.Nested(func(list *mnl.AttributeDecoder) error {
			for list.Next() {
				if list.Type() != deviceItem {
					continue
				}
				var (
					st       DeviceStatus
					hasIndex bool
				)
				list.Nested(func(item *mnl.AttributeDecoder) error {
					for item.Next() {
						switch item.Type() {
						case deviceIndex:
							if len(item.Bytes()) != 4 {
								return fmt.Errorf("device index has %d bytes, want 4", len(item.Bytes()))
							}
							st.Index, hasIndex = item.Uint32(), true
						case deviceConnected:
							if len(item.Bytes()) != 1 {
								return fmt.Errorf("device connected flag has %d bytes, want 1", len(item.Bytes()))
							}
							st.Connected = item.Uint8() != 0
						}
					}
					return item.Err()
				})
				if !hasIndex {
					return errors.New("device item without an index")
				}
				out = append(out, st)
			}
			return list.Err()
		})
	}
	if err := ad.Err(); err != nil {
		return nil, fmt.Errorf("nbd netlink: decoding status: %w", err)
	}
	return out, nil
}
