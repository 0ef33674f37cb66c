# qemu-img convert out of the filter while writes that start or end inside
# a 512-byte sector are buffered.  Block status described them to the
# byte; qemu-img copies by sectors and rounds a hole or zero extent up to
# whole sectors, so the bytes of buffered data in a sector shared with a
# hole or a buffered zero were copied as zeroes (a 100-byte write at 1000:
# 76 bytes in the copy).  Data extents are now widened to whole sectors.
import os
import random

import clientlib
from clientlib import check, run
import sdctest

SIZE = 4 << 20


def main():
    clientlib.require("qemu-img")
    tmp = sdctest.scratch_dir(prefix="sdc-qemu-unaligned-")
    disk = sdctest.make_image(tmp, SIZE, "disk.img")  # sparse: one hole
    out = os.path.join(tmp, "out.img")
    srv = clientlib.start_server(["file", disk], ["threshold=1048576", "max-age=1h"],
                                 tmpdir=tmp)
    with srv:
        h = srv.connect()  # stays connected: its writes stay buffered
        h.pwrite(b"\xaa" * 100, 1000)
        h.zero(100, 5000)  # a buffered zero just before data in its sector
        h.pwrite(b"\xbb" * 100, 5100)
        h.pwrite(b"\xcc" * 3, 9 * 512 - 1)  # across a sector boundary
        rng = random.Random(7)
        for _ in range(300):
            off = rng.randrange(16384, SIZE - 4096)
            n = rng.randrange(1, 3000)
            if rng.random() < 0.2:
                h.zero(n, off)
            else:
                h.pwrite(bytes([rng.randrange(1, 256)]) * n, off)
        want = h.pread(SIZE, 0)
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, out], timeout=120)
        with open(out, "rb") as f:
            got = f.read()
        check(len(got) == SIZE, "the copy is %d bytes" % len(got))
        bad = [i for i in range(0, SIZE, 512) if got[i:i + 512] != want[i:i + 512]]
        check(not bad, "%d sectors of the copy differ from what the export reads, first at %d: "
              "copy %r, export %r" % (len(bad), bad[0] if bad else 0,
                                     got[bad[0]:bad[0] + 32] if bad else b"",
                                     want[bad[0]:bad[0] + 32] if bad else b""))
        print("qemu-img convert of %d bytes with unaligned buffered writes: identical" % SIZE)
        h.shutdown()
        rc = srv.stop()
        check(rc == 0, "nbdkit exit status %d\n%s" % (rc, srv.log_text()))


if __name__ == "__main__":
    main()
