#!/usr/bin/python3
"""Transmission-phase corner cases, checked with python3-libnbd.

Usage: libnbd_io.py URI CASE

Run by peers_python_test.go with Debian's /usr/bin/python3 (the one
python3-libnbd is built for). Each CASE expects the server to be set up
as the Go test describes; the Go side checks the device afterwards.
Prints what it does and exits non-zero on the first failure.
"""

import nbd

from nbdcheck import check, log, run

MiB = 1 << 20


def connect(uri, meta=True, structured=True, strict=True):
    h = nbd.NBD()
    h.set_handle_name("test")
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_request_structured_replies(structured)
    h.set_uri_allow_local_file(True)  # for ?tls-certificates=DIR
    h.connect_uri(uri)
    if not strict:
        # Let libnbd send what it would otherwise refuse client-side, so
        # the server's own checks are what is tested.
        h.set_strict_mode(0)
    return h


def expect_error(what, errname, fn, server=True):
    """Run fn, which must fail with errno errname. With server set, the
    failure must come from the server ("command failed"), not from a
    libnbd client-side check."""
    try:
        fn()
    except nbd.Error as e:
        log("  %s -> %s" % (what, e))
        if e.errno != errname:
            raise AssertionError("%s: got %s, want %s" % (what, e, errname))
        if server and "command failed" not in e.string:
            raise AssertionError("%s: failed client-side, not in the server: %s" % (what, e))
        log("ok: %s fails with %s" % (what, errname))
        return
    raise AssertionError("%s: succeeded, want %s" % (what, errname))


def pattern(n, seed):
    return bytes((seed + i * 7) & 0xff for i in range(n))


def read_chunks(h, count, off, flags=0):
    chunks = []

    def cb(subbuf, offset, status, err):
        chunks.append((offset, len(subbuf), status))
        return 0

    buf = h.pread_structured(count, off, cb, flags)
    return buf, chunks


def case_structured_read(uri):
    h = connect(uri)
    check(h.get_structured_replies_negotiated(), "structured replies negotiated")
    data = pattern(100000, 3)
    h.pwrite(data, 12345)
    for flags in (0, nbd.CMD_FLAG_DF):
        buf, chunks = read_chunks(h, 100000, 12345, flags)
        check(buf == data, "structured read returns the data (flags %#x)" % flags)
        check(chunks == [(12345, 100000, nbd.READ_DATA)],
              "exactly one OFFSET_DATA chunk at the request offset (flags %#x): %r" % (flags, chunks))
    # A read of zeros is one OFFSET_HOLE chunk, with or without DF.
    for flags in (0, nbd.CMD_FLAG_DF):
        buf, chunks = read_chunks(h, 1 * MiB, 8 * MiB, flags)
        check(buf == bytes(1 * MiB) and chunks == [(8 * MiB, 1 * MiB, nbd.READ_HOLE)], "hole read: %r" % chunks)
    # Data and zeros mixed is data.
    h.pwrite(b"x", 8 * MiB + 4095)
    buf, chunks = read_chunks(h, 8192, 8 * MiB)
    check(buf == bytes(4095) + b"x" + bytes(4096) and chunks == [(8 * MiB, 8192, nbd.READ_DATA)], "mixed read: %r" % chunks)
    h.shutdown()


def case_df(uri):
    h = connect(uri)
    check(h.can_df(), "can_df advertised with structured replies")
    h.pwrite(pattern(4 * MiB, 1), 0)
    for count in (1, 65536, 4 * MiB):
        buf, chunks = read_chunks(h, count, 0, nbd.CMD_FLAG_DF)
        check(len(chunks) == 1 and chunks[0] == (0, count, nbd.READ_DATA),
              "DF read of %d bytes is one chunk" % count)
        check(buf == pattern(4 * MiB, 1)[:count], "DF read data")
    h.shutdown()


