# A plugin that takes FUA but cannot flush (and one that flushes but has no
# FUA, flush_without_fua): the filter advertises flush
# (buffered writes are volatile), but a plugin flush does nothing there, so
# every call it makes to the plugin carries FUA.  Without that, a client's
# FUA write and flush were answered while nothing was durable.
import os

import faultlib
import sdctest
from sdctest import Server, check

SIZE = 1 << 20


def logged_plugin(extra):
    """An eval plugin over a new image whose writes append "pwrite COUNT
    OFFSET FLAGS", and flushes "flush", to a call log, with `extra`:
    (scratch dir, call log, plugin arguments)."""
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    calls = os.path.join(tmp, "calls")
    faultlib.write_file(calls, b"")
    args = [a for a in faultlib.eval_file_plugin(img)
            if not a.startswith(("pwrite=", "flush="))] + [
        "pwrite=echo \"pwrite $3 $4 $5\" >> %s; "
        "dd of=%s seek=$4 conv=notrunc oflag=seek_bytes status=none" % (calls, img),
        "flush=echo flush >> %s" % calls]
    return tmp, calls, args + list(extra)


def main():
    tmp, calls, args = logged_plugin(["can_flush=exit 3", "can_fua=echo native"])
    with Server(args, ["threshold=1000", "max-age=0"], tmpdir=tmp) as srv:
        h = srv.connect()
        check(h.can_flush() and h.can_fua(), "flush and FUA advertised")
        h.pwrite(b"\x01" * 4096, 0, sdctest.nbd.CMD_FLAG_FUA)
        h.pwrite(b"\x02" * 4096, 65536)
        h.flush()
        log = faultlib.read_file(calls).decode()
        lines = [line for line in log.splitlines() if line.startswith("pwrite")]
        check(len(lines) == 2, "plugin writes: %r" % lines)
        for line in lines:
            check("fua" in line.split()[3:], "a plugin write without FUA: %r" % line)
        h.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")


def flush_without_fua():
    """The other way round: a plugin that flushes but has no FUA.  A FUA
    write is acknowledged only after a plugin flush that came after its
    plugin write, also one written straight through (larger than the queue,
    through the Sink's own fallback, as the plugin is multi-conn)."""
    tmp, calls, args = logged_plugin(["can_fua=echo none", "can_multi_conn=exit 0"])
    with Server(args, ["threshold=1000", "max-age=0", "queue-max-size=64K"], tmpdir=tmp) as srv:
        h = srv.connect()
        check(h.can_fua() and h.can_multi_conn(), "FUA and multi-conn advertised")
        for what, n, off in (("written through", 128 * 1024, 0), ("buffered", 4096, 262144)):
            faultlib.write_file(calls, b"")
            h.pwrite(b"\x03" * n, off, sdctest.nbd.CMD_FLAG_FUA)
            log = faultlib.read_file(calls).decode().split("\n")[:-1]
            check(log and log[0].startswith("pwrite") and log[-1] == "flush",
                  "a FUA write %s answered after plugin calls %r" % (what, log))
        h.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
    print("plugin without FUA: FUA writes acknowledged after a plugin flush")


if __name__ == "__main__":
    main()
    flush_without_fua()
