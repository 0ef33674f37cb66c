# nbdcopy round trip file -> export -> file, and a copy out of still-unflushed data.
import os
import random
import sys

import clientlib
from clientlib import check, run
import sdctest

SIZE = 64 << 20
MIB = 1 << 20


def main():
    clientlib.require("nbdcopy")
    tmp = sdctest.scratch_dir(prefix="sdc-nbdcopy-")
    src = os.path.join(tmp, "src.img")
    clientlib.random_image(src, SIZE, seed=99)
    out = os.path.join(tmp, "out.img")
    disk = os.path.join(tmp, "disk.img")
    clientlib.fill(disk, SIZE, 0xEE)  # holes of src must arrive as zeroes
    stats = os.path.join(tmp, "stats.txt")

    # 1. Round trip: src -> export -> out, four connections each way.
    params = ["threshold=32", "queue-max-size=16M", "sdccache-statsfile=" + stats]
    srv = clientlib.start_server(["file", disk], params, tmpdir=tmp)
    with srv:
        run(["nbdcopy", "-C", "4", src, srv.uri], timeout=120)
        run(["nbdcopy", "-C", "4", srv.uri, out], timeout=120)
        diff = clientlib.files_equal(src, out, SIZE)
        check(diff == -1, "round trip: out.img differs from src.img at byte %d" % diff)
        rc = srv.stop()
        check(rc == 0, "nbdkit exit status %d\n%s" % (rc, srv.log_text()))
    diff = clientlib.files_equal(src, disk, SIZE)
    check(diff == -1, "backing file differs from src.img at byte %d" % diff)

    # 2. Copy out data that is still buffered: a writer stays connected and
    # never flushes, nothing triggers write-back, and the backing file is
    # sparse, so the plugin reports holes where the buffer holds data.
    # nbdcopy skips what block status calls zero; it must not skip ours.
    disk2 = sdctest.make_image(tmp, SIZE, "sparse.img")
    srv_tmp = os.path.join(tmp, "srv2")
    os.mkdir(srv_tmp)
    params = ["threshold=1048576", "max-age=0"]
    srv = clientlib.start_server(["file", disk2], params, tmpdir=srv_tmp)
    with srv:
        rng = random.Random(5)
        model = sdctest.Model(SIZE)
        h = srv.connect()
        for _ in range(200):
            n = rng.randint(1, 256 << 10)
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            h.pwrite(data, off)
            model.write(off, data)
        zoff = 10 * MIB + 12345
        h.zero(MIB, zoff)
        model.zero(zoff, MIB)
        check(sdctest.disk_read(disk2, 0, SIZE) == bytes(SIZE),
              "data reached the backing file early; this case needs it buffered")
        out2 = os.path.join(tmp, "out2.img")
        run(["nbdcopy", srv.uri, out2], timeout=120)
        with open(out2, "rb") as f:
            got = f.read()
        if got != bytes(model.buf):
            first = next(i for i in range(SIZE) if got[i] != model.buf[i])
            sdctest.fail("copy of unflushed data differs at byte %d" % first)
        h.shutdown()  # the disconnect writes everything back
        rc = srv.stop()
        check(rc == 0, "nbdkit exit status %d\n%s" % (rc, srv.log_text()))
    check(sdctest.disk_read(disk2, 0, SIZE) == bytes(model.buf),
          "backing file does not hold the writes after disconnect and shutdown")
    print("PASS: nbdcopy round trip (64 MiB) and copy of unflushed data")


if __name__ == "__main__":
    main()
    sys.exit(0)
