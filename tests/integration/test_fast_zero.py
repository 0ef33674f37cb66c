# Fast zeroes (NBD_CMD_FLAG_FAST_ZERO): the filter answers them as the
# plugin would.  A client asks for one to learn whether zeroing costs less
# than writing (qemu-img and nbdcopy pre-zero a whole disk only if so); a
# buffered zero is written back as the plugin zeroes, so one the plugin
# would turn into writes must fail at once, unbuffered.
import errno
import os

import nbd
import sdctest

MiB = 1 << 20
SIZE = 4 * MiB


def plugin_requests(log):
    """(kind, offset, count) of the Write and Zero calls nbdkit's log filter
    (under the filter) saw."""
    out = []
    with open(log) as f:
        for line in f:
            parts = line.split()
            for kind in ("Write", "Zero"):
                if kind in parts:
                    fields = dict(p.split("=", 1) for p in parts if "=" in p)
                    out.append((kind, int(fields["offset"], 16), int(fields["count"], 16)))
    return out


def emulated_zeroes(tmp):
    """nozero zeromode=emulate: the plugin's zeroes are writes of zero
    blocks, and nbdkit fails fast zeroes with ENOTSUP without the filter."""
    log = os.path.join(tmp, "emulate.log")
    with sdctest.start_server(["memory", str(SIZE), "zeromode=emulate", "logfile=" + log],
                              ["threshold=1000", "max-age=1h"], under=["log", "nozero"],
                              tmpdir=tmp) as srv:
        h = srv.connect()
        h.pwrite(b"\x33" * 8192, MiB)
        sdctest.check(h.can_fast_zero(), "fast zero not advertised (nbdkit advertises it)")
        sdctest.expect_errno(lambda: h.zero(SIZE, 0, nbd.CMD_FLAG_FAST_ZERO), errno.ENOTSUP,
                             "a fast zero over emulated zeroes")
        sdctest.check(h.pread(8192, MiB) == b"\x33" * 8192, "the failed fast zero was applied")
        h.flush()
        reqs = plugin_requests(log)
        sdctest.check(reqs == [("Write", MiB, 8192)],
                      "the plugin got more than the one write: %r" % reqs)
        # A plain zero is buffered, and written back as zero blocks.
        h.zero(8192, MiB)
        sdctest.check(h.pread(8192, MiB) == bytes(8192), "a plain zero was not applied")
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("emulated zeroes: fast zero ENOTSUP, nothing buffered; plugin saw", reqs)


def native_zeroes(tmp):
    """The memory plugin zeroes natively: a fast zero is buffered and
    reaches the plugin as a zero, not as data."""
    log = os.path.join(tmp, "native.log")
    with sdctest.start_server(["memory", str(SIZE), "logfile=" + log],
                              ["threshold=1000", "max-age=1h"], under=["log"],
                              tmpdir=tmp) as srv:
        h = srv.connect()
        sdctest.check(h.can_fast_zero(), "fast zero not advertised over the memory plugin")
        h.pwrite(b"\x44" * 8192, 0)
        h.zero(SIZE, 0, nbd.CMD_FLAG_FAST_ZERO)
        sdctest.check(h.pread(8192, 0) == bytes(8192), "the fast zero was not applied")
        h.flush()
        reqs = plugin_requests(log)
        sdctest.check(reqs and all(k == "Zero" for k, _, _ in reqs),
                      "the fast zero reached the plugin as %r" % reqs)
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("native zeroes: fast zero buffered; plugin saw", reqs)


def not_advertised(tmp):
    """A plugin that zeroes but does not offer fast zeroes: neither does
    the filter."""
    args = ["eval", "get_size=echo %d" % SIZE, "pread=dd if=/dev/zero count=$3 iflag=count_bytes",
            "pwrite=cat >/dev/null", "zero=exit 0", "flush=exit 0"]
    with sdctest.start_server(args, ["threshold=1000"], tmpdir=tmp) as srv:
        h = srv.connect()
        sdctest.check(h.can_zero(), "zero not advertised")
        sdctest.check(not h.can_fast_zero(), "fast zero advertised over a plugin without it")
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("eval plugin without can_fast_zero: not advertised")


def main():
    for case in (emulated_zeroes, native_zeroes, not_advertised):
        case(sdctest.scratch_dir(prefix="sdc-fastzero-"))


if __name__ == "__main__":
    main()
