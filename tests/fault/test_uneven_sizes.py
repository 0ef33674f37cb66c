# Connections that saw different sizes (the image grew between them): data a
# connection wrote past the size an older connection saw must go through a
# plugin context that holds it.  Through the oldest one it failed with
# ENOSPC: the writer's disconnect could not write it (lost at exit), and the
# other connection's flush failed for it.
import errno
import os

import faultlib
import sdctest
from sdctest import Server, check

SMALL = 512 << 10
LARGE = 1 << 20
AT = 900 << 10


def grew(tmp):
    img = os.path.join(tmp, "grow.img")
    faultlib.write_file(img, b"\x11" * SMALL)
    with Server(["file", img], ["threshold=1000", "max-age=0", "shutdown-timeout=2s"],
                tmpdir=tmp) as srv:
        small = srv.connect()
        check(small.get_size() == SMALL, "first connection's size")
        os.truncate(img, LARGE)
        large = srv.connect()
        check(large.get_size() == LARGE, "the image did not grow: the test tests nothing")

        # Buffered, then flushed by the other connection: the flush covers
        # every write acknowledged before it, and succeeds.
        large.pwrite(b"\xaa" * 4096, AT)
        small.flush()
        check(faultlib.read_file(img)[AT:AT + 4096] == b"\xaa" * 4096,
              "the small connection's flush did not write the large one's data")

        # Buffered, then its writer leaves without a flush: its disconnect
        # writes it.
        large.pwrite(b"\xbb" * 4096, AT + 8192)
        large.shutdown()
        sdctest.wait_until(
            lambda: faultlib.read_file(img)[AT + 8192:AT + 12288] == b"\xbb" * 4096, 10,
            "the large connection's disconnect to write its data")
        small.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
        log = srv.log_text()
        check("lost" not in log and "No space" not in log, "errors logged:\n" + log[-2000:])


def only_holder_leaves_while_failing(tmp):
    """The only connection that sees the size holding its buffered data
    leaves while the plugin fails: its disconnect must keep trying (for
    shutdown-timeout), as the last connection's does, since no one else
    can write that data.  It left after one failed flush because another
    connection stayed: that one's flushes then failed with ENOSPC for
    ever, and the data was lost at exit."""
    img = os.path.join(tmp, "grow2.img")
    faultlib.write_file(img, b"\x11" * SMALL)
    trigger = os.path.join(tmp, "failing")
    stats = os.path.join(tmp, "ctl.sock")
    with Server(["file", img] + faultlib.error_args(["pwrite"], "100%", trigger),
                ["threshold=1000", "max-age=0", "shutdown-timeout=30s",
                 "control=" + stats],
                under=["error"], tmpdir=tmp) as srv:
        small = srv.connect()
        os.truncate(img, LARGE)
        large = srv.connect()
        check(large.get_size() == LARGE, "the image did not grow: the test tests nothing")
        faultlib.touch(trigger)
        large.pwrite(b"\xcc" * 4096, AT)
        sdctest.expect_errno(large.flush, errno.EIO, "the large connection's flush, plugin failing")
        errors = faultlib.counter(stats, "flush_errors")
        large.aio_disconnect(0)  # its shutdown() would wait for the retries
        # Its disconnect tries, fails, and (with the fix) keeps trying.
        faultlib.wait_counter(stats, "flush_errors", errors + 1)
        faultlib.remove(trigger)
        sdctest.wait_until(
            lambda: faultlib.read_file(img)[AT:AT + 4096] == b"\xcc" * 4096, 20,
            "the large connection's disconnect to write its data once the plugin recovered")
        small.flush()
        small.shutdown()
        del large
        check(srv.stop() == 0, "nbdkit exit status")
        log = srv.log_text()
        check("lost" not in log, "data logged as lost:\n" + log[-2000:])


def main():
    tmp = faultlib.tmpdir()
    for case in (grew, only_holder_leaves_while_failing):
        sub = os.path.join(tmp, case.__name__)
        os.mkdir(sub)
        case(sub)


if __name__ == "__main__":
    main()
