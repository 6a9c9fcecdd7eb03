#!/usr/bin/python3
"""Option-haggling cases, checked with python3-libnbd in option mode.

Usage: libnbd_negotiation.py URI CASE

URI names the server (its export part is ignored). The Go test serves:
  ""      16 MiB, description "default volume"
  "alpha" 1 MiB, description "first"
  "ro"    64 KiB, read-only, no description
Prints what it does and exits non-zero on the first failure.
"""

import nbd

from nbdcheck import check, log, run

EXPORTS = {"": ("default volume", 16 << 20), "alpha": ("first", 1 << 20), "ro": ("", 64 << 10)}


def opt_handle(uri, export=""):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.set_export_name(export)
    check(h.aio_is_negotiating(), "paused in negotiation")
    return h


def case_list(uri):
    h = opt_handle(uri)
    got = {}

    def cb(name, description):
        got[name] = description
        return 0

    n = h.opt_list(cb)
    want = {k: v[0] for k, v in EXPORTS.items()}
    check(n == len(EXPORTS) and got == want, "opt_list %r == %r" % (got, want))
    # Listing twice is fine and negotiation goes on.
    got.clear()
    h.opt_list(cb)
    check(got == want, "second opt_list")
    h.set_export_name("alpha")
    h.opt_go()
    check(h.get_size() == 1 << 20, "GO after LIST")
    h.shutdown()


def case_info(uri):
    h = opt_handle(uri)
    h.set_full_info(True)
    for name, (desc, size) in EXPORTS.items():
        h.set_export_name(name)
        h.opt_info()
        check(h.get_size() == size, "INFO %r size %d" % (name, h.get_size()))
        check(h.is_read_only() == (name == "ro"), "INFO %r read-only flag" % name)
        check(h.get_canonical_export_name() == name, "INFO %r canonical name" % name)
        if desc:
            check(h.get_export_description() == desc, "INFO %r description" % name)
        check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20, "INFO %r block size" % name)
    h.set_export_name("nope")
    try:
        h.opt_info()
        raise AssertionError("INFO of an unknown export succeeded")
    except nbd.Error as e:
        log("  INFO nope ->", e)
        check(e.errno == "ENOENT", "INFO of an unknown export is NBD_REP_ERR_UNKNOWN")
    # Still negotiating after a failed INFO.
    h.set_export_name("ro")
    h.opt_go()
    check(h.is_read_only() and h.get_size() == 64 << 10, "GO after INFO")
    check(h.pread(512, 0) == bytes(512), "read after GO")
    h.shutdown()


def case_go_after_failed_go(uri):
    h = opt_handle(uri, "nope")
    try:
        h.opt_go()
        raise AssertionError("GO to an unknown export succeeded")
    except nbd.Error as e:
        log("  GO nope ->", e)
        check(e.errno == "ENOENT", "GO of an unknown export is NBD_REP_ERR_UNKNOWN")
    h.set_export_name("alpha")
    h.opt_go()
    check(h.get_size() == 1 << 20, "GO after a failed GO")
    h.pwrite(b"x" * 512, 0)
    h.shutdown()


def case_list_meta_context(uri):
    h = opt_handle(uri)
    got = []

    def cb(name):
        got.append(name)
        return 0

    n = h.opt_list_meta_context(cb)
    check(n == 1 and got == [nbd.CONTEXT_BASE_ALLOCATION], "all contexts: %r" % got)
    got.clear()
    h.add_meta_context(nbd.NAMESPACE_BASE)
    h.opt_list_meta_context(cb)
    check(got == [nbd.CONTEXT_BASE_ALLOCATION], "base: namespace query: %r" % got)
    got.clear()
    h.clear_meta_contexts()
    h.add_meta_context("x-unknown:thing")
    n = h.opt_list_meta_context(cb)
    check(n == 0 and got == [], "unknown namespace ignored: %r" % got)
    h.clear_meta_contexts()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.opt_go()
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "context selected at GO")
    ext = []
    h.block_status(65536, 0, lambda c, o, e, err: ext.append(list(e)) or 0)
    check(ext == [[65536, 3]], "block status after GO: %r" % ext)
    h.shutdown()


def case_abort(uri):
    h = opt_handle(uri)
    h.opt_abort()
    check(h.aio_is_closed() or h.aio_is_dead(), "closed after ABORT")


def case_unknown_export(uri):
    h = nbd.NBD()
    h.set_export_name("nope")
    try:
        h.connect_uri(uri.replace(":///", ":///nope", 1) if ":///" in uri else uri)
        raise AssertionError("connected to an unknown export")
    except nbd.Error as e:
        log("  connect nope ->", e)
        check(e.errno == "ENOENT" and "nope" in e.string, "unknown export refused clearly")


def case_no_structured_no_meta(uri):
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    check(not h.get_structured_replies_negotiated(), "no structured replies")
    check(not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "no meta context without structured replies")
    h.pwrite(b"s" * 4096, 0)
    check(h.pread(4096, 0) == b"s" * 4096, "simple replies round trip")
    h.shutdown()


def case_no_block_size_request(uri):
    # A client that does not ask for block sizes still gets served.
    h = nbd.NBD()
    h.set_request_block_size(False)
    h.connect_uri(uri)
    h.pwrite(b"b" * 1000, 3)
    check(h.pread(1000, 3) == b"b" * 1000, "I/O without NBD_INFO_BLOCK_SIZE request")
    h.shutdown()


def case_handshake_flags(uri):
    # Without NO_ZEROES the server pads EXPORT_NAME's reply; libnbd uses
    # EXPORT_NAME only when GO is unsupported, but the greeting flags must
    # still be honoured.
    for flags in (0, nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE):
        h = nbd.NBD()
        h.set_handshake_flags(flags)
        h.connect_uri(uri)
        check(h.pread(512, 0) is not None, "handshake flags %#x" % flags)
        check(h.get_protocol() == ("newstyle-fixed" if flags else "newstyle"), "protocol %s" % h.get_protocol())
        h.shutdown()


if __name__ == "__main__":
    run("libnbd_negotiation.py", globals())
