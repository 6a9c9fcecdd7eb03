// Package fuseloop hands a backends.Device to the kernel as a block device
// on hosts without the nbd driver: the device is exposed as one regular
// file in a tiny FUSE file system (go-fuse), and a loop device with direct
// I/O is attached to that file. The result, /dev/loopN, is used like
// /dev/nbdN.
//
//	app → fs on /dev/loopN → loop (direct I/O) → FUSE file → this process → Device
//
// # How requests map
//
// READ → Device.ReadAt, WRITE → Device.WriteAt, FSYNC and FLUSH → Device.Flush
// (the loop driver turns a block-layer flush, and FUA, into fsync),
// FALLOCATE(ZERO_RANGE) → Device.Zero with ZeroNoHole, and
// FALLOCATE(PUNCH_HOLE) → Device.Zero (holes allowed).
//
// PUNCH_HOLE deliberately does not go to Device.Trim: the loop driver sends
// both discards and write-zeroes-with-unmap (what mkfs, ext4's
// sb_issue_zeroout and BLKZEROOUT use) as PUNCH_HOLE, so the range must
// read back as zeros afterwards, which Trim does not promise. Devices
// without an efficient Zero (Caps.Zero false) answer PUNCH_HOLE with
// EOPNOTSUPP instead of writing zeros: fstrim then reports that discard is
// unsupported and the block layer writes zeros itself where it needs
// them, at the same cost.
//
// # Caching
//
// The file is opened with FOPEN_DIRECT_IO (and parallel direct writes)
// and the loop device uses direct I/O, so the data is cached once, in the
// page cache of the file system on /dev/loopN, not again for the FUSE
// file. FUSE requests are at most 512 KiB (max_write), at most 64 in the
// background (max_background).
//
// # Serving, and surviving a restart
//
// The package reads /dev/fuse itself (a few reader goroutines, each
// request answered in a goroutine of its own, the reply built in the
// request's buffer) and has go-fuse's ProtocolServer decode and encode
// the messages, rather than running a fuse.Server: that one insists on
// beginning with the INIT handshake, so it cannot take over a connection
// another process started. There is no splice; replies are written with
// one write(2).
//
// The file system is stateless towards the kernel: the directory is node
// 1, the file node 2, every open gets file handle 0. A new server
// therefore understands the inodes and open files the kernel got from its
// predecessor. The FUSE connection lives as long as any descriptor of its
// /dev/fuse file is open, so a keeper holding a copy (FuseFD; package
// fdstore, csi-nbd fdstore) keeps it, and its requests, across the death
// of the server. Resume then replays the predecessor's INIT request
// (InitRequest, saved by the caller) to negotiate the same settings
// without telling the kernel, writes FUSE_NOTIFY_RESEND (Linux 6.9) so
// that requests the predecessor read but never answered are queued
// again, and serves. Applications see a pause, not an error: requests
// wait in the kernel while nobody serves (FUSE has no request timeout
// unless fs.fuse.default_request_timeout is set). Resent requests may
// have been carried out already; READ, WRITE, FSYNC, FLUSH and FALLOCATE
// are idempotent at the block level, so doing one twice is harmless. The
// keeper should hold LoopFD too: the loop is configured to detach on its
// last close, which a dead server's loop descriptor would otherwise be
// while nothing has the device open.
//
// # Limits
//
//   - Without a keeper, a restart of the serving process is an outage:
//     when the last /dev/fuse descriptor closes, the kernel aborts the
//     connection, every read and write of /dev/loopN fails with EIO,
//     writes the application thought buffered are lost and ext4 aborts
//     its journal; CleanupStale and a new Attach (a new /dev/loopM) are
//     needed. With a keeper, a restart (crash, SIGKILL, a new container
//     image) is survived; losing the keeper as well (the whole pod
//     deleted, a reboot of the node) is not, and neither is a kernel
//     older than 6.9, where Resume fails.
//   - Memory reclaim: writing back dirty pages of the file system on
//     /dev/loopN needs this process to serve the write. If serving needs
//     memory while the machine is short of it, and reclaim waits for that
//     same writeback, the machine can stall. Loop's worker threads already
//     run with PF_MEMALLOC_NOIO, and with direct I/O no page cache of the
//     FUSE file is involved, but the serving process itself allocates
//     (Go heap, backends). Mitigations belong to the process, not this
//     package: PR_SET_IO_FLUSHER on every thread (it is inherited by new
//     threads, so set it before the Go runtime starts more, e.g. by
//     re-executing the binary after setting it), a bounded write path,
//     and a memory limit well above the working set. The nbd attach has
//     the same exposure; nbd's own mitigations apply here too.
//   - Throughput is below nbd's: every request crosses the loop driver and
//     FUSE, each with its own queueing and a copy; see hack/bench-fuseloop.sh.
//   - Needs CAP_SYS_ADMIN (mount and loop control), /dev/fuse and
//     /dev/loop-control; see Available.
//
// # Ownership and cleanup
//
// The loop device is configured with LO_FLAGS_AUTOCLEAR and its descriptor
// is held open for the life of the Attachment, so when the process dies
// (and no keeper holds a copy) the kernel detaches the loop by itself as
// soon as nobody else has it open (or when the file system on it is
// unmounted). Its lo_file_name
// carries a marker derived from Config.Dir ("csi-nbd:<hash>:<name>"), so
// CleanupStale finds our loops even when their backing path is no longer
// reachable, and never touches loop devices of anyone else.
package fuseloop
