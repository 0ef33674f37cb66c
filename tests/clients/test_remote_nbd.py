# sdccache in front of a remote NBD server (nbd plugin): data reaches it on flush and on shutdown.
import os
import random
import sys

import clientlib
from clientlib import check
import sdctest

SIZE = 32 << 20
MIB = 1 << 20


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-remote-")
    back_disk = sdctest.make_image(tmp, SIZE, "back.img")
    back = clientlib.PlainServer(tmp, "back", ["file", back_disk])
    front = None
    try:
        front_tmp = os.path.join(tmp, "front")
        os.mkdir(front_tmp)
        stats = os.path.join(front_tmp, "stats.txt")
        # Nothing but a flush, a disconnect or shutdown writes back.
        params = ["threshold=1048576", "max-age=0", "sdccache-statsfile=" + stats]
        front = clientlib.start_server(["nbd", "socket=" + back.sock], params, tmpdir=front_tmp)
        rng = random.Random(11)
        h = front.connect()
        check(h.get_size() == SIZE, "front export size %d" % h.get_size())

        # 1. Written, still buffered; durable on the remote after a flush.
        a = rng.randbytes(3 * MIB + 17)
        h.pwrite(a, 100)
        h.zero(4096, 2 * MIB)
        a = a[:2 * MIB - 100] + bytes(4096) + a[2 * MIB - 100 + 4096:]
        check(h.pread(len(a), 100) == a, "front reads back wrong before the flush")
        check(sdctest.disk_read(back_disk, 100, len(a)) == bytes(len(a)),
              "data reached the remote before any trigger")
        h.flush()
        check(sdctest.disk_read(back_disk, 100, len(a)) == a,
              "remote backing file lacks the data after a successful flush")

        # 2. More data, no flush: it must reach the remote at disconnect and
        # shutdown, through the nbd plugin.
        b = rng.randbytes(5 * MIB + 3)
        off_b = 20 * MIB + 1
        h.pwrite(b, off_b)
        check(sdctest.disk_read(back_disk, off_b, len(b)) == bytes(len(b)),
              "unflushed data reached the remote early")
        # A second connection to the front sees it at once.
        h2 = front.connect()
        check(h2.pread(len(b), off_b) == b, "second connection does not see buffered data")
        h2.shutdown()
        h.shutdown()
        rc = front.stop()
        check(rc == 0, "front nbdkit exit status %d\n%s" % (rc, front.log_text()))
        check(sdctest.disk_read(back_disk, off_b, len(b)) == b,
              "remote backing file lacks the data after disconnect + SIGTERM")
        check(sdctest.disk_read(back_disk, 100, len(a)) == a, "flushed data was damaged")
        st = clientlib.read_stats(stats)
        check(int(st["flushes_client"]) >= 1, "no client flush counted: %s" % st)
        check(int(st["queued_bytes"]) == 0, "data left queued at exit: %s" % st)
        check(int(st["flush_errors"]) == 0, "flush errors: %s" % st)
    finally:
        if front is not None:
            front.kill()
        rc = back.stop()
    check(rc == 0, "back nbdkit exit status %d\n%s" % (rc, back.log_text()))
    print("PASS: remote nbd backend: data on the remote after flush and after shutdown")


if __name__ == "__main__":
    main()
    sys.exit(0)