def case_block_status(uri):
    h = connect(uri)
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation negotiated")
    # Layout (4 KiB blocks): data at [64K, 128K), allocated zeroes at
    # [256K, 260K), hole elsewhere.
    h.pwrite(pattern(65536, 9), 65536)
    h.zero(4096, 262144, nbd.CMD_FLAG_NO_HOLE)

    got = []

    def cb(ctx, off, entries, err):
        check(ctx == nbd.CONTEXT_BASE_ALLOCATION, "context name %s" % ctx)
        got.append((off, list(entries)))
        return 0

    h.block_status(MiB, 0, cb)
    check(len(got) == 1, "one callback per request")
    off, e = got[0]
    want = [65536, 3, 65536, 0, 131072, 3, 4096, 2, MiB - 266240, 3]
    check(off == 0 and e == want, "full extent list %r == %r" % (e, want))

    for (off, count, want) in ((0, MiB, [65536, 3]),
                               (0, 100, [100, 3]),
                               (65536 + 512, MiB, [65536 - 512, 0]),
                               (262144, 4096, [4096, 2]),
                               (262144 + 1, 10, [10, 2]),
                               (1020 * 1024, 4096, [4096, 3])):
        got.clear()
        h.block_status(count, off, cb, nbd.CMD_FLAG_REQ_ONE)
        check(len(got) == 1 and got[0][1] == want,
              "REQ_ONE %d+%d: one extent %r, want %r" % (off, count, got and got[0][1], want))
        check(got[0][1][0] <= count, "REQ_ONE extent no longer than the request")

    # Without REQ_ONE, descriptors exactly tile a small unaligned request.
    got.clear()
    h.block_status(70000, 1000, cb)
    e = got[0][1]
    check(sum(e[0::2]) == 70000 and e == [64536, 3, 5464, 0], "unaligned request tiles: %r" % e)

    # A request beyond the end is the server's EINVAL.
    h.set_strict_mode(0)
    expect_error("block status beyond the end", "EINVAL",
                 lambda: h.block_status(4096, h.get_size(), cb))
    h.block_status(4096, 0, cb)
    h.shutdown()


def case_no_meta_context(uri):
    h = connect(uri, meta=False)
    check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no meta context negotiated")
    expect_error("block status without a context (libnbd refuses)", "ENOTSUP",
                 lambda: h.block_status(4096, 0, lambda *a: 0), server=False)
    h.set_strict_mode(0)
    expect_error("block status without a context", "EINVAL",
                 lambda: h.block_status(4096, 0, lambda *a: 0))
    check(h.pread(4096, 0) == bytes(4096), "connection usable afterwards")
    h.shutdown()


def case_fast_zero(uri):
    h = connect(uri)
    check(h.can_fast_zero(), "can_fast_zero advertised")
    h.pwrite(b"\xff" * 65536, 0)
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    check(h.pread(65536, 0) == bytes(65536), "fast zero zeroed")
    h.shutdown()


