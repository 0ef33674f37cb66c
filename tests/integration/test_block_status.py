# Block status over many buffered ranges.  A request took every buffered
# range it covered (O(N) each), and qemu walks an image with REQ_ONE
# requests for the rest of it, one extent per reply: qemu-img map of
# 10,000 buffered ranges took 30 s (0.9 s without the filter).  A reply
# now describes at most 1024 buffered ranges (one with REQ_ONE) and the
# client asks again from where it ends.  Both walks, with and without
# REQ_ONE, must still describe every block as the model says.
import nbd

import sdctest
from sdctest import check

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
BLOCK = 4 * KiB
STRIDE = 16 * KiB
RANGES = 3000  # over 1024: a reply without REQ_ONE cannot describe them all
FLUSHED = 1 * MiB  # data written and flushed before the ranges are buffered
HOLE, ZERO = 1, 2


def walk(h, req_one):
    """Extents [(offset, length, type)] from 0 to SIZE, asking from where
    each reply ends; and how many requests that took."""
    got = []
    offset = 0
    requests = 0
    while offset < SIZE:
        count = min(SIZE - offset, 0xffffffff & ~(BLOCK - 1))
        reply = sdctest.extents_of(h, count, offset, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
        requests += 1
        check(reply and reply[0][0] == offset, "a reply does not start at %d: %r" % (offset, reply[:2]))
        check(all(n > 0 for _, n, _ in reply), "an empty extent at %d" % offset)
        if req_one:
            check(len(reply) == 1, "REQ_ONE answered with %d extents" % len(reply))
        got += reply
        offset = reply[-1][0] + reply[-1][1]
    return got, requests


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-bstatus-")
    img = sdctest.make_image(tmp, SIZE, "sparse.img")
    # Each 4 KiB block: "data", "zero" (buffered zero) or None (never
    # written: a hole in the sparse file).
    model = [None] * (SIZE // BLOCK)
    with sdctest.start_server(["file", img], ["threshold=1048576", "max-age=1h"],
                              tmpdir=tmp) as srv:
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(srv.sock)
        h.pwrite(b"\x11" * FLUSHED, 0)
        h.flush()
        for b in range(FLUSHED // BLOCK):
            model[b] = "data"
        for i in range(RANGES):
            off = FLUSHED + i * STRIDE
            if i % 7 == 3:
                h.zero(BLOCK, off)
                model[off // BLOCK] = "zero"
            else:
                h.pwrite(b"\x22" * BLOCK, off)
                model[off // BLOCK] = "data"
        for req_one in (True, False):
            extents, requests = walk(h, req_one)
            for off, n, typ in extents:
                check(off % BLOCK == 0 and n % BLOCK == 0,
                      "extent [%d,+%d) not on 4 KiB blocks" % (off, n))
                for b in range(off // BLOCK, (off + n) // BLOCK):
                    want = model[b]
                    if want == "data":
                        check(typ == 0, "block %d holds data, reported type %d (req_one=%s)" %
                              (b, typ, req_one))
                    elif want == "zero":
                        check(typ & ZERO, "block %d was zeroed, reported type %d (req_one=%s)" %
                              (b, typ, req_one))
                    else:
                        check(typ == HOLE | ZERO, "block %d is a hole, reported type %d "
                              "(req_one=%s)" % (b, typ, req_one))
            print("%s: %d requests, %d extents" %
                  ("REQ_ONE" if req_one else "whole", requests, len(extents)))
            if not req_one:
                check(requests >= 3, "%d buffered ranges described by %d replies: not cut at "
                      "1024 ranges a reply" % (RANGES, requests))
        h.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")


if __name__ == "__main__":
    main()
