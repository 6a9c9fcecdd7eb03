package nbd

import (
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// loopbackCongestion is the congestion control of TCP connections whose
// both ends are on this host.
//
// Such a connection crosses no network, so congestion control has nothing
// to learn, but the default one can still cost. Kernels may default to
// BBR (the one these figures come from does). BBR paces, and where the
// device has no fq qdisc, as loopback never has, the kernel paces with a
// timer that sends from softirq context on whatever CPU it fires. A
// loopback packet goes through the backlog of the CPU that sent it, so
// packets sent from two CPUs can arrive out of order; the client's SACKs
// then have the server retransmit data that was never lost. nbdcopy
// reading 1 GiB over 127.0.0.1 met 40-150 such fast retransmits per GiB.
//
// Reno does not pace, and any process may choose it:
// net.ipv4.tcp_allowed_congestion_control always lists it. It is set on a
// loopback listener, so that connections start with it and never pace
// (none of the reordering is left, nbdcopy's sequential reads of 1 GiB go
// from 3.7 to 4.2 GB/s with one connection and from 3.0-3.4 to 3.9-4.0
// GB/s with four), and on each loopback connection a listener on other
// addresses accepts (pacing, once started, stays on, but at Reno's rate
// it seldom waits: 4.1-4.3 and 3.4 GB/s). fio's 4k reads are unchanged.
const loopbackCongestion = "reno"

// tuneListener prepares a listener before it accepts anything, and
// tells whether what it accepts inherits the loopback congestion control.
func tuneListener(ln net.Listener) bool {
	if tl, ok := ln.(*net.TCPListener); ok {
		if a, ok := tl.Addr().(*net.TCPAddr); ok && a.IP.IsLoopback() {
			setLoopbackCongestion(tl)
			return true
		}
	}
	return false
}

// tuneTCP sets what the server wants of an accepted TCP connection;
// inherited: it has the loopback congestion control from its listener.
func tuneTCP(tc *net.TCPConn, inherited bool) {
	// Replies are written whole; Nagle would only add latency.
	_ = tc.SetNoDelay(true)
	if !inherited && isLoopbackConn(tc) {
		setLoopbackCongestion(tc)
	}
}

// isLoopbackConn reports whether both ends of c are loopback addresses.
func isLoopbackConn(c net.Conn) bool {
	l, lok := c.LocalAddr().(*net.TCPAddr)
	r, rok := c.RemoteAddr().(*net.TCPAddr)
	return lok && rok && l.IP.IsLoopback() && r.IP.IsLoopback()
}

// loopbackDialControl is a net.Dialer's Control: a TCP connection to a
// loopback address gets the loopback congestion control before it
// connects, so it never starts pacing and its writes arrive in order. An
// nbd:// volume on nbdkit memory at 127.0.0.1, written with nbdcopy
// through csi-nbd serve: 35-83 fast retransmits per GiB -> none, 0.8-1.0
// -> 0.86-1.1 GB/s.
func loopbackDialControl(network, address string, rc syscall.RawConn) error {
	if network != "tcp4" && network != "tcp6" {
		return nil
	}
	if ap, err := netip.ParseAddrPort(address); err == nil && ap.Addr().Unmap().IsLoopback() {
		setLoopbackCongestionRaw(rc)
	}
	return nil
}

// setLoopbackCongestion gives s's socket the loopback congestion control.
func setLoopbackCongestion(s syscall.Conn) {
	if rc, err := s.SyscallConn(); err == nil {
		setLoopbackCongestionRaw(rc)
	}
}

// setLoopbackCongestionRaw sets the loopback congestion control on rc's
// socket. A failure leaves the system's, which works, only slower.
func setLoopbackCongestionRaw(rc syscall.RawConn) {
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, loopbackCongestion)
	})
}