def case_no_fast_zero(uri):
    h = connect(uri)
    check(h.can_zero(), "can_zero")
    check(not h.can_fast_zero(), "FAST_ZERO not advertised")
    expect_error("fast zero (libnbd refuses)", "EINVAL",
                 lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO), server=False)
    h.set_strict_mode(0)
    h.pwrite(b"\xff" * 4096, 0)
    expect_error("fast zero not advertised", "EINVAL",
                 lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
    check(h.pread(4096, 0) == b"\xff" * 4096, "refused fast zero left the data alone")
    h.zero(4096, 0)
    check(h.pread(4096, 0) == bytes(4096), "plain zero still works")
    h.shutdown()


def case_no_hole(uri):
    h = connect(uri)
    h.pwrite(b"\x11" * 16384, 0)
    h.zero(16384, 0, nbd.CMD_FLAG_NO_HOLE)
    check(h.pread(16384, 0) == bytes(16384), "NO_HOLE zero zeroed")
    got = []
    h.block_status(16384, 0, lambda c, o, e, err: got.append(list(e)) or 0)
    check(got == [[16384, 2]], "NO_HOLE range is allocated zeroes: %r" % got)
    h.shutdown()


def case_fua(uri):
    # The Go side counts the device's flushes afterwards.
    h = connect(uri)
    check(h.can_fua(), "can_fua advertised")
    h.pwrite(b"\x22" * 4096, 0, nbd.CMD_FLAG_FUA)
    check(h.pread(4096, 0) == b"\x22" * 4096, "FUA write landed")
    h.shutdown()


def case_fua_zero_trim(uri):
    h = connect(uri)
    h.zero(4096, 0, nbd.CMD_FLAG_FUA)
    h.trim(4096, 8192, nbd.CMD_FLAG_FUA)
    h.shutdown()


def case_flush(uri):
    h = connect(uri)
    check(h.can_flush(), "can_flush")
    h.flush()
    h.shutdown()


def case_cache(uri):
    h = connect(uri)
    check(h.can_cache(), "can_cache")
    h.cache(MiB, 0)
    h.set_strict_mode(0)
    expect_error("cache beyond the end", "EINVAL", lambda: h.cache(4096, h.get_size()))
    h.shutdown()


def case_errors(uri):
    """Bounds, payload and zero-length errors; every one must leave the
    connection usable. The export is 64 MiB with a 1 MiB maximum payload."""
    h = connect(uri)
    size = h.get_size()
    maxp = h.get_block_size(nbd.SIZE_MAXIMUM)
    check(maxp == MiB, "maximum payload %d" % maxp)
    expect_error("read beyond end (libnbd refuses)", "EINVAL",
                 lambda: h.pread(512, size), server=False)
    h.set_strict_mode(0)
    expect_error("read beyond end", "EINVAL", lambda: h.pread(512, size))
    expect_error("read straddling the end", "EINVAL", lambda: h.pread(1024, size - 512))
    expect_error("write beyond end", "ENOSPC", lambda: h.pwrite(b"x" * 512, size))
    expect_error("write straddling the end", "ENOSPC", lambda: h.pwrite(b"x" * 1024, size - 512))
    expect_error("zero beyond end", "ENOSPC", lambda: h.zero(4096, size))
    expect_error("trim beyond end", "EINVAL", lambda: h.trim(4096, size))
    expect_error("read over the maximum payload", "EINVAL", lambda: h.pread(2 * MiB, 0))
    expect_error("write over the maximum payload", "EINVAL", lambda: h.pwrite(b"y" * (2 * MiB), 0))
    check(h.pread(MiB, 0) == bytes(MiB), "oversize write was not applied")
    expect_error("zero-length read", "EINVAL", lambda: h.pread(0, 0))
    expect_error("zero-length write", "EINVAL", lambda: h.pwrite(b"", 0))
    expect_error("zero-length zero", "EINVAL", lambda: h.zero(0, 0))
    expect_error("zero-length trim", "EINVAL", lambda: h.trim(0, 0))
    expect_error("zero-length block status", "EINVAL", lambda: h.block_status(0, 0, lambda *a: 0))
    expect_error("invalid flag on read", "EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
    expect_error("invalid flag on write", "EINVAL", lambda: h.pwrite(b"z" * 512, 0, nbd.CMD_FLAG_REQ_ONE))
    expect_error("unknown flag on flush", "EINVAL", lambda: h.flush(1 << 9))
    # Payload-less commands may exceed the maximum payload.
    h.zero(8 * MiB, 0)
    h.trim(8 * MiB, 0)
    h.pwrite(b"ok" * 256, size - 512)
    check(h.pread(512, size - 512) == b"ok" * 256, "connection usable after every error")
    h.shutdown()


def case_read_only(uri):
    h = connect(uri)
    check(h.is_read_only(), "is_read_only")
    check(not h.can_trim() and not h.can_zero() and not h.can_fast_zero(), "no trim/zero on a read-only export")
    expect_error("write (libnbd refuses)", "EPERM", lambda: h.pwrite(b"x" * 512, 0), server=False)
    h.set_strict_mode(0)
    expect_error("write to read-only", "EPERM", lambda: h.pwrite(b"x" * 512, 0))
    expect_error("FUA write to read-only", "EPERM", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA))
    expect_error("trim on read-only", "EPERM", lambda: h.trim(4096, 0))
    expect_error("zero on read-only", "EPERM", lambda: h.zero(4096, 0))
    check(h.pread(4096, 0) == bytes(4096), "reads still work")
    h.flush()
    h.cache(4096, 0)
    h.shutdown()


def case_trim_unsupported(uri):
    h = connect(uri)
    check(not h.can_trim(), "trim not advertised")
    check(h.can_zero(), "zero still advertised")
    expect_error("trim (libnbd refuses)", "EINVAL", lambda: h.trim(4096, 0), server=False)
    h.set_strict_mode(0)
    h.pwrite(b"\x33" * 4096, 0)
    expect_error("trim when unsupported", "EINVAL", lambda: h.trim(4096, 0))
    check(h.pread(4096, 0) == b"\x33" * 4096, "refused trim left the data")
    h.shutdown()


def case_unaligned(uri):
    h = connect(uri)
    check(h.get_block_size(nbd.SIZE_MINIMUM) == 512, "minimum block size 512")
    check(h.get_block_size(nbd.SIZE_PREFERRED) == 4096, "preferred block size 4096")
    expect_error("unaligned read (libnbd refuses)", "EINVAL", lambda: h.pread(100, 0), server=False)
    h.set_strict_mode(0)
    expect_error("unaligned length", "EINVAL", lambda: h.pread(100, 0))
    expect_error("unaligned offset", "EINVAL", lambda: h.pread(512, 1))
    expect_error("unaligned write", "EINVAL", lambda: h.pwrite(b"a" * 513, 512))
    expect_error("unaligned zero", "EINVAL", lambda: h.zero(512, 256))
    expect_error("unaligned trim", "EINVAL", lambda: h.trim(1000, 0))
    expect_error("unaligned cache", "EINVAL", lambda: h.cache(1, 0))
    h.pwrite(b"b" * 1024, 512)
    check(h.pread(1024, 512) == b"b" * 1024, "aligned I/O works")
    check(h.pread(512, 0) == bytes(512), "unaligned write was not applied")
    h.shutdown()


def case_eio(uri):
    """The device fails I/O touching [1 MiB, 1 MiB + 4 KiB) with EIO."""
    for structured in (True, False):
        h = connect(uri, structured=structured)
        check(h.get_structured_replies_negotiated() == structured, "structured=%s" % structured)
        expect_error("read of a failing range", "EIO", lambda: h.pread(4096, MiB))
        expect_error("structured read of a failing range", "EIO",
                     lambda: h.pread_structured(8192, MiB - 4096, lambda *a: 0))
        expect_error("write to a failing range", "EIO", lambda: h.pwrite(b"e" * 4096, MiB))
        expect_error("zero of a failing range", "EIO", lambda: h.zero(4096, MiB))
        expect_error("trim of a failing range", "EIO", lambda: h.trim(4096, MiB))
        if structured:
            expect_error("block status of a failing range", "EIO",
                         lambda: h.block_status(4096, MiB, lambda *a: 0))
        h.pwrite(b"f" * 4096, 0)
        check(h.pread(4096, 0) == b"f" * 4096, "connection usable after EIO")
        h.flush()
        h.shutdown()


def case_no_structured(uri):
    h = connect(uri, structured=False, meta=False)
    check(not h.get_structured_replies_negotiated(), "structured replies not negotiated")
    check(not h.can_df(), "DF not advertised without structured replies")
    data = pattern(65536 + 3, 5)
    h.pwrite(data, 4097)
    check(h.pread(len(data), 4097) == data, "simple read/write round trip")
    buf, chunks = read_chunks(h, 4096, 4097)
    check(buf == data[:4096] and len(chunks) == 1, "pread_structured over simple replies")
    h.zero(4096, MiB, nbd.CMD_FLAG_FUA)
    h.trim(4096, MiB + 8192)
    h.flush()
    h.set_strict_mode(0)
    size = h.get_size()
    expect_error("read beyond end (simple reply)", "EINVAL", lambda: h.pread(512, size))
    expect_error("write beyond end (simple reply)", "ENOSPC", lambda: h.pwrite(b"x" * 512, size))
    expect_error("DF without structured replies", "EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_DF))
    expect_error("block status without structured replies", "EINVAL",
                 lambda: h.block_status(512, 0, lambda *a: 0))
    check(h.pread(len(data), 4097) == data, "still in step after errors")
    h.shutdown()


def case_aio_pipeline(uri):
    """Many commands in flight at once on one handle, completed in any
    order."""
    h = connect(uri)
    n = 256

    def drain(cookies):
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            # Raises if the command failed.
            check_ok = h.aio_command_completed(c)
            if not check_ok:
                raise AssertionError("command %d not completed" % c)

    drain([h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(8192, i))), i * 8192)
           for i in range(n)])
    bufs = [nbd.Buffer(8192) for i in range(n)]
    drain([h.aio_pread(bufs[i], i * 8192) for i in range(n)])
    for i in range(n):
        if bufs[i].to_bytearray() != pattern(8192, i):
            raise AssertionError("aio read %d returned wrong data" % i)
    check(True, "%d pipelined writes and reads" % n)
    h.shutdown()


if __name__ == "__main__":
    run("libnbd_io.py", globals())
