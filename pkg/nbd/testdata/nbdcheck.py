"""Shared by the libnbd_*.py case scripts: logging, checks, and the
`SCRIPT URI CASE` runner that calls the module's case_CASE(uri)."""

import sys

import nbd


def log(*a):
    print(*a, flush=True)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    log("ok:", what)


def run(script, cases):
    """Run case_<CASE>(URI) from the dict cases, per sys.argv."""
    if len(sys.argv) != 3:
        sys.exit("usage: %s URI CASE" % script)
    uri, case = sys.argv[1], sys.argv[2]
    fn = cases.get("case_" + case)
    if fn is None:
        sys.exit("unknown case %r" % case)
    log("libnbd %s, case %s, %s" % (nbd.NBD().get_version(), case, uri))
    try:
        fn(uri)
    except (AssertionError, nbd.Error) as e:
        log("FAIL:", e)
        sys.exit(1)
    log("PASS")
