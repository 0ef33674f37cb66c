# max-age trigger: a lone write reaches the file within max-age, with no flush.
import time

import sdctest

BLOCK = 4096
OFFSET = 123 * 4096


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-maxage-")
    img = sdctest.make_image(tmp, 1 << 20)
    with sdctest.start_server(["file", img], ["threshold=1000", "max-age=1s"], tmpdir=tmp) as srv:
        h = srv.connect()
        data = b"\xa5" * BLOCK
        start = time.monotonic()
        h.pwrite(data, OFFSET)
        sdctest.check(sdctest.disk_read(img, OFFSET, BLOCK) == bytes(BLOCK),
                      "the write reached the file at once (not buffered)")
        sdctest.wait_disk(img, OFFSET, data, 3, "the write in the file within 3 s")
        took = time.monotonic() - start
        print("write reached the file after %.2f s" % took)
        # Absent right after the write, present within 3 s: the age trigger,
        # not an immediate write-through, moved it.  It should not come much
        # before max-age either.
        sdctest.check(took >= 0.8, "written after %.2f s, well before max-age=1s" % took)
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")


if __name__ == "__main__":
    main()
