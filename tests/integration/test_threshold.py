# Threshold trigger: the Nth queued write starts a batch; fewer stay buffered.
import shutil

import sdctest

THRESHOLD = 5
BLOCK = 4096
DEFAULT_THRESHOLD = 1024  # what the man page and README say


def check_default(img):
    """Without threshold=, the export description shows the documented default."""
    tmp = sdctest.scratch_dir(prefix="sdc-threshold-default-")  # a socket of its own
    with sdctest.start_server(["file", img], ["max-age=1h"], tmpdir=tmp) as srv:
        out = sdctest.run_command(["nbdinfo", srv.uri], timeout=30).stdout.decode()
        want = "sdccache: threshold=%d " % DEFAULT_THRESHOLD
        desc = [l for l in out.splitlines() if "description" in l]
        sdctest.check(desc and want in desc[0], "nbdinfo description lacks %r:\n%s" % (want, out))
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    shutil.rmtree(tmp, ignore_errors=True)


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-threshold-")
    img = sdctest.make_image(tmp, 1 << 20)
    check_default(img)
    with sdctest.start_server(["file", img], ["threshold=%d" % THRESHOLD, "max-age=1h"],
                        tmpdir=tmp) as srv:
        h = srv.connect()
        blocks = [bytes([0x41 + i]) * BLOCK for i in range(THRESHOLD)]
        offsets = [(3 * i + 1) * 65536 for i in range(THRESHOLD)]  # distinct, not adjacent
        for i in range(THRESHOLD - 1):
            h.pwrite(blocks[i], offsets[i])
        # The test is about time: below the threshold nothing reaches the
        # file, for a second at least.
        sdctest.assert_stays(
            lambda: all(sdctest.disk_read(img, offsets[i], BLOCK) == bytes(BLOCK)
                        for i in range(THRESHOLD - 1)),
            1.0, "a write reached the file below the threshold")
        for i in range(THRESHOLD - 1):
            sdctest.check(h.pread(BLOCK, offsets[i]) == blocks[i],
                          "write %d is not readable while buffered" % i)
        h.pwrite(blocks[-1], offsets[-1])
        for i in range(THRESHOLD):
            sdctest.wait_disk(img, offsets[i], blocks[i], 10,
                              "write %d in the file after the threshold write" % i)
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")


if __name__ == "__main__":
    main()
