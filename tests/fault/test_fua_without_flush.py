# A plugin that takes FUA but cannot flush: the filter advertises flush
# (buffered writes are volatile), but a plugin flush does nothing there, so
# every call it makes to the plugin carries FUA.  Without that, a client's
# FUA write and flush were answered while nothing was durable.
import os

import faultlib
import sdctest
from sdctest import Server, check

SIZE = 1 << 20


def main():
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    calls = os.path.join(tmp, "calls")
    faultlib.write_file(calls, b"")
    args = [a for a in faultlib.eval_file_plugin(img)
            if not a.startswith(("pwrite=", "flush="))] + [
        "pwrite=echo \"pwrite $3 $4 $5\" >> %s; "
        "dd of=%s seek=$4 conv=notrunc oflag=seek_bytes status=none" % (calls, img),
        "can_flush=exit 3",
        "can_fua=echo native"]
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


if __name__ == "__main__":
    main()
