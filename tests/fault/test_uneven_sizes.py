# Connections that saw different sizes (the image grew between them): data a
# connection wrote past the size an older connection saw must go through a
# plugin context that holds it.  Through the oldest one it failed with
# ENOSPC: the writer's disconnect could not write it (lost at exit), and the
# other connection's flush failed for it.
import os

import faultlib
import sdctest
from sdctest import Server, check

SMALL = 512 << 10
LARGE = 1 << 20
AT = 900 << 10


def main():
    tmp = faultlib.tmpdir()
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


if __name__ == "__main__":
    main()
